"""Cycle-consistency evaluation: IoU(mask, segment(describe(mask))) (docs/evaluation.md).

Per batch: the model captions each region greedily (batched, KV cache), then segments its *own*
caption tokens in the same image (the generated ids and lengths go straight in as the expression,
no detokenise / re-tokenise round trip), and the re-segmented mask is compared with the source mask
at SAM input size (:class:`~maskloop.eval.metrics.CycleMeter`).  The same captions are scored
against the dataset's reference captions when it has them, so one pass gives both numbers.

    res = evaluate_cycle(model, ds, keep_examples=6)
    res["cycle"]    # {'cycle_mIoU', 'cycle_cIoU', 'empty_reseg_frac', 'n'}
    res["caption"]  # caption metrics (if references exist)
    res["examples"] # [{image, mask, caption, pred_mask, reference, title}] for the report grid
"""

from __future__ import annotations

from maskloop.eval.caption import describe_batch, reference_list, score_captions
from maskloop.eval.data import SkipCounts
from maskloop.eval.metrics import CycleMeter
from maskloop.eval.refer import Progress, eval_mode, loader, model_device, segment_texts, valid_batches
from maskloop.model.prompts import Ragged


def evaluate_cycle(
    model,
    dataset,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    max_samples: int | None = None,
    keep_examples: int = 0,
    progress: bool = True,
    num_workers: int = 0,
) -> dict:
    dev = model_device(model)
    skips = SkipCounts()
    meter = CycleMeter()
    preds: dict[int, str] = {}
    refs: dict[int, list[str]] = {}
    lengths: list[int] = []
    examples: list[dict] = []
    with eval_mode(model):
        dl = loader(dataset, batch_size, num_workers, max_samples)
        bar = Progress(dl, "eval cycle", progress)
        for batch in valid_batches(dl, skips, bar, dev):
            gen, texts = describe_batch(model, batch, max_new_tokens)
            # the caption's own tokens (before the end token) as the referring expression
            reseg = segment_texts(model, batch, expr=Ragged(gen.ids, gen.lengths))
            src = batch["masks"] > 0.5
            iou = meter.update(src.cpu(), reseg.cpu())
            cap_refs = batch.get("caption") or [None] * len(texts)
            for b, (text, ref, n) in enumerate(zip(texts, cap_refs, gen.lengths.tolist())):
                i = len(preds)
                preds[i], refs[i] = text, reference_list(ref)
                lengths.append(n)
                if len(examples) < keep_examples:
                    examples.append({
                        "image": batch["g_pixel_values"][b].cpu(), "mask": src[b].cpu(), "caption": text,
                        "pred_mask": reseg[b].cpu(), "reference": refs[i][0] if refs[i] else None,
                        "title": f"#{i}\ncycle IoU {float(iou[b]):.2f}",
                    })
        seconds = bar.close()
    counts = skips.as_dict()
    cyc, cap = meter.compute(), score_captions(preds, refs, lengths)
    cyc.update(n_scored=cyc["n"], **counts, seconds=seconds)
    cap.update(n_scored=cap["n"], **counts)
    return {"cycle": cyc, "caption": cap, "examples": examples, "predictions": [preds[i] for i in range(len(preds))]}


__all__ = ["evaluate_cycle"]

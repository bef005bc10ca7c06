"""Region-caption evaluation: describe(image, mask) -> caption, scored against references (docs/evaluation.md).

Batched greedy decoding (:meth:`GroundedMLLM.describe`, KV cache) from the mask's prompt cells
(16x16 / the preset's grid; an empty cell set falls back to the mask's centroid cell).  Scores are
:func:`maskloop.eval.caption_metrics.caption_scores`: the COCO-caption pipeline (PTB tokens; BLEU,
ROUGE-L, CIDEr-D; METEOR 1.5 when Java is present) plus METEOR-nosyn and chrF under their own names.
Unreadable samples are skipped and counted (``n_scored``, ``n_skipped``), never replaced.
"""

from __future__ import annotations

import torch

from maskloop.eval.caption_metrics import caption_scores
from maskloop.eval.data import SkipCounts
from maskloop.eval.refer import Progress, eval_mode, loader, model_device, valid_batches


def describe_batch(model, batch: dict, max_new_tokens: int = 32):
    """Greedy captions for the batch's regions -> (Generated, decoded strings)."""
    from maskloop.recipes.common import region_prompts

    pm, _ = region_prompts(batch)
    tiled = {"num_tiles": batch["num_tiles"]} if "num_tiles" in batch else {}  # tiled batch (data/tiles.py)
    gen = model.describe(batch["pixel_values"], pm, max_new_tokens=max_new_tokens, **tiled)
    return gen, model.builder.decode(gen.ids, gen.lengths)


def reference_list(value) -> list[str]:
    """A dataset's caption field (a string or a list of strings) -> list of references."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def evaluate_captions(
    model,
    dataset,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    max_samples: int | None = None,
    progress: bool = True,
    num_workers: int = 0,
) -> dict:
    """Caption every region of ``dataset`` (items with ``caption`` references) and score.

    Returns {metric: score, ..., 'n', 'empty_frac', 'mean_len'} plus ``predictions`` (list of str).
    """
    dev = model_device(model)
    preds: dict[int, str] = {}
    refs: dict[int, list[str]] = {}
    lengths: list[int] = []
    skips = SkipCounts()
    with eval_mode(model):
        dl = loader(dataset, batch_size, num_workers, max_samples)
        bar = Progress(dl, "eval caption", progress)
        for batch in valid_batches(dl, skips, bar, dev):
            gen, texts = describe_batch(model, batch, max_new_tokens)
            for text, ref, n in zip(texts, batch["caption"], gen.lengths.tolist()):
                i = len(preds)
                preds[i], refs[i] = text, reference_list(ref)
                lengths.append(n)
        seconds = bar.close()
    out = score_captions(preds, refs, lengths)
    out.update(n_scored=out["n"], **skips.as_dict(), seconds=seconds)
    return out


def score_captions(preds: dict, refs: dict, lengths: list[int]) -> dict:
    keep = [i for i in refs if refs[i]]
    out: dict = {}
    if keep:
        out.update(caption_scores({i: preds[i] for i in keep}, {i: refs[i] for i in keep}))
    n = len(preds)
    out["n"] = n
    out["empty_frac"] = sum(1 for v in lengths if v == 0) / n if n else float("nan")
    out["mean_len"] = float(torch.tensor(lengths, dtype=torch.float).mean()) if n else float("nan")
    return out


__all__ = ["describe_batch", "evaluate_captions", "reference_list", "score_captions"]

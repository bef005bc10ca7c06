"""Referring-segmentation evaluation: cIoU / gIoU / P@k per split (docs/evaluation.md), Sa2VA's protocol.

Protocol ``"generate"`` (the default; Sa2VA's ``refcoco_eval.py`` + ``RESDataset.evaluate``):

1. the prompt is Sa2VA's evaluation question, ``<image>\n Please segment {expr} in this image.``
   (:data:`SA2VA_REFER_QUESTION`, with the leading space its ``"<image>\n Please ..."`` leaves
   after the image tokens), in the model's chat template;
2. the model **generates** its answer (batched greedy decoding, KV cache);
3. only an answer holding ``[SEG]`` gives a mask; the **first** ``[SEG]`` is used (Sa2VA's eval
   takes ``prediction_masks[0]``).  Its hidden state is the LLM's last hidden state at the
   ``[SEG]`` position (we re-run the prompt + the generated answer up to that ``[SEG]`` once,
   teacher-forced, which is the same causal computation as the generation step), then
   ``text_hidden_fcs`` -> SAM2's mask decoder.  As in Sa2VA, a ``[SEG]`` that is the very last token
   of an answer cut at ``max_new_tokens`` (never fed back) does not count;
4. the low-res logits are resized bilinearly to the SAM input size (SAM2's video-resolution
   output, 1024) and then bilinearly to the **original image size**, and thresholded there
   (sigmoid > 0.5, i.e. logit > 0) against the original-size ground truth (``gt_mask`` from
   :class:`~maskloop.eval.data.EvalTransform`);
5. an answer without ``[SEG]`` is counted (``no_seg_frac``) and scored by ``no_seg``:
   ``"sa2va"`` (default, Sa2VA's code): IoU 0 in gIoU / P@k, nothing added to the cIoU sums;
   ``"empty"``: an empty predicted mask.

Protocol ``"teacher_forced"``: the fixed prompt ``... segment the {expr} ... / Sure, [SEG].`` is
teacher forced (:meth:`GroundedMLLM.segment`), scored the same way (step 4).  Items that lack
``gt_mask`` (a dataset not built with the eval transform) are scored at the SAM size against
``masks`` (``scored_at`` says which).  Bad samples are skipped and counted, never replaced
(:mod:`maskloop.eval.data`).

    results = evaluate_refer(model, {"refcoco_val": ds}, batch_size=8)
    results["refcoco_val"]  # {'cIoU', 'gIoU', 'P@0.5', ..., 'no_seg_frac', 'n_scored', 'n_skipped', ...}
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from maskloop.eval.data import SkipCounts, eval_loader, to_device
from maskloop.eval.metrics import RefSegMeter, mask_iou

#: Sa2VA's referring-evaluation question (``RESDataset.get_questions``), after ``<image>\n``.
SA2VA_REFER_QUESTION = " Please segment {expr} in this image."
PROTOCOLS = ("generate", "teacher_forced")
NO_SEG_POLICIES = ("sa2va", "empty")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """model.eval() and no_grad for the block; the training mode is restored afterwards.

    Whether SAM2 may fall back to a multimask token in eval mode is the model's config
    (``sam2.dynamic_multimask``: on for SAM2-pretrained decoders, off for the tiny preset trained
    from scratch, whose multimask tokens are never trained).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def loader(dataset, batch_size: int, num_workers: int = 0, max_samples: int | None = None):
    """The evaluation DataLoader (sequential, non-dropping, skips counted, never substituted)."""
    return eval_loader(dataset, batch_size, num_workers, max_samples)


def segment_texts(model, batch: dict, texts: list[str] | None = None, expr=None, feats=None) -> torch.Tensor:
    """(B, G, G) bool masks for the batch's images from ``texts`` (or a ready ``expr`` part), teacher forced.

    ``feats``: the batch's (SAM2 features, image tokens) when already computed (:func:`image_features`)."""
    return teacher_forced_logits(model, batch, texts, expr, feats) > 0


def teacher_forced_logits(model, batch: dict, texts: list[str] | None = None, expr=None, feats=None) -> torch.Tensor:
    """(B, G, G) mask logits at SAM size from the fixed teacher-forced "Sure, [SEG]." prompt."""
    expr = expr if expr is not None else model.builder.expressions(texts)
    sam_feats, image_feats = feats if feats is not None else (model.sam_features(batch["g_pixel_values"]), None)
    tiled = {"num_tiles": batch["num_tiles"]} if "num_tiles" in batch else {}  # tiled batch (data/tiles.py)
    out = model.segment(batch["pixel_values"], sam_feats, expr, image_feats=image_feats, lm_loss=False, **tiled)
    return out["mask_logits"]


def image_features(model, batch: dict):
    """(SAM2 features, projected image tokens (per tile when the batch is tiled)) of a batch, to segment
    several texts on the same images."""
    return model.sam_features(batch["g_pixel_values"]), model.image_tokens(batch["pixel_values"])


def mllm_image_inputs(model, batch: dict):
    """The MLLM's image tokens for a batch and the per-row token counts: ``(image_feats, n_image)``.

    One 448 tile per image: (B, N, D) and None.  With InternVL tiling (the model config's ``tiles``; the
    eval transform then gives each image its 1..max tiles by InternVL's aspect-ratio grid + a thumbnail
    and ``num_tiles``), the tiles' tokens packed per row, n_image (B,) = n_tiles * N
    (:meth:`GroundedMLLM.image_inputs`)."""
    return model.image_inputs(batch["pixel_values"], num_tiles=batch.get("num_tiles"))


def sa2va_refer_parts(model, texts: list[str], n_image: torch.Tensor | None = None) -> list:
    """Prompt parts of Sa2VA's evaluation question for each expression (no answer): the image part
    (``n_image`` (B,) image tokens per row when tiled), then each row's question + chat-template suffix
    tokenised as one string (as Sa2VA tokenises it)."""
    from maskloop.model.prompts import Ragged

    b = model.builder
    suffix = list(b._suffix_ids)  # the template's end-of-user-turn + assistant header
    rows = [b.ids(SA2VA_REFER_QUESTION.format(expr=t)) + suffix for t in texts]
    return b.image_parts(n_image) + [Ragged.from_lists(rows, b.pad_id)]


def first_seg_index(model, ids: torch.Tensor, lengths: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
    """(B,) index of the first ``[SEG]`` among the tokens of each generated answer that were fed back
    to the model (all but the last generated one), -1 when there is none."""
    B, T = ids.shape
    n_gen = torch.where(finished, lengths + 1, torch.full_like(lengths, T))  # tokens generated, end included
    pos = torch.arange(T, device=ids.device)[None]
    is_seg = (ids == model.builder.seg_id) & (pos < (n_gen - 1)[:, None])
    first = torch.where(is_seg, pos.expand(B, T), torch.full_like(ids, T)).min(1).values
    return torch.where(first < T, first, torch.full_like(first, -1))


@torch.no_grad()
def first_seg_prompts(model, parts_of, image_feats: torch.Tensor, n_image: torch.Tensor | None = None,
                      max_new_tokens: int = 32) -> dict:
    """The MLLM side of Sa2VA's generation protocol: greedy answers, then the SAM2 prompt of each answer's
    first ``[SEG]`` (:func:`first_seg_index`).

    ``parts_of(rows)`` gives the prompt parts (no answer) of the batch rows ``rows`` (a (M,) tensor; None:
    every row); ``image_feats`` (B, N, D) / ``n_image`` as :meth:`GroundedMLLM.build_inputs` takes them.
    The prompt + the answer up to that ``[SEG]`` is run once more, teacher forced: the last hidden state
    at the ``[SEG]`` position is the one Sa2VA reads from the generation's own hidden states (the same
    causal computation), then ``text_hidden_fcs``.  Returns ``prompts`` (M, C), ``rows`` (M,) (the rows
    that hold a ``[SEG]``), ``has_seg`` (B,) bool and ``gen`` (:class:`Generated`)."""
    from maskloop.model.prompts import Ragged

    emb, asm = model.build_inputs(parts_of(None), image_feats, n_image=n_image)
    gen = model.generate(emb, asm.attention_mask, asm.position_ids, max_new_tokens)
    first = first_seg_index(model, gen.ids, gen.lengths, gen.finished)
    has_seg = first >= 0
    rows = has_seg.nonzero().flatten()
    prompts = None
    if rows.numel():
        answer = Ragged.from_lists([gen.ids[i, : int(first[i]) + 1].tolist() for i in rows.tolist()],
                                   model.builder.pad_id)
        sub = None if n_image is None else n_image[rows]
        emb2, asm2 = model.build_inputs(parts_of(rows) + [answer], image_feats[rows], n_image=sub)
        if not bool((asm2.input_ids[:, -1] == model.builder.seg_id).all()):
            raise AssertionError("the re-run answer must end at its [SEG] (left-padded layout)")
        hidden = model.run_llm(emb2, asm2.attention_mask, asm2.position_ids)  # (M, L, D)
        prompts = model.text_hidden_fcs(hidden[:, -1])  # (M, C): the [SEG] position of every row
    return {"prompts": prompts, "rows": rows, "has_seg": has_seg, "gen": gen}


@torch.no_grad()
def generate_refer(model, batch: dict, max_new_tokens: int = 32) -> dict:
    """Sa2VA's protocol steps 1-3 for a batch: free generation, the first ``[SEG]`` -> SAM2.

    Returns ``logits`` (B, G, G) at SAM size (rows without ``[SEG]`` hold -inf), ``has_seg`` (B,) bool,
    ``answers`` (decoded answers, special tokens kept)."""
    texts = list(batch["expression"])
    B = len(texts)
    image_feats, n_image = mllm_image_inputs(model, batch)

    def parts_of(rows):
        if rows is None:
            return sa2va_refer_parts(model, texts, n_image)
        return sa2va_refer_parts(model, [texts[i] for i in rows.tolist()], None if n_image is None else n_image[rows])

    r = first_seg_prompts(model, parts_of, image_feats, n_image, max_new_tokens)
    gen, rows = r["gen"], r["rows"]
    G = model.cfg.sam2.image_size
    logits = torch.full((B, G, G), float("-inf"), device=image_feats.device)
    if rows.numel():
        sam_feats = model.sam_features(batch["g_pixel_values"][rows])
        logits[rows] = model.sam.upsample(model.sam.decode(sam_feats, r["prompts"][:, None])).float()
    answers = [model.tokenizer.decode(gen.ids[i, : int(gen.lengths[i])].tolist(), skip_special_tokens=False)
               for i in range(B)]
    return {"logits": logits, "has_seg": r["has_seg"], "answers": answers}


def logits_at(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(G, G) logits at SAM size -> (H, W) bool at ``size``: bilinear (align_corners False), > 0
    (sigmoid > 0.5), as Sa2VA resizes SAM2's 1024 output to the original image."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits > 0
    up = F.interpolate(logits[None, None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    return up[0, 0] > 0


def score_batch(meter: RefSegMeter, logits: torch.Tensor, has_seg: torch.Tensor, batch: dict,
                no_seg: str = "sa2va") -> str:
    """Add a batch to ``meter``: each row's logits (G, G) resized to its original size and compared with
    ``gt_mask`` (or, lacking it, with ``masks`` at SAM size).  Rows with ``has_seg`` False go through
    :meth:`RefSegMeter.add_no_seg`.  Returns where it scored: ``"original"`` or ``"sam"``."""
    gts = batch.get("gt_mask")
    at = "original" if gts is not None else "sam"
    if gts is None:
        gts = list(batch["masks"] > 0.5)
    elif isinstance(gts, torch.Tensor):
        gts = list(gts)
    for b, gt in enumerate(gts):
        gt = gt.to(logits.device).bool()
        if not bool(has_seg[b]):
            meter.add_no_seg(gt.cpu(), no_seg)
        else:
            meter.update(logits_at(logits[b], tuple(gt.shape[-2:])).cpu(), gt.cpu())
    return at


class Progress:
    """A tqdm bar over batches that shows samples done, samples/s and the ETA of the split."""

    def __init__(self, dl, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        n = len(dl.dataset)
        self.bar = tqdm(total=n, desc=desc, unit="sample", disable=not enabled, dynamic_ncols=True, leave=False)
        self.t0 = time.perf_counter()

    def step(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> float:
        self.bar.close()
        return time.perf_counter() - self.t0


def valid_batches(dl, skips, bar, dev):
    """The evaluation loop's batches with at least one valid sample, on ``dev``: every batch's skip markers
    counted in ``skips`` and its samples (scored or skipped) ticked on the progress ``bar``."""
    for batch in dl:
        skips.add(batch)
        bar.step(batch["n"] + sum(batch["skipped"].values()))
        if batch["n"]:
            yield to_device(batch, dev)


def evaluate_refer(
    model,
    splits,
    batch_size: int = 16,
    max_samples: int | None = None,
    progress: bool = True,
    num_workers: int = 0,
    protocol: str = "generate",
    max_new_tokens: int = 32,
    no_seg: str = "sa2va",
) -> dict[str, dict[str, float]]:
    """``splits``: a dataset or {name: dataset} of items with ``expression`` and ``masks`` (+ ``gt_mask``).

    Returns {split: RefSegMeter.compute() + n_scored, n_skipped, skipped, no_seg_frac, scored_at,
    protocol, seconds, s_per_sample}.  See the module docstring for the protocols.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown referring protocol {protocol!r}; choose one of {PROTOCOLS}")
    if no_seg not in NO_SEG_POLICIES:
        raise ValueError(f"unknown no-[SEG] policy {no_seg!r}; choose one of {NO_SEG_POLICIES}")
    if not isinstance(splits, Mapping):
        splits = {getattr(splits, "name", "refer"): splits}
    dev = model_device(model)
    results: dict[str, dict[str, float]] = {}
    with eval_mode(model):
        for name, ds in splits.items():
            meter, skips, at = RefSegMeter(), SkipCounts(), None  # where it scored: "original" | "sam"
            dl = loader(ds, batch_size, num_workers, max_samples)
            bar = Progress(dl, f"eval refer {name}", progress)
            for batch in valid_batches(dl, skips, bar, dev):
                if protocol == "generate":
                    out = generate_refer(model, batch, max_new_tokens)
                    logits, has_seg = out["logits"], out["has_seg"]
                else:
                    logits = teacher_forced_logits(model, batch, list(batch["expression"]))
                    has_seg = torch.ones(logits.shape[0], dtype=torch.bool)
                at = score_batch(meter, logits, has_seg, batch, no_seg)
            seconds = bar.close()
            r = meter.compute()
            r.update(n_scored=r["n"], **skips.as_dict(), scored_at=at, protocol=protocol, seconds=seconds,
                     s_per_sample=seconds / r["n"] if r["n"] else float("nan"))
            results[name] = r
    return results


def evaluate_text_sensitivity(model, dataset, batch_size: int = 16, max_samples: int | None = None,
                              progress: bool = True, meter: RefSegMeter | None = None) -> dict[str, float]:
    """Does the predicted mask follow the expression?  Items need ``expression`` and ``other_expression``
    (another object of the same image, e.g. :class:`~maskloop.data.sources.shapes.ShapesReferDataset`).

    Each image is segmented twice, once per expression; ``mask_IoU_between_expressions`` is the mean IoU
    of the two predicted masks (pairs where both are empty count as 1) and ``text_sensitivity`` = 1 minus
    it: 0 when the model returns the same mask whatever it is asked (e.g. the union of all objects), near 1
    when two expressions get disjoint masks.  ``other_IoU`` is the mean IoU of the second mask with the
    other object's ground truth, when the items carry it as ``other_masks``.  Given a ``meter``, the masks
    for ``expression`` also update it against ``masks``: the referring metrics of the same pass, exactly what
    :func:`evaluate_refer` computes on these items.
    """
    from tqdm.auto import tqdm

    dev = model_device(model)
    same, other, n = [], [], 0
    with eval_mode(model):
        for batch in tqdm(loader(dataset, batch_size, 0, max_samples), desc="eval text sensitivity",
                          disable=not progress, dynamic_ncols=True, leave=False):
            if not batch["n"]:  # every sample of the batch was bad (skipped, counted by the loader)
                continue
            if "other_expression" not in batch:
                raise KeyError("text sensitivity needs items with an 'other_expression' (a second object's expression)")
            batch = to_device(batch, dev)
            feats = image_features(model, batch)  # both expressions segment the same images
            a = segment_texts(model, batch, list(batch["expression"]), feats=feats).cpu()
            b = segment_texts(model, batch, list(batch["other_expression"]), feats=feats).cpu()
            if meter is not None:
                meter.update(a, batch["masks"].cpu() > 0.5)
            same.append(mask_iou(a, b))
            if "other_masks" in batch:
                other.append(mask_iou(b, batch["other_masks"].cpu() > 0.5))
            n += a.shape[0]
    between = float(torch.cat(same).mean()) if same else float("nan")
    out = {"mask_IoU_between_expressions": between, "text_sensitivity": 1.0 - between, "n": n}
    if other:
        out["other_IoU"] = float(torch.cat(other).mean())
    return out


__all__ = ["NO_SEG_POLICIES", "PROTOCOLS", "SA2VA_REFER_QUESTION", "evaluate_refer", "evaluate_text_sensitivity",
           "eval_mode", "first_seg_index", "generate_refer", "image_features", "loader", "logits_at",
           "mllm_image_inputs", "model_device", "sa2va_refer_parts", "score_batch", "segment_texts",
           "teacher_forced_logits", "to_device", "valid_batches"]

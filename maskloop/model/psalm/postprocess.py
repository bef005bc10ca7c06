"""PSALM inference: per-query outputs -> panoptic / semantic / instance / referring / region results.

All functions take **one image's** outputs of the final decoder layer (see
:class:`~maskloop.model.psalm.model.PSALMOutput`): ``class_logits`` (Q, K+1) with the last
column "no object", ``mask_logits`` (Q, h, w) (upsample first with ``size=`` to evaluate at
the target resolution), ``seg_logits`` (Q,) the ``[SEG]`` objectness, ``region_logits``
(Q, R+1). They follow Mask2Former's ``panoptic_inference`` / ``semantic_inference`` /
``instance_inference`` as PSALM uses them (``class_name_*_inference``):

* panoptic: keep queries whose best class is not "no object" and whose probability is above
  ``object_mask_threshold`` (0.8); each pixel goes to the kept query with the largest
  ``prob * sigmoid(mask)``; a query keeps its pixels only where its own mask is >= 0.5,
  and only if they are at least ``overlap_threshold`` (0.8) of its mask's area; stuff
  queries of the same class merge into one segment.
* semantic: ``sum_q softmax(class)[q, :K] * sigmoid(mask)[q]`` -> (K, h, w) scores, argmax.
* instance: top-k over (query, class) pairs of ``softmax(class)[:, :K]``, mask = logit > 0,
  score = class prob x mean mask prob inside the mask; with ``isthing``, stuff classes dropped.
* referring: the query with the highest ``[SEG]`` objectness (PSALM's ``SEG_instance_inference``
  with top-1), or the best "refer" class probability with ``by="class"``.
* region: for each region r, the query maximising ``prob(r) x mean mask prob`` (PSALM's
  ``region_inference``), its mask > 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "panoptic_inference", "semantic_inference", "instance_inference", "referring_inference", "region_inference",
    "postprocess",
]


def _resize(mask_logits: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    if size is None or tuple(mask_logits.shape[-2:]) == tuple(size):
        return mask_logits.float()
    return F.interpolate(mask_logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def _mask_scores(mask_logits: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid inside each binarised mask: (Q, h, w) -> (Q,)."""
    binary = (mask_logits > 0).flatten(1).float()
    return (mask_logits.sigmoid().flatten(1) * binary).sum(1) / (binary.sum(1) + 1e-6)


@torch.no_grad()
def panoptic_inference(
    class_logits: torch.Tensor,  # (Q, K+1)
    mask_logits: torch.Tensor,  # (Q, h, w)
    isthing: Sequence[bool],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, list[dict]]:
    """-> (segment id map (H, W) int32, 0 = void; [{id, category_id, isthing, score}])."""
    mask_logits = _resize(mask_logits, size)
    scores, labels = F.softmax(class_logits.float(), dim=-1).max(-1)
    K = class_logits.shape[-1] - 1
    masks = mask_logits.sigmoid()
    keep = labels.ne(K) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], masks[keep]
    h, w = masks.shape[-2:]
    panoptic = torch.zeros((h, w), dtype=torch.int32, device=masks.device)
    segments: list[dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic, segments
    mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)  # (H, W)
    stuff_ids: dict[int, int] = {}
    current = 0
    for k in range(cur_classes.shape[0]):
        cls = int(cur_classes[k])
        thing = bool(isthing[cls])
        mask_area = int((mask_ids == k).sum())
        original_area = int((cur_masks[k] >= 0.5).sum())
        mask = (mask_ids == k) & (cur_masks[k] >= 0.5)
        if mask_area == 0 or original_area == 0 or not bool(mask.any()):
            continue
        if mask_area / original_area < overlap_threshold:
            continue
        if not thing and cls in stuff_ids:  # merge stuff of one class
            panoptic[mask] = stuff_ids[cls]
            continue
        current += 1
        if not thing:
            stuff_ids[cls] = current
        panoptic[mask] = current
        segments.append({"id": current, "category_id": cls, "isthing": thing, "score": float(cur_scores[k])})
    return panoptic, segments


@torch.no_grad()
def semantic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                       size: tuple[int, int] | None = None) -> torch.Tensor:
    """-> (K, H, W) class scores; ``.argmax(0)`` is the semantic map."""
    probs = F.softmax(class_logits.float(), dim=-1)[:, :-1]
    return torch.einsum("qc,qhw->chw", probs, _resize(mask_logits, size).sigmoid())


@torch.no_grad()
def instance_inference(
    class_logits: torch.Tensor,  # (Q, K+1)
    mask_logits: torch.Tensor,  # (Q, h, w)
    topk: int = 100,
    isthing: Sequence[bool] | None = None,
    size: tuple[int, int] | None = None,
) -> dict:
    """-> {"masks": (k, H, W) bool, "labels": (k,), "scores": (k,), "queries": (k,)}, best first."""
    mask_logits = _resize(mask_logits, size)
    probs = F.softmax(class_logits.float(), dim=-1)[:, :-1]  # (Q, K)
    Q, K = probs.shape
    flat = probs.flatten()
    valid = torch.isfinite(flat) & (flat > 0)
    k = min(topk, int(valid.sum()))
    scores, idx = flat.masked_fill(~valid, -1.0).topk(k)
    labels, queries = idx % K, idx // K
    if isthing is not None:
        things = torch.as_tensor(list(isthing), dtype=torch.bool, device=labels.device)[labels]
        scores, labels, queries = scores[things], labels[things], queries[things]
    m = mask_logits[queries]
    scores = scores * _mask_scores(m)
    order = scores.argsort(descending=True)
    return {"masks": (m > 0)[order], "labels": labels[order], "scores": scores[order], "queries": queries[order]}


@torch.no_grad()
def referring_inference(mask_logits: torch.Tensor, seg_logits: torch.Tensor | None = None,
                        class_logits: torch.Tensor | None = None, by: str = "seg",
                        size: tuple[int, int] | None = None) -> torch.Tensor:
    """-> (H, W) bool: the mask of the best query (by ``[SEG]`` objectness or refer-class prob)."""
    if by == "seg":
        score = seg_logits.float()
    elif by == "class":
        score = F.softmax(class_logits.float(), dim=-1)[:, 0]
    else:
        raise ValueError(f"by must be 'seg' or 'class', got {by!r}")
    q = int(score.argmax())
    return _resize(mask_logits[q:q + 1], size)[0] > 0


@torch.no_grad()
def region_inference(region_logits: torch.Tensor, mask_logits: torch.Tensor, num_regions: int | None = None,
                     size: tuple[int, int] | None = None) -> torch.Tensor:
    """-> (R, H, W) bool: per region, the mask of the query with the best prob x mask score."""
    R = num_regions if num_regions is not None else region_logits.shape[-1] - 1
    probs = F.softmax(region_logits.float(), dim=-1)[:, :R]  # (Q, R)
    mask_logits = _resize(mask_logits, size)
    score = probs * _mask_scores(mask_logits)[:, None]
    best = score.argmax(0)  # (R,)
    return mask_logits[best] > 0


def postprocess(task: str, out, b: int, size: tuple[int, int] | None = None, meta: dict | None = None,
                **kw):
    """Result for sample ``b`` of a batched :class:`PSALMOutput` of ``task`` (final layer).

    panoptic -> (id map, segments); semantic -> (H, W) class map; instance -> dict;
    referring -> (H, W) bool; region / cross_image -> (R, H, W) bool. ``meta`` supplies
    ``isthing`` (panoptic) and the number of regions (region: ``len(meta["masks"])``).
    """
    meta = meta or {}
    masks = out.pred_masks[-1][b]
    if task == "panoptic":
        return panoptic_inference(out.class_logits[-1][b], masks, meta["isthing"], size=size, **kw)
    if task == "semantic":
        return semantic_inference(out.class_logits[-1][b], masks, size=size).argmax(0)
    if task == "instance":
        return instance_inference(out.class_logits[-1][b], masks, size=size, **kw)
    if task == "referring":
        return referring_inference(masks, out.seg_logits[-1][b], out.class_logits[-1][b], size=size, **kw)
    if task in ("region", "cross_image"):
        R = len(meta["masks"]) if "masks" in meta else None
        return region_inference(out.region_logits[-1][b], masks, R, size=size)
    raise ValueError(f"no post-processing for task {task!r}")

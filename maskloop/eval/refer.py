"""Referring-segmentation evaluation: cIoU / gIoU / P@k per split (docs/evaluation.md).

For each batch of (image, expression, mask) the model answers the fixed prompt
"... segment {expr} ... / Sure, [SEG]." (teacher forced, as :meth:`GroundedMLLM.segment` does by
default); the [SEG] hidden state is decoded by SAM2 to mask logits at SAM input size, thresholded
at 0 and compared with the ground-truth mask at the same size (``masks``, nearest-resized from the
original by :class:`~maskloop.data.transforms.SampleTransform`).

    results = evaluate_refer(model, {"shapes_val": ds}, batch_size=32)
    results["shapes_val"]  # {'cIoU': ..., 'gIoU': ..., 'P@0.5': ..., 'n': ...}
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from maskloop.eval.metrics import RefSegMeter, mask_iou


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
    """A sequential, non-dropping DataLoader with the project's collate (at most ``max_samples``)."""
    from maskloop.data.mixture import collate

    if max_samples is not None and max_samples < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(max_samples))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                       num_workers=num_workers, drop_last=False)


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def segment_texts(model, batch: dict, texts: list[str] | None = None, expr=None, feats=None) -> torch.Tensor:
    """(B, G, G) bool masks for the batch's images from ``texts`` (or a ready ``expr`` part).

    ``feats``: the batch's (SAM2 features, image tokens) when already computed (:func:`image_features`)."""
    expr = expr if expr is not None else model.builder.expressions(texts)
    sam_feats, image_feats = feats if feats is not None else (model.sam_features(batch["g_pixel_values"]), None)
    tiled = {"num_tiles": batch["num_tiles"]} if "num_tiles" in batch else {}  # tiled batch (data/tiles.py)
    out = model.segment(batch["pixel_values"], sam_feats, expr, image_feats=image_feats, lm_loss=False, **tiled)
    return out["mask_logits"] > 0


def image_features(model, batch: dict):
    """(SAM2 features, projected image tokens (per tile when the batch is tiled)) of a batch, to segment
    several texts on the same images."""
    return model.sam_features(batch["g_pixel_values"]), model.image_tokens(batch["pixel_values"])


def evaluate_refer(
    model,
    splits,
    batch_size: int = 16,
    max_samples: int | None = None,
    progress: bool = True,
    num_workers: int = 0,
) -> dict[str, dict[str, float]]:
    """``splits``: a dataset or {name: dataset} of items with ``expression`` and ``masks``.

    Returns {split: RefSegMeter.compute()} (cIoU, gIoU, P@0.5..0.9, n, empty_pred_frac, ...).
    """
    from tqdm.auto import tqdm

    if not isinstance(splits, Mapping):
        splits = {getattr(splits, "name", "refer"): splits}
    dev = model_device(model)
    results: dict[str, dict[str, float]] = {}
    with eval_mode(model):
        for name, ds in splits.items():
            meter = RefSegMeter()
            dl = loader(ds, batch_size, num_workers, max_samples)
            for batch in tqdm(dl, desc=f"eval refer {name}", disable=not progress, dynamic_ncols=True, leave=False):
                batch = to_device(batch, dev)
                pred = segment_texts(model, batch, list(batch["expression"]))
                meter.update(pred.cpu(), batch["masks"].cpu() > 0.5)
            results[name] = meter.compute()
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


__all__ = ["evaluate_refer", "evaluate_text_sensitivity", "eval_mode", "image_features", "loader", "model_device",
           "segment_texts", "to_device"]

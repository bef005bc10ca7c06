"""Video object segmentation metrics as DAVIS-2017's evaluation defines them: J, F and J&F.

* **J** (region similarity): the Jaccard index |P ∩ G| / |P ∪ G| of one frame; an empty union
  (both masks empty) counts as 1.
* **F** (boundary accuracy): the boundaries of both masks are the 1-pixel maps of DAVIS's ``seg2bmap``
  (a pixel is boundary when it differs from its right, lower or lower-right neighbour; the last row
  compares with the right neighbour only, the last column with the lower one, the corner is never
  boundary).  A boundary pixel of one mask is matched when a boundary pixel of the other lies within
  a disk of radius ``ceil(bound_th * diagonal)`` pixels (``bound_th = 0.008``; the disk is
  ``x² + y² <= r²``, as skimage's ``disk``).  Precision = matched predicted / predicted boundary pixels,
  recall = matched ground-truth / ground-truth boundary pixels, F = 2PR / (P + R) (0 when P + R = 0).
  Empty boundaries: none predicted and some in the truth -> P = 1, R = 0; the reverse -> P = 0, R = 1;
  neither -> P = R = 1.  (By these rules a mask covering the whole frame has no boundary pixel, so
  such a mask scores F = 1 against an empty one — DAVIS's behaviour, kept.)
* Per expression (one object through a video), J and F are the means over its frames; J&F is their
  mean.  A split's J, F and J&F are the means over its expressions (what Ref-DAVIS17, MeViS and ReVOS
  papers report).

The disk dilation is computed exactly through a Euclidean distance transform (a pixel is within the
dilated boundary iff its squared distance to the nearest boundary pixel is <= r²).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

BOUND_TH = 0.008


def db_iou(gt: np.ndarray, pred: np.ndarray) -> np.ndarray | float:
    """J for one frame (H, W) -> float, or for frames (T, H, W) -> (T,).  Empty union -> 1."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    inter = (gt & pred).sum(axis=(-2, -1))
    union = (gt | pred).sum(axis=(-2, -1))
    j = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return float(j) if j.ndim == 0 else j


def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) bool 1-pixel boundary map, DAVIS's ``seg2bmap`` at the mask's own size."""
    seg = np.asarray(mask, bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def bound_pixels(shape: tuple[int, int], bound_th: float = BOUND_TH) -> int:
    """The match tolerance in pixels: ``bound_th`` itself when >= 1, else ceil(bound_th * diagonal)."""
    return int(bound_th) if bound_th >= 1 else int(math.ceil(bound_th * math.hypot(*shape)))


def _dilate_disk(b: np.ndarray, r: int) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt

    if not b.any():
        return np.zeros_like(b)
    d2 = distance_transform_edt(~b) ** 2
    return d2 <= r * r + 0.5


def f_measure(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """F for one frame (H, W)."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    r = bound_pixels(gt.shape, bound_th)
    fg_b, gt_b = seg2bmap(pred), seg2bmap(gt)
    n_fg, n_gt = int(fg_b.sum()), int(gt_b.sum())
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = float((fg_b & _dilate_disk(gt_b, r)).sum()) / n_fg
        recall = float((gt_b & _dilate_disk(fg_b, r)).sum()) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def db_boundary(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> np.ndarray | float:
    """F for one frame (H, W) -> float, or per frame for (T, H, W) -> (T,)."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.ndim == 2:
        return f_measure(gt, pred, bound_th)
    if gt.ndim != 3:
        raise ValueError(f"masks must be (H, W) or (T, H, W), got {gt.shape}")
    return np.array([f_measure(g, p, bound_th) for g, p in zip(gt, pred)])


def jf_expression(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """One expression's frames (T, H, W) -> {'J', 'F', 'J&F'} (means over frames)."""
    j = float(np.mean(db_iou(gt, pred)))
    f = float(np.mean(db_boundary(gt, pred)))
    return {"J": j, "F": f, "J&F": (j + f) / 2}


@dataclass
class JFMeter:
    """Accumulates per-expression J / F; :meth:`summary` gives the split means."""

    per_expression: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, key: str, gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        if key in self.per_expression:
            raise ValueError(f"expression {key!r} was already scored")
        res = jf_expression(gt, pred)
        self.per_expression[key] = res
        return res

    def summary(self) -> dict[str, float]:
        n = len(self.per_expression)
        if n == 0:
            return {"J": float("nan"), "F": float("nan"), "J&F": float("nan"), "n": 0}
        out = {k: float(np.mean([r[k] for r in self.per_expression.values()])) for k in ("J", "F", "J&F")}
        out["n"] = n
        return out


__all__ = ["BOUND_TH", "JFMeter", "bound_pixels", "db_boundary", "db_iou", "f_measure", "jf_expression", "seg2bmap"]

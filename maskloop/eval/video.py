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
    """Accumulates per-expression J / F (with the split each is reported under); :meth:`summary`
    gives the means over expressions, per group and overall."""

    per_expression: dict[str, dict[str, float]] = field(default_factory=dict)
    group_of: dict[str, str] = field(default_factory=dict)

    def add_scores(self, key: str, j: float, f: float, group: str = "all") -> dict[str, float]:
        if key in self.per_expression:
            raise ValueError(f"expression {key!r} was already scored")
        res = {"J": float(j), "F": float(f), "J&F": (float(j) + float(f)) / 2}
        self.per_expression[key] = res
        self.group_of[key] = group
        return res

    def add(self, key: str, gt: np.ndarray, pred: np.ndarray, group: str = "all") -> dict[str, float]:
        r = jf_expression(gt, pred)
        return self.add_scores(key, r["J"], r["F"], group)

    def summary(self, group: str | None = None) -> dict[str, float]:
        rows = [r for k, r in self.per_expression.items() if group is None or self.group_of[k] == group]
        if not rows:
            return {"J": float("nan"), "F": float("nan"), "J&F": float("nan"), "n": 0}
        out = {k: float(np.mean([r[k] for r in rows])) for k in ("J", "F", "J&F")}
        out["n"] = len(rows)
        return out

    def by_group(self) -> dict[str, dict[str, float]]:
        """``{group: summary}`` for each group, plus ``overall`` when there is more than one group."""
        groups = sorted(set(self.group_of.values()))
        out = {g: self.summary(g) for g in groups}
        if len(groups) != 1:
            out["overall"] = self.summary()
        return out


def evaluate_video_dataset(dataset, segment, submission_dir=None, max_videos: int | None = None) -> dict:
    """Score a referring video reader (:class:`~maskloop.data.sources.rvos.RVOSDataset`).

    ``segment(frame_at, frames, num_frames, texts)`` yields ``(t, masks (n_texts, H, W) bool)`` for
    t = 0, 1, ... (:meth:`maskloop.model.video.VideoSegmenter.segment`); all expressions of one video go
    in one call.  Per expression, J and F are averaged over its frames (every frame, as MeViS's and
    ReVOS's scripts do).  With ``submission_dir`` the masks are also written in the server layout.
    A video whose frames or masks cannot be read is counted in ``dataset.skip_counts()`` and left out.
    Returns ``{"groups": {group: {J, F, J&F, n}}, "per_expression": {...}, "skipped": {...}}``.
    """
    from maskloop.data.robust import SampleError
    from maskloop.data.sources.rvos import write_submission_masks

    by_video: dict[str, list] = {}
    for e in dataset.iter_expressions():
        by_video.setdefault(e.video, []).append(e)
    meter = JFMeter()
    n_written = 0
    for v, (vid, exps) in enumerate(by_video.items()):
        if max_videos is not None and v >= max_videos:
            break
        e0 = exps[0]
        T = len(e0.frame_names)
        js = [[] for _ in exps]
        fs = [[] for _ in exps]
        try:
            stream = segment(lambda t, e0=e0: dataset.frame(e0, t), lambda e0=e0, T=T: (dataset.frame(e0, t) for t in range(T)),
                             T, [e.text for e in exps])
            for t, masks in stream:
                if submission_dir is not None:
                    for k, e in enumerate(exps):
                        write_submission_masks(submission_dir, e.video, e.exp_id, [e.frame_names[t]], [masks[k]])
                if dataset.has_masks:
                    size = (masks.shape[-1], masks.shape[-2])
                    for k, e in enumerate(exps):
                        gt = dataset.gt_mask(e, t, size)
                        js[k].append(db_iou(gt, masks[k]))
                        fs[k].append(f_measure(gt, masks[k]))
        except SampleError as err:
            dataset.record_bad(err.reason, str(err.key or vid), err.detail)
            continue
        n_written += len(exps)
        if dataset.has_masks:
            for k, e in enumerate(exps):
                meter.add_scores(e.key, float(np.mean(js[k])), float(np.mean(fs[k])), e.group)
    return {"groups": meter.by_group() if dataset.has_masks else {}, "per_expression": meter.per_expression,
            "skipped": dataset.skip_counts(), "expressions": n_written}


def save_frame_strip(frames, pred, path, gt=None, n: int = 6, side: int = 128, more=()):
    """A PNG of ``n`` frames spread over the clip: a row with the predicted masks overlaid (magenta), a row
    for each of ``more`` (other predictions, magenta) and, given ``gt``, a last row with the ground truth
    (cyan).  ``frames``: PIL images or (H, W, 3) arrays; ``pred`` / ``more[i]`` / ``gt``: (T, H, W) bool."""
    from pathlib import Path

    from PIL import Image

    from maskloop.eval.report import GT_COLOR, PRED_COLOR, overlay

    T = len(frames)
    idx = sorted({int(round(x)) for x in np.linspace(0, T - 1, min(n, T))})
    rows = [(pred, PRED_COLOR)] + [(m, PRED_COLOR) for m in more] + ([(gt, GT_COLOR)] if gt is not None else [])
    tiles = []
    for masks, color in rows:
        row = []
        for t in idx:
            im = overlay(np.asarray(frames[t]), masks[t], color)
            scale = side / max(im.size)
            row.append(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.NEAREST))
        tiles.append(row)
    w, h = tiles[0][0].size
    strip = Image.new("RGB", (w * len(idx) + 2 * (len(idx) - 1), h * len(rows) + 2 * (len(rows) - 1)), (255, 255, 255))
    for r, row in enumerate(tiles):
        for c, im in enumerate(row):
            strip.paste(im, (c * (w + 2), r * (h + 2)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path


__all__ = ["save_frame_strip", "BOUND_TH", "JFMeter", "evaluate_video_dataset", "bound_pixels", "db_boundary", "db_iou", "f_measure", "jf_expression", "seg2bmap"]

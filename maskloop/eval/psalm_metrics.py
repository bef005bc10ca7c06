"""Segmentation metrics for the PSALM family: PQ, mIoU, mask AP, cIoU/gIoU, region mIoU.

* PQ follows the panopticapi convention: segments match when IoU > 0.5 and the category is
  the same; the union excludes the prediction's pixels on void (id 0) ground truth; an
  unmatched prediction counts as a false positive only if at most half of it lies on void
  or crowd pixels; crowd ground truth is never a false negative. PQ / SQ / RQ are averaged
  over categories that occur (TP + FP + FN > 0), for All, Things and Stuff.
* mIoU from a confusion matrix over pixels (``ignore_index`` pixels skipped), averaged over
  classes with a non-empty union.
* Mask AP through pycocotools' COCOeval (iouType ``segm``) on in-memory COCO dicts with RLE.
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict

import numpy as np
import torch

__all__ = ["PQAccumulator", "SemanticConfusion", "instance_ap", "refer_iou", "region_miou"]

_OFFSET = 256 * 256 * 256


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class PQAccumulator:
    """Panoptic quality over a dataset.

    ``categories``: {category_id: isthing}. Each ``add`` takes an id map (H, W) and its
    segment list for prediction and ground truth; segment dicts carry ``id``,
    ``category_id`` and (ground truth, optional) ``iscrowd``. Id 0 is void.
    """

    def __init__(self, categories: dict[int, bool]):
        self.categories = dict(categories)
        self.stats = defaultdict(lambda: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})

    def add(self, pred_map, pred_segments: list[dict], gt_map, gt_segments: list[dict]) -> None:
        pred_map = _np(pred_map).astype(np.int64)
        gt_map = _np(gt_map).astype(np.int64)
        gt_segs = {s["id"]: dict(s) for s in gt_segments}
        pred_segs = {s["id"]: dict(s) for s in pred_segments}
        for segs, m in ((gt_segs, gt_map), (pred_segs, pred_map)):
            ids, counts = np.unique(m, return_counts=True)
            area = dict(zip(ids.tolist(), counts.tolist()))
            for sid, s in segs.items():
                if s["category_id"] not in self.categories:
                    raise KeyError(f"segment {sid} has category {s['category_id']} not in the category list")
                s["area"] = area.get(sid, 0)
        joint, counts = np.unique(gt_map * _OFFSET + pred_map, return_counts=True)
        inter = {(int(j) // _OFFSET, int(j) % _OFFSET): int(c) for j, c in zip(joint, counts)}

        gt_matched, pred_matched = set(), set()
        for (gid, pid), n in inter.items():
            if gid not in gt_segs or pid not in pred_segs:
                continue
            g, p = gt_segs[gid], pred_segs[pid]
            if g.get("iscrowd", 0) or g["category_id"] != p["category_id"]:
                continue
            union = p["area"] + g["area"] - n - inter.get((0, pid), 0)
            iou = n / union
            if iou > 0.5:
                st = self.stats[g["category_id"]]
                st["tp"] += 1
                st["iou"] += iou
                gt_matched.add(gid)
                pred_matched.add(pid)

        crowd_by_cat = {}
        for gid, g in gt_segs.items():
            if g.get("iscrowd", 0):
                crowd_by_cat[g["category_id"]] = gid
            elif gid not in gt_matched:
                self.stats[g["category_id"]]["fn"] += 1
        for pid, p in pred_segs.items():
            if pid in pred_matched or p["area"] == 0:
                continue
            ignored = inter.get((0, pid), 0)
            if p["category_id"] in crowd_by_cat:
                ignored += inter.get((crowd_by_cat[p["category_id"]], pid), 0)
            if ignored / p["area"] > 0.5:
                continue
            self.stats[p["category_id"]]["fp"] += 1

    def compute(self) -> dict:
        per_class = {}
        for cat, st in self.stats.items():
            tp, fp, fn = st["tp"], st["fp"], st["fn"]
            if tp + fp + fn == 0:
                continue
            sq = st["iou"] / tp if tp else 0.0
            rq = tp / (tp + 0.5 * fp + 0.5 * fn)
            per_class[cat] = {"pq": sq * rq, "sq": sq, "rq": rq, "tp": tp, "fp": fp, "fn": fn}
        result = {"per_class": per_class}
        for name, sel in (("All", None), ("Things", True), ("Stuff", False)):
            cats = [c for c in per_class if sel is None or self.categories[c] == sel]
            n = len(cats)
            result[name] = {
                k: (sum(per_class[c][k] for c in cats) / n if n else 0.0) for k in ("pq", "sq", "rq")
            }
            result[name]["n"] = n
        return result


class SemanticConfusion:
    """Confusion-matrix mIoU for semantic segmentation."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.n = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)  # [gt, pred]

    def add(self, pred, gt) -> None:
        pred = _np(pred).astype(np.int64).ravel()
        gt = _np(gt).astype(np.int64).ravel()
        keep = (gt != self.ignore_index) & (gt >= 0) & (gt < self.n)
        pred, gt = pred[keep], gt[keep]
        if ((pred < 0) | (pred >= self.n)).any():
            raise ValueError(f"predicted class outside [0, {self.n})")
        self.matrix += np.bincount(gt * self.n + pred, minlength=self.n * self.n).reshape(self.n, self.n)

    def compute(self) -> dict:
        """detectron2's ``SemSegEvaluator``: mIoU over the classes with ground-truth pixels (a class only
        predicted lowers the IoU of the classes it was predicted on, but is not averaged itself)."""
        tp = np.diag(self.matrix).astype(np.float64)
        pos_gt = self.matrix.sum(1)
        union = pos_gt + self.matrix.sum(0) - tp
        valid = (pos_gt > 0) & (union > 0)
        iou = np.where(valid, tp / np.maximum(union, 1), np.nan)
        total = self.matrix.sum()
        return {
            "miou": float(np.mean(iou[valid])) if valid.any() else 0.0,
            "per_class_iou": iou.tolist(),
            "pixel_acc": float(tp.sum() / total) if total else 0.0,
        }


def instance_ap(gts: list[dict], preds: list[dict], category_ids: list[int] | None = None) -> dict:
    """COCO mask AP.

    gts: per image {"masks": (N, H, W) bool, "labels": (N,), optional "iscrowd": (N,)};
    preds: per image {"masks": (M, H, W) bool, "labels": (M,), "scores": (M,)}.
    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl"} in [0, 1] (-1 where undefined).
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    cats = set(category_ids or [])
    for img_id, (g, p) in enumerate(zip(gts, preds), start=1):
        gm = _np(g["masks"]).astype(bool)
        h, w = gm.shape[-2:]
        images.append({"id": img_id, "height": int(h), "width": int(w)})
        crowd = _np(g.get("iscrowd", np.zeros(len(gm)))).astype(int)
        for m, lab, cr in zip(gm, _np(g["labels"]).tolist(), crowd.tolist()):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append({
                "id": len(anns) + 1, "image_id": img_id, "category_id": int(lab), "segmentation": rle,
                "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": int(cr),
            })
            cats.add(int(lab))
        pm = _np(p["masks"]).astype(bool)
        for m, lab, s in zip(pm, _np(p["labels"]).tolist(), _np(p["scores"]).tolist()):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            dets.append({"image_id": img_id, "category_id": int(lab), "segmentation": rle, "score": float(s)})
            cats.add(int(lab))
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    if not anns:
        return dict.fromkeys(keys, -1.0)
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in sorted(cats)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        if not dets:
            return dict.fromkeys(keys, 0.0)
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(keys, ev.stats[:6])}


def refer_iou(preds, gts) -> dict:
    """Referring segmentation: cIoU = sum I / sum U over the split, gIoU = mean per-sample IoU.

    preds, gts: iterables of (H, W) bool masks (or one (N, H, W) array each)."""
    inter_sum = union_sum = 0
    ious = []
    for p, g in zip(preds, gts):
        p, g = _np(p).astype(bool), _np(g).astype(bool)
        i, u = int((p & g).sum()), int((p | g).sum())
        inter_sum += i
        union_sum += u
        ious.append(i / u if u else 1.0)  # both empty: a perfect answer
    return {"ciou": inter_sum / union_sum if union_sum else 0.0,
            "giou": float(np.mean(ious)) if ious else 0.0}


def region_miou(preds, gts) -> float:
    """Region (visual-prompt) segmentation: mean IoU over regions."""
    return refer_iou(preds, gts)["giou"]

"""Mask metrics: referring-segmentation cIoU / gIoU / precision@k and cycle IoU.

Conventions (the same for every meter in this module):

* Masks are binary tensors ``(B, H, W)`` (a single ``(H, W)`` mask is accepted too).
  Non-bool inputs are binarised with ``> 0``; pass probabilities through your own
  threshold first. Prediction and ground truth must already have the same size
  (evaluate at the ground-truth resolution).
* Per-sample IoU = |P ∩ G| / |P ∪ G|. When **both** P and G are empty the sample
  counts as a perfect match, IoU = 1.0 (the GRES / ReLA gIoU convention for no-target
  expressions); an empty prediction against a non-empty ground truth has IoU = 0.
* **cIoU** = Σ_i |P_i ∩ G_i| / Σ_i |P_i ∪ G_i| over the whole split (cumulative IoU, the
  number RefCOCO papers report as "cIoU" / "oIoU"). A both-empty sample adds 0 to both
  sums, so it does not move cIoU.  A split whose unions are all empty reports cIoU 0.0, as
  Sa2VA's evaluation computes it (Σ I / (Σ U + 1e-10)), in every meter here and in
  :func:`maskloop.eval.psalm_metrics.refer_iou`.
* **gIoU** = mean over samples of the per-sample IoU (a.k.a. mIoU in LAVT-style code).
* **P@t** = fraction of samples with per-sample IoU >= t, t in {0.5, 0.6, 0.7, 0.8, 0.9}.
* All numbers are fractions in [0, 1] (multiply by 100 for paper-style percentages).
  A meter that saw no sample reports NaN.

Distributed evaluation: every meter keeps only sums and counts. ``state()`` returns them
as one float64 vector; all-reduce it (SUM) across ranks and load it back with
``load_state()`` (or call ``all_reduce_()``, which does both through
``torch.distributed`` when it is initialised). ``merge(other)`` adds another meter's
sums in place, e.g. to combine per-worker meters without a process group.
"""

from __future__ import annotations

import torch

PRECISION_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


def _as_batched_bool(x: torch.Tensor, name: str) -> torch.Tensor:
    """(H, W) or (B, H, W), any dtype -> (B, H, W) bool."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, H, W) or (H, W), got {tuple(x.shape)}")
    return x if x.dtype == torch.bool else x > 0


def intersection_union(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample pixel counts |P ∩ G| and |P ∪ G| as int64 tensors of shape (B,)."""
    p = _as_batched_bool(pred, "pred")
    g = _as_batched_bool(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(
            f"prediction {tuple(p.shape)} and ground truth {tuple(g.shape)} differ in shape; "
            "resize the prediction to the ground-truth size before scoring"
        )
    inter = (p & g).flatten(1).sum(1, dtype=torch.int64)
    union = (p | g).flatten(1).sum(1, dtype=torch.int64)
    return inter, union


def _iou_parts(a: torch.Tensor, b: torch.Tensor, empty_iou: float = 1.0):
    """(inter (B,), union (B,), iou (B,) float64) with ``empty_iou`` where both masks are empty."""
    inter, union = intersection_union(a, b)
    iou = inter.double() / union.clamp(min=1).double()
    return inter, union, torch.where(union == 0, torch.full_like(iou, float(empty_iou)), iou)


def mask_iou(a: torch.Tensor, b: torch.Tensor, empty_iou: float = 1.0) -> torch.Tensor:
    """Per-sample IoU of two binary masks, (B, H, W) x (B, H, W) -> (B,) float64.

    Both masks empty -> ``empty_iou`` (1.0 by the gIoU convention). Symmetric in a, b.
    """
    return _iou_parts(a, b, empty_iou)[2]


class _SumMeter:
    """A named vector of float64 sums, mergeable and all-reducible."""

    FIELDS: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._s = torch.zeros(len(self.FIELDS), dtype=torch.float64)

    def _add(self, **values: float | torch.Tensor) -> None:
        for k, v in values.items():
            self._s[self.FIELDS.index(k)] += float(v)

    def _get(self, k: str) -> float:
        return float(self._s[self.FIELDS.index(k)])

    def reset(self) -> None:
        self._s.zero_()

    def state(self) -> torch.Tensor:
        """The meter's sums as a float64 vector (a copy), ready for all_reduce(SUM)."""
        return self._s.clone()

    def load_state(self, state: torch.Tensor) -> None:
        state = torch.as_tensor(state, dtype=torch.float64).detach().cpu().flatten()
        if state.numel() != len(self.FIELDS):
            raise ValueError(
                f"{type(self).__name__} state has {len(self.FIELDS)} entries, got {state.numel()}"
            )
        self._s = state.clone()

    def merge(self, other: _SumMeter) -> _SumMeter:
        """Add ``other``'s sums into this meter (in place); returns self."""
        if type(other) is not type(self) or other.FIELDS != self.FIELDS:
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        self._s += other._s
        return self

    def all_reduce_(self, device: torch.device | str | None = None) -> _SumMeter:
        """Sum the meter over all ranks of the default process group (no-op without one).

        ``device``: where the reduction tensor lives (use the rank's CUDA device under
        NCCL); defaults to CPU, which works with gloo.
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = self._s.to(device or "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            self._s = t.cpu()
        return self

    @property
    def count(self) -> int:
        return int(self._get("n"))


class RefSegMeter(_SumMeter):
    """Referring-segmentation meter: cIoU, gIoU and precision@{0.5..0.9}.

    >>> m = RefSegMeter()
    >>> m.update(pred_masks > 0, gt_masks.bool())   # (B, H, W) each
    >>> m.compute()  # {'cIoU': ..., 'gIoU': ..., 'P@0.5': ..., ..., 'n': ...}
    """

    FIELDS = (
        "inter", "union", "iou_sum", "n", "n_empty_pred", "n_empty_gt",
        *(f"hit@{t}" for t in PRECISION_THRESHOLDS), "n_no_seg",
    )

    @torch.no_grad()
    def add_no_seg(self, gt: torch.Tensor, policy: str = "sa2va") -> None:
        """Count samples whose answer held no ``[SEG]`` (so no mask), ``gt`` (B, H, W) or (H, W).

        ``policy="sa2va"`` (Sa2VA's ``RESDataset.evaluate``): the sample counts in ``n`` with IoU 0 (gIoU,
        P@k) and adds nothing to the cIoU sums.  ``policy="empty"``: scored as an empty predicted mask.
        """
        g = _as_batched_bool(gt, "gt")
        if policy == "empty":
            self.update(torch.zeros_like(g), g)
        elif policy == "sa2va":
            self._add(n=g.shape[0], n_empty_pred=g.shape[0], n_empty_gt=(~g.flatten(1).any(1)).sum())
        else:
            raise ValueError(f"unknown no-[SEG] policy {policy!r}; choose 'sa2va' or 'empty'")
        self._add(n_no_seg=g.shape[0])

    @torch.no_grad()
    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Add a batch; returns its per-sample IoU (B,) (float64, CPU)."""
        p = _as_batched_bool(pred, "pred")
        g = _as_batched_bool(gt, "gt")
        inter, union, iou = _iou_parts(p, g)
        iou = iou.cpu()
        self._add(
            inter=inter.sum(),
            union=union.sum(),
            iou_sum=iou.sum(),
            n=iou.numel(),
            n_empty_pred=(~p.flatten(1).any(1)).sum(),
            n_empty_gt=(~g.flatten(1).any(1)).sum(),
        )
        for t in PRECISION_THRESHOLDS:
            self._add(**{f"hit@{t}": (iou >= t).sum()})
        return iou

    def compute(self) -> dict[str, float]:
        n = self._get("n")
        union = self._get("union")
        nan = float("nan")
        out = {
            # All unions empty: 0.0 as Sa2VA's evaluation (Σ I / (Σ U + 1e-10)).
            "cIoU": (self._get("inter") / union) if union > 0 else (0.0 if n > 0 else nan),
            "gIoU": self._get("iou_sum") / n if n > 0 else nan,
        }
        for t in PRECISION_THRESHOLDS:
            out[f"P@{t}"] = self._get(f"hit@{t}") / n if n > 0 else nan
        out["n"] = int(n)
        out["empty_pred_frac"] = self._get("n_empty_pred") / n if n > 0 else nan
        out["empty_gt_frac"] = self._get("n_empty_gt") / n if n > 0 else nan
        out["no_seg_frac"] = self._get("n_no_seg") / n if n > 0 else nan
        return out


class CycleMeter(_SumMeter):
    """Cycle consistency IoU(mask, segment(describe(mask))).

    ``update(source_mask, reseg_mask)`` with (B, H, W) binary masks. Reports
    ``cycle_mIoU`` (mean per-sample IoU, same empty-empty convention as gIoU),
    ``cycle_cIoU`` (Σ I / Σ U), ``empty_reseg_frac`` (fraction of samples whose
    re-segmentation is empty) and ``n``.
    """

    FIELDS = ("inter", "union", "iou_sum", "n", "n_empty_reseg")

    @torch.no_grad()
    def update(self, source_mask: torch.Tensor, reseg_mask: torch.Tensor) -> torch.Tensor:
        src = _as_batched_bool(source_mask, "source_mask")
        res = _as_batched_bool(reseg_mask, "reseg_mask")
        inter, union, iou = _iou_parts(res, src)
        iou = iou.cpu()
        self._add(
            inter=inter.sum(),
            union=union.sum(),
            iou_sum=iou.sum(),
            n=iou.numel(),
            n_empty_reseg=(~res.flatten(1).any(1)).sum(),
        )
        return iou

    def compute(self) -> dict[str, float]:
        n = self._get("n")
        union = self._get("union")
        nan = float("nan")
        return {
            "cycle_mIoU": self._get("iou_sum") / n if n > 0 else nan,
            "cycle_cIoU": (self._get("inter") / union) if union > 0 else (0.0 if n > 0 else nan),
            "empty_reseg_frac": self._get("n_empty_reseg") / n if n > 0 else nan,
            "n": int(n),
        }


__all__ = [
    "PRECISION_THRESHOLDS",
    "CycleMeter",
    "RefSegMeter",
    "intersection_union",
    "mask_iou",
]

"""PSALM / Mask2Former set losses: Hungarian matching, mask BCE + dice, query classes.

Defaults are Mask2Former's (which PSALM reads from its mask-decoder config): class 2.0,
mask 5.0, dice 5.0, no-object weight 0.1, 12544 training points, oversample 3.0,
importance ratio 0.75, deep supervision over every decoder layer. The three PSALM class
terms (``loss_SEG_class``, ``loss_class_name_class``, ``loss_region_class``) share the
class weight, as in PSALM's weight dict.

Targets: one dict per sample, ``labels`` (N,) long -- the index of the class name (or of
the region, for region / cross-image tasks; 0 for referring) -- and ``masks`` (N, Hm, Wm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .model import PSALMOutput

__all__ = ["LossWeights", "PSALMCriterion", "hungarian_match", "point_sample", "dice_loss", "sigmoid_bce_loss"]


@dataclass
class LossWeights:
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    lm_weight: float = 1.0
    num_points: int | None = 12544  # None: compare whole masks at the prediction's resolution
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True


def point_sample(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W), coords (N, P, 2) normalised (x, y) in [0, 1] -> (N, C, P)."""
    out = F.grid_sample(x, 2.0 * coords[:, :, None] - 1.0, mode="bilinear", align_corners=False)
    return out[..., 0]


def uncertain_point_coords(logits: torch.Tensor, num_points: int, oversample: float, importance: float,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask2Former point selection: most uncertain (|logit| smallest) of an oversampled set + random.

    logits (N, 1, H, W) -> coords (N, num_points, 2)."""
    N = logits.shape[0]
    n_over = int(num_points * oversample)
    coords = torch.rand(N, n_over, 2, device=logits.device, dtype=logits.dtype, generator=generator)
    unc = -point_sample(logits, coords)[:, 0].abs()  # (N, n_over)
    n_imp = int(importance * num_points)
    idx = unc.topk(n_imp, dim=1).indices
    chosen = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    rand = torch.rand(N, num_points - n_imp, 2, device=logits.device, dtype=logits.dtype, generator=generator)
    return torch.cat([chosen, rand], dim=1)


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """(N, P) each -> mean over points, summed over masks, / num_masks."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    p = logits.sigmoid()
    num = 2 * (p * targets).sum(-1)
    den = p.sum(-1) + targets.sum(-1)
    return (1 - (num + 1) / (den + 1)).sum() / num_masks


def _pair_costs(pred: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pred logits (Nq, P), tgt (N, P) -> pairwise BCE and dice costs (Nq, N)."""
    P = pred.shape[1]
    pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
    neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    bce = (pos @ tgt.T + neg @ (1 - tgt).T) / P
    p = pred.sigmoid()
    dice = 1 - (2 * p @ tgt.T + 1) / (p.sum(-1)[:, None] + tgt.sum(-1)[None, :] + 1)
    return bce, dice


def _mask_points(pred: torch.Tensor, tgt: torch.Tensor, num_points: int | None,
                 coords: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """pred (Nq, h, w), tgt (N, Hm, Wm) -> (Nq, P), (N, P) at shared points (or whole masks)."""
    if num_points is None:
        t = F.interpolate(tgt[:, None].float(), size=pred.shape[-2:], mode="area")[:, 0] if tgt.numel() else \
            tgt.new_zeros((0, *pred.shape[-2:]))
        return pred.flatten(1), t.flatten(1)
    c = coords[None]
    p = point_sample(pred[:, None], c.expand(pred.shape[0], -1, -1))[:, 0]
    t = point_sample(tgt[:, None].float(), c.expand(tgt.shape[0], -1, -1))[:, 0]
    return p, t


@torch.no_grad()
def hungarian_match(
    logits: torch.Tensor,  # (B, Nq, K+1)
    pred_masks: torch.Tensor,  # (B, Nq, h, w)
    targets: list[dict],
    w: LossWeights,
    generator: torch.Generator | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample (query indices, target indices) minimising class + mask BCE + dice cost."""
    out = []
    for b, t in enumerate(targets):
        labels, masks = t["labels"], t["masks"]
        if labels.numel() == 0:
            out.append((labels.new_zeros(0), labels.new_zeros(0)))
            continue
        prob = logits[b].float().softmax(-1)  # (Nq, K+1)
        cost_class = -prob[:, labels]
        coords = None
        if w.num_points is not None:
            coords = torch.rand(w.num_points, 2, device=pred_masks.device, generator=generator)
        p, tm = _mask_points(pred_masks[b].float(), masks, w.num_points, coords)
        bce, dice = _pair_costs(p, tm)
        cost = w.class_weight * cost_class + w.mask_weight * bce + w.dice_weight * dice
        qi, ti = linear_sum_assignment(cost.cpu().numpy())
        out.append((torch.as_tensor(qi, dtype=torch.long), torch.as_tensor(ti, dtype=torch.long)))
    return out


class PSALMCriterion:
    """Loss dict and weighted total for one :class:`PSALMOutput` and its targets."""

    def __init__(self, weights: LossWeights | None = None):
        self.w = weights or LossWeights()

    def layer_losses(self, logits, seg_logits, pred_masks, targets, class_key, generator=None):
        w = self.w
        B, Nq, K1 = logits.shape
        dev = logits.device
        matches = hungarian_match(logits, pred_masks, targets, w, generator)
        num_masks = max(sum(int(t["labels"].numel()) for t in targets), 1)

        # query class: matched -> target label, others -> no object (last column)
        target_cls = torch.full((B, Nq), K1 - 1, dtype=torch.long, device=dev)
        matched = torch.zeros(B, Nq, dtype=torch.bool, device=dev)
        for b, (qi, ti) in enumerate(matches):
            target_cls[b, qi.to(dev)] = targets[b]["labels"].to(dev)[ti.to(dev)]
            matched[b, qi.to(dev)] = True
        cls_w = torch.ones(K1, device=dev, dtype=logits.dtype)
        cls_w[-1] = w.no_object_weight
        loss_cls = F.cross_entropy(logits.transpose(1, 2), target_cls, weight=cls_w)

        # [SEG] objectness: BCE, negatives down-weighted like the no-object class
        seg_t = matched.to(seg_logits.dtype)
        seg_w = torch.where(matched, 1.0, w.no_object_weight).to(seg_logits.dtype)
        loss_seg = (F.binary_cross_entropy_with_logits(seg_logits, seg_t, reduction="none") * seg_w).sum() \
            / seg_w.sum()

        # masks of matched pairs (batched across the batch)
        src = torch.cat([pred_masks[b][qi.to(dev)] for b, (qi, _) in enumerate(matches)])  # (M, h, w)
        tgt = [targets[b]["masks"][ti].float() for b, (_, ti) in enumerate(matches)]
        if src.shape[0] == 0:
            zero = pred_masks.sum() * 0.0
            loss_mask = loss_dice = zero
        else:
            if w.num_points is None:
                tgt = torch.cat([F.interpolate(t[:, None], size=src.shape[-2:], mode="area")[:, 0] for t in tgt])
                ps, ts = src.flatten(1), tgt.flatten(1)
            else:
                # targets may differ in size per sample: sample each at its own points
                with torch.no_grad():
                    coords = uncertain_point_coords(src[:, None].detach().float(), w.num_points,
                                                    w.oversample_ratio, w.importance_sample_ratio, generator)
                ts = torch.cat([point_sample(t[:, None], c)[:, 0]
                                for t, c in zip(tgt, coords.split([t.shape[0] for t in tgt]))])
                ps = point_sample(src[:, None], coords.to(src.dtype))[:, 0]
            loss_mask = sigmoid_bce_loss(ps, ts, num_masks)
            loss_dice = dice_loss(ps, ts, num_masks)
        return {class_key: loss_cls, "loss_SEG_class": loss_seg, "loss_mask": loss_mask, "loss_dice": loss_dice}

    def __call__(self, out: PSALMOutput, targets: list[dict], generator: torch.Generator | None = None):
        """-> (total loss, dict of every term unweighted; aux layers suffixed ``_i``)."""
        if out.region_logits is not None:
            logits, key = out.region_logits, "loss_region_class"
        else:
            logits, key = out.class_logits, "loss_class_name_class"
        n = len(out.pred_masks)
        layers = range(n) if self.w.deep_supervision else [n - 1]
        losses: dict[str, torch.Tensor] = {}
        for i in layers:
            li = self.layer_losses(logits[i], out.seg_logits[i], out.pred_masks[i], targets, key, generator)
            suffix = "" if i == n - 1 else f"_{i}"
            losses.update({k + suffix: v for k, v in li.items()})
        weight = {"loss_mask": self.w.mask_weight, "loss_dice": self.w.dice_weight}
        total = sum(v * weight.get(k.rsplit("_", 1)[0] if k[-1].isdigit() else k, self.w.class_weight)
                    for k, v in losses.items())
        if out.lm_loss is not None:
            losses["loss_llm"] = out.lm_loss
            total = total + self.w.lm_weight * out.lm_loss
        return total, losses

"""Mask and language losses (docs/recipes.md; docs/architecture.md, "Losses").

Mask loss = bce_weight * BCE-with-logits + dice_weight * Dice(sigmoid, eps=1), each averaged over
the masks of the batch.  Optionally both are computed on points chosen by importance sampling as in
Mask2Former (``oversample_ratio`` x points drawn uniformly, the ``importance_sample_ratio`` share of
them with the most uncertain logits kept, the rest uniform).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """logits, targets (M, P) -> mean over M of 1 - (2|p.t| + eps) / (|p| + |t| + eps)."""
    p = logits.sigmoid()
    num = 2 * (p * targets).sum(-1)
    den = p.sum(-1) + targets.sum(-1)
    return (1 - (num + eps) / (den + eps)).mean()


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits, targets (M, P) -> mean over masks of the per-pixel mean BCE."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1).mean()


def _point_sample(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """x (M, 1, H, W), coords (M, P, 2) in [0, 1] (x, y) -> (M, P) bilinear samples."""
    return F.grid_sample(x, 2 * coords[:, :, None] - 1, align_corners=False)[:, 0, :, 0]


def sample_points(
    logits: torch.Tensor, num_points: int, oversample_ratio: float, importance_ratio: float, generator=None
) -> torch.Tensor:
    """Mask2Former's uncertainty-based point sampling; logits (M, 1, H, W) -> coords (M, P, 2)."""
    M = logits.shape[0]
    n_over = int(num_points * oversample_ratio)
    coords = torch.rand(M, n_over, 2, device=logits.device, generator=generator)
    uncertainty = -_point_sample(logits.detach().float(), coords).abs()  # (M, n_over)
    n_imp = int(importance_ratio * num_points)
    idx = uncertainty.topk(n_imp, dim=1).indices  # (M, n_imp)
    chosen = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    rest = torch.rand(M, num_points - n_imp, 2, device=logits.device, generator=generator)
    return torch.cat([chosen, rest], 1)


def mask_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    bce_weight: float = 2.0,
    dice_weight: float = 0.5,
    num_points: int | None = None,
    oversample_ratio: float = 3.0,
    importance_ratio: float = 0.75,
    generator=None,
) -> dict[str, torch.Tensor]:
    """logits (M, H, W) (any resolution), targets (M, H', W') {0,1}.

    Without point sampling the logits are bilinearly resized to the target size.  Returns
    ``loss_bce``, ``loss_dice`` (unweighted) and ``loss_mask`` (weighted sum).
    """
    logits = logits.float()
    targets = targets.float()
    if num_points:
        coords = sample_points(logits[:, None], num_points, oversample_ratio, importance_ratio, generator)
        lg = _point_sample(logits[:, None], coords)
        tg = _point_sample(targets[:, None], coords)
    else:
        if logits.shape[-2:] != targets.shape[-2:]:
            logits = F.interpolate(logits[:, None], size=targets.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        lg, tg = logits.flatten(1), targets.flatten(1)
    bce = bce_loss(lg, tg)
    dice = dice_loss(lg, tg)
    return {"loss_bce": bce, "loss_dice": dice, "loss_mask": bce_weight * bce + dice_weight * dice}


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """logits (..., V), labels (...), used (...) bool -> mean CE over the used positions (0 if none).

    The cross-entropy of ``logits[used], labels[used]`` without selecting them (no host synchronisation)."""
    used = used.reshape(-1)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), torch.where(used, labels.reshape(-1), 0),
                         reduction="none")
    return (ce * used).sum() / used.sum().clamp(min=1)

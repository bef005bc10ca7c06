"""Connectors from the Swin feature pyramid into the LLM, region features, visual prompts.

* :class:`SwinConvConnector` (``swin_conv``, PSALM's baseline): res5 -> one strided
  residual conv block -> Linear to the LLM width -> flattened ``<image>`` tokens.
  Its parameter names follow PSALM's ``mm_projector`` (``layer1.0.conv1`` ...,
  ``fc``) so a PSALM checkpoint's ``model.mm_projector.*`` loads as is.
* :class:`DeformableProjector`: task queries z_q attend to the four pyramid levels with
  multi-scale deformable cross-attention -> the ``<image_deform>`` token(s).
* :func:`region_features`: up to 256 points sampled inside each region mask, bilinear
  samples of a feature map there, averaged -> one vector per region.
* ``rasterize_*``: visual prompts (points, scribbles, boxes) -> binary masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .deform_attn import MSDeformAttn

__all__ = [
    "SwinConvConnector",
    "DeformableProjector",
    "flatten_levels",
    "region_features",
    "rasterize_points",
    "rasterize_scribbles",
    "rasterize_boxes",
]


# ------------------------------------------------------------------------------------------
# Baseline connector
# ------------------------------------------------------------------------------------------


class _StridedBlock(nn.Module):
    """Residual block: conv3x3(stride 2)-BN-ReLU-conv3x3-BN (+ 1x1 stride-2 shortcut)."""

    def __init__(self, in_dim: int, out_dim: int, conv2_twice: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_dim)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_dim)
        self.downsample = nn.Sequential(
            nn.Conv2d(in_dim, out_dim, 1, stride=2, bias=False), nn.BatchNorm2d(out_dim)
        )
        # PSALM's released block applies conv2 twice (its non-DCN branch runs conv2 again);
        # released checkpoints were trained that way, so it is the default here.
        self.conv2_twice = conv2_twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        if self.conv2_twice:
            out = self.conv2(out)
        out = self.bn2(out)
        return self.relu(out + self.downsample(x))


class SwinConvConnector(nn.Module):
    """``swin_conv``: res5 (B, C5, h, w) -> ``<image>`` tokens (B, ceil(h/2)*ceil(w/2), llm_dim).

    For a 1024 input, Swin res5 is 32x32 -> 16x16 = 256 tokens. ``mid_dim`` defaults to
    2*C5 (2048 for Swin-B), as in PSALM.
    """

    def __init__(self, in_dim: int = 1024, llm_dim: int = 2048, mid_dim: int | None = None,
                 conv2_twice: bool = True):
        super().__init__()
        mid_dim = mid_dim or 2 * in_dim
        self.layer1 = nn.Sequential(_StridedBlock(in_dim, mid_dim, conv2_twice))
        self.fc = nn.Linear(mid_dim, llm_dim)

    def feature_map(self, res5: torch.Tensor) -> torch.Tensor:
        """(B, C5, h, w) -> (B, llm_dim, h', w'): the map region features are sampled from."""
        x = self.layer1(res5)
        return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, res5: torch.Tensor) -> torch.Tensor:
        x = self.layer1(res5)  # (B, mid, h', w')
        return self.fc(x.flatten(2).transpose(1, 2))  # (B, h'*w', llm_dim)


# ------------------------------------------------------------------------------------------
# Deformable projector
# ------------------------------------------------------------------------------------------


def flatten_levels(levels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(B, C, H_l, W_l)] -> (B, S, C), spatial_shapes (L, 2), level_start_index (L,)."""
    shapes = torch.tensor([x.shape[-2:] for x in levels], dtype=torch.long, device=levels[0].device)
    flat = torch.cat([x.flatten(2).transpose(1, 2) for x in levels], dim=1)
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    return flat, shapes, start


class DeformableProjector(nn.Module):
    """Task queries attend to the Swin pyramid by multi-scale deformable cross-attention.

    z_q (B, Q, query_dim) [+ query_mask (B, Q), True = real query] and the four levels
    [(B, level_dims[l], H_l, W_l)] -> ``<image_deform>`` embeddings:

    * ``pool="mean"`` (default): (B, 1, llm_dim), the masked mean over queries -- one
      ``<image_deform>`` token after the image tokens whatever the number of queries
      (docs/architecture.md: one token added after the image tokens), so the prompt layout does not depend on the task.
    * ``pool="none"``: (B, Q, llm_dim), one token per query.

    Layers: per-level 1x1 conv + GroupNorm to ``hidden``, a learned level embedding, a query
    input projection (``query_dim`` -> hidden; identity when equal), reference points per
    query from z_q (Linear + sigmoid), MSDeformAttn (hidden 256, 8 heads, 4 points per head
    per level), residual + LayerNorm, FFN, and the output projection to ``llm_dim``.
    """

    def __init__(
        self,
        level_dims: tuple[int, ...] = (128, 256, 512, 1024),
        hidden: int = 256,
        n_heads: int = 8,
        n_points: int = 4,
        llm_dim: int = 2048,
        query_dim: int | None = None,
        pool: str = "mean",
        ffn_dim: int | None = None,
        gn_groups: int = 32,
        impl: str = "auto",
    ):
        super().__init__()
        if pool not in ("mean", "none"):
            raise ValueError(f"pool must be 'mean' or 'none', got {pool!r}")
        query_dim = query_dim or llm_dim
        self.pool = pool
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(d, hidden, 1), nn.GroupNorm(min(gn_groups, hidden), hidden))
            for d in level_dims
        )
        self.level_embed = nn.Parameter(torch.zeros(len(level_dims), hidden))
        self.query_proj = nn.Identity() if query_dim == hidden else nn.Linear(query_dim, hidden)
        self.reference_points = nn.Linear(hidden, 2)
        self.attn = MSDeformAttn(hidden, len(level_dims), n_heads, n_points, impl=impl)
        self.norm1 = nn.LayerNorm(hidden)
        ffn_dim = ffn_dim or 4 * hidden
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, hidden))
        self.norm2 = nn.LayerNorm(hidden)
        self.output_proj = nn.Linear(hidden, llm_dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.normal_(self.level_embed, std=0.02)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1.0)
            nn.init.zeros_(proj[0].bias)
        nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
        nn.init.zeros_(self.reference_points.bias)

    def forward(
        self,
        z_q: torch.Tensor,  # (B, Q, query_dim)
        levels: list[torch.Tensor],  # [(B, C_l, H_l, W_l)] res2..res5
        query_mask: torch.Tensor | None = None,  # (B, Q) bool
    ) -> torch.Tensor:
        projected = [proj(x) + emb[None, :, None, None]
                     for proj, x, emb in zip(self.input_proj, levels, self.level_embed)]
        memory, shapes, start = flatten_levels(projected)  # (B, S, hidden)
        q = self.query_proj(z_q)  # (B, Q, hidden)
        with torch.autocast(device_type=q.device.type, enabled=False):  # float32 geometry (see MSDeformAttn)
            ref = F.linear(q.float(), self.reference_points.weight.float(), self.reference_points.bias.float()).sigmoid()
        q = self.norm1(q + self.attn(q, ref, memory, shapes, start))
        q = self.norm2(q + self.ffn(q))
        out = self.output_proj(q)  # (B, Q, llm_dim)
        if self.pool == "none":
            return out
        if query_mask is None:
            return out.mean(1, keepdim=True)
        m = query_mask.to(out.dtype)[..., None]  # (B, Q, 1)
        return (out * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)


# ------------------------------------------------------------------------------------------
# Region features and visual prompts
# ------------------------------------------------------------------------------------------


def region_features(
    feature_map: torch.Tensor,  # (B, C, H, W)
    masks: torch.Tensor,  # (B, R, Hm, Wm) {0,1}
    n_points: int = 256,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # (B, R, C)
    """Mean of bilinear feature samples at up to ``n_points`` random points inside each mask.

    Masks are resized to the feature map (nearest); a region that vanishes at that size
    falls back to every cell it touches (area > 0). Points are uniformly random inside the
    chosen cells (random cell choice without replacement, random offset inside the cell).
    Empty masks give a zero vector. Batched over B and R.
    """
    B, C, H, W = feature_map.shape
    m = masks.float()
    near = F.interpolate(m, size=(H, W), mode="nearest") > 0.5  # (B, R, H, W)
    touch = F.adaptive_avg_pool2d(m, (H, W)) > 0 if (H, W) != m.shape[-2:] else m > 0.5
    empty = ~near.flatten(2).any(-1)  # (B, R)
    cand = torch.where(empty[..., None, None], touch, near).flatten(2)  # (B, R, H*W)
    k = min(n_points, H * W)
    scores = torch.rand(cand.shape, generator=generator, device=cand.device)
    scores = scores.masked_fill(~cand, -1.0)
    top, cell = scores.topk(k, dim=-1)  # (B, R, k)
    valid = (top >= 0).to(feature_map.dtype)
    jitter = torch.rand((*cell.shape, 2), generator=generator, device=cand.device).to(feature_map.dtype)
    x = ((cell % W).to(feature_map.dtype) + jitter[..., 0]) / W  # normalised [0, 1]
    y = ((cell // W).to(feature_map.dtype) + jitter[..., 1]) / H
    grid = torch.stack([x, y], -1) * 2 - 1  # (B, R, k, 2)
    samples = F.grid_sample(feature_map, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # (B, C, R, k) -> masked mean over k
    total = (samples * valid[:, None]).sum(-1)  # (B, C, R)
    count = valid.sum(-1).clamp_min(1.0)  # (B, R)
    return (total / count[:, None]).transpose(1, 2)


def _pixel_grid(size: tuple[int, int], device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = size
    ys = torch.arange(h, device=device, dtype=dtype)
    xs = torch.arange(w, device=device, dtype=dtype)
    return ys.view(h, 1), xs.view(1, w)


def rasterize_points(points: torch.Tensor, size: tuple[int, int], radius: float = 10.0,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """Points (R, K, 2) as pixel (x, y) -> (R, H, W) bool: union of discs of ``radius`` px."""
    ys, xs = _pixel_grid(size, points.device)
    px = points[..., 0].float()[..., None, None]  # (R, K, 1, 1)
    py = points[..., 1].float()[..., None, None]
    inside = (xs - px) ** 2 + (ys - py) ** 2 <= radius**2  # (R, K, H, W)
    if valid is not None:
        inside = inside & valid[..., None, None]
    return inside.any(1)


def rasterize_scribbles(polylines: torch.Tensor, size: tuple[int, int], radius: float = 5.0,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """Polylines (R, K, 2) pixel (x, y) -> (R, H, W) bool: every segment thickened by ``radius``.

    ``valid`` (R, K) marks real vertices (a padded polyline ends at its last valid vertex);
    a polyline with one vertex is a disc.
    """
    ys, xs = _pixel_grid(size, polylines.device)
    p = polylines.float()
    if valid is None:
        valid = torch.ones(p.shape[:2], dtype=torch.bool, device=p.device)
    a, b = p[:, :-1], p[:, 1:]  # (R, K-1, 2) segment ends
    seg_ok = valid[:, :-1] & valid[:, 1:]
    d = b - a
    len2 = (d**2).sum(-1).clamp_min(1e-12)[..., None, None]  # (R, K-1, 1, 1)
    ax, ay = a[..., 0][..., None, None], a[..., 1][..., None, None]
    dx, dy = d[..., 0][..., None, None], d[..., 1][..., None, None]
    t = (((xs - ax) * dx + (ys - ay) * dy) / len2).clamp(0, 1)
    dist2 = (xs - ax - t * dx) ** 2 + (ys - ay - t * dy) ** 2  # (R, K-1, H, W)
    segs = ((dist2 <= radius**2) & seg_ok[..., None, None]).any(1)
    return segs | rasterize_points(p, size, radius, valid)


def rasterize_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boxes (R, 4) pixel xyxy -> (R, H, W) bool filled rectangles (pixel centres inside)."""
    ys, xs = _pixel_grid(size, boxes.device)
    b = boxes.float()[..., None, None]
    cx, cy = xs + 0.5, ys + 0.5
    return (cx >= b[:, 0]) & (cx <= b[:, 2]) & (cy >= b[:, 1]) & (cy <= b[:, 3])

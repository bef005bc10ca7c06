"""Multi-scale deformable attention (Deformable DETR convention).

Three implementations of the same sampling operator, picked by :func:`ms_deform_attn`:

* :func:`ms_deform_attn_reference` -- pure PyTorch, one ``F.grid_sample`` per level
  (bilinear, zero padding, ``align_corners=False``). The ground truth.
* :func:`ms_deform_attn_gather` -- pure PyTorch, no ``grid_sample``: the four bilinear
  corners of every sampling point of every level are turned into flat indices into the
  concatenated value tensor; the bilinear and attention weights are folded into one
  weight per corner, and one ``F.embedding_bag`` (mode sum, per-sample weights) gathers
  and contracts them without materialising the (N, K, Dh) corner tensor. Faster than the reference on CPU; differentiable by autograd.
* :func:`ms_deform_attn_triton` -- our own Triton kernels (forward and backward), used on
  CUDA when ``triton`` imports. ``triton`` is imported lazily (see ``_triton_kernels``).

Shapes (all three):
    value               (B, S, H, Dh)      S = sum_l H_l * W_l, levels concatenated
    spatial_shapes      (L, 2) long        (H_l, W_l) per level
    level_start_index   (L,) long          offset of level l in S
    sampling_locations  (B, Q, H, L, P, 2) normalised (x, y) in [0, 1]
    attention_weights   (B, Q, H, L, P)    already softmaxed over L*P
    -> output           (B, Q, H * Dh)     head-major channel order

Pixel convention (``align_corners=False``): location ``u`` on a level of width ``W`` is the
continuous pixel coordinate ``x = u * W - 0.5``; corners outside the map read zero.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "ms_deform_attn_gather",
    "ms_deform_attn_triton",
    "triton_available",
    "MSDeformAttn",
]


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """grid_sample reference. See the module docstring for shapes. With a half / bfloat16
    ``value`` and float32 locations, samples in float32 and returns ``value``'s dtype."""
    if value.dtype != sampling_locations.dtype:
        out = ms_deform_attn_reference(value.to(sampling_locations.dtype), spatial_shapes, level_start_index,
                                       sampling_locations, attention_weights.to(sampling_locations.dtype))
        return out.to(value.dtype)
    B, S, H, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2.0 * sampling_locations - 1.0  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (B, h*w, H, Dh) -> (B*H, Dh, h, w)
        v = value_list[lvl].permute(0, 2, 3, 1).reshape(B * H, Dh, h, w)
        # (B, Q, H, P, 2) -> (B*H, Q, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * H, Q, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*H, Dh, Q, L, P) * (B*H, 1, Q, L, P)
    stacked = torch.stack(sampled, dim=-2)
    w = attention_weights.transpose(1, 2).reshape(B * H, 1, Q, L, P)
    out = (stacked * w).sum(dim=(-1, -2))  # (B*H, Dh, Q)
    return out.view(B, H * Dh, Q).transpose(1, 2).contiguous()


def _corner_indices_and_weights(
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat value row (within one (b, h) slice) and weight of each bilinear corner.

    Returns idx (B, Q, H, L, P, 4) long and weight (B, Q, H, L, P, 4), where weight already
    includes the attention weight and is zero for corners outside the map.
    """
    dtype = sampling_locations.dtype
    hw = spatial_shapes.to(dtype)
    lvl_h = hw[:, 0].view(1, 1, 1, -1, 1)  # (1,1,1,L,1)
    lvl_w = hw[:, 1].view(1, 1, 1, -1, 1)
    x = sampling_locations[..., 0] * lvl_w - 0.5  # (B,Q,H,L,P)
    y = sampling_locations[..., 1] * lvl_h - 0.5
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    fx = x - x0  # differentiable: d fx / d x = 1
    fy = y - y0
    x0 = x0.detach().long()
    y0 = y0.detach().long()
    w_int = spatial_shapes[:, 1].view(1, 1, 1, -1, 1)
    h_int = spatial_shapes[:, 0].view(1, 1, 1, -1, 1)
    start = level_start_index.view(1, 1, 1, -1, 1)

    xs = torch.stack([x0, x0 + 1, x0, x0 + 1], dim=-1)  # (B,Q,H,L,P,4)
    ys = torch.stack([y0, y0, y0 + 1, y0 + 1], dim=-1)
    bw = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], dim=-1)
    valid = (xs >= 0) & (xs < w_int[..., None]) & (ys >= 0) & (ys < h_int[..., None])
    idx = start[..., None] + ys.clamp_min(0) * w_int[..., None] + xs.clamp_min(0)
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    weight = bw * valid.to(dtype) * attention_weights[..., None]
    return idx, weight


def ms_deform_attn_gather(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Vectorised gather implementation (no grid_sample): one index_select over all levels.

    Half / bfloat16 inputs are summed in float32 (CUDA's embedding_bag has no bfloat16 backward
    for the per-sample weights); the output has ``value``'s dtype."""
    if value.dtype in (torch.float16, torch.bfloat16) or sampling_locations.dtype != value.dtype:
        f32 = torch.float32
        out = ms_deform_attn_gather(value.to(f32), spatial_shapes, level_start_index, sampling_locations.to(f32),
                                    attention_weights.to(f32))
        return out.to(value.dtype)
    B, S, H, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    idx, weight = _corner_indices_and_weights(
        spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    K = L * P * 4
    # rows of value viewed as (B*H*S, Dh); row of (b, h, s) = (b*H + h)*S + s
    value_rows = value.permute(0, 2, 1, 3).reshape(B * H * S, Dh)
    bh = torch.arange(B * H, device=value.device).view(B, 1, H, 1) * S  # (B,1,H,1)
    flat = (idx.reshape(B, Q, H, K) + bh).permute(0, 2, 1, 3).reshape(-1)  # (B*H*Q*K,)
    w = weight.reshape(B, Q, H, K).permute(0, 2, 1, 3).reshape(B * H * Q, K)
    # embedding_bag = weighted sum of K gathered rows without materialising (N, K, Dh);
    # differentiable w.r.t. the rows (value) and the per-sample weights.
    out = F.embedding_bag(
        flat.view(B * H * Q, K), value_rows, per_sample_weights=w.to(value.dtype), mode="sum"
    ).view(B, H, Q, Dh)
    return out.permute(0, 2, 1, 3).reshape(B, Q, H * Dh)


# --------------------------------------------------------------------------------------------
# Triton fast path (CUDA). Kernels are built on first use so this module imports without triton.
# --------------------------------------------------------------------------------------------

_TRITON = None  # cached (fwd_kernel, bwd_kernel) or False when unavailable


def triton_available() -> bool:
    """True when CUDA is usable and triton imports (kernels compiled lazily on first call)."""
    if os.environ.get("MASKLOOP_DISABLE_TRITON", "0") == "1" or not torch.cuda.is_available():
        return False
    return _triton_kernels() is not False


def _triton_kernels():
    global _TRITON
    if _TRITON is not None:
        return _TRITON
    try:
        import triton

        from . import _triton_kernels as k
    except Exception:  # pragma: no cover - depends on the machine
        _TRITON = False
        return _TRITON
    _TRITON = (k.ms_deform_fwd_kernel, k.ms_deform_bwd_kernel, triton.next_power_of_2)
    return _TRITON


class _MSDeformAttnTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        fwd, _, next_pow2 = _triton_kernels()
        B, S, H, Dh = value.shape
        _, Q, _, L, P, _ = sampling_locations.shape
        v = value.contiguous()
        loc = sampling_locations.contiguous()
        attn = attention_weights.contiguous()
        shapes = spatial_shapes.to(torch.int32).contiguous()
        start = level_start_index.to(torch.int32).contiguous()
        out = torch.empty(B, Q, H * Dh, device=value.device, dtype=torch.float32)
        grid = (B * Q, H)
        fwd[grid](v, shapes, start, loc, attn, out, S, Q, H, Dh, L=L, P=P, BLOCK_D=max(16, next_pow2(Dh)))
        ctx.save_for_backward(v, shapes, start, loc, attn)
        return out.to(value.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        _, bwd, next_pow2 = _triton_kernels()
        v, shapes, start, loc, attn = ctx.saved_tensors
        B, S, H, Dh = v.shape
        _, Q, _, L, P, _ = loc.shape
        g = grad_out.contiguous()
        gvalue = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        gloc = torch.empty(loc.shape, device=v.device, dtype=torch.float32)
        gattn = torch.empty(attn.shape, device=v.device, dtype=torch.float32)
        grid = (B * Q, H)
        bwd[grid](
            v, shapes, start, loc, attn, g, gvalue, gloc, gattn, S, Q, H, Dh,
            L=L, P=P, BLOCK_D=max(16, next_pow2(Dh)),
        )
        return gvalue.to(v.dtype), None, None, gloc.to(loc.dtype), gattn.to(attn.dtype)


def ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Triton kernels (CUDA only). Accumulates in float32; returns value's dtype."""
    if _triton_kernels() is False:
        raise RuntimeError("ms_deform_attn_triton needs `triton` (pip install triton) and a CUDA device.")
    return _MSDeformAttnTriton.apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """Dispatch: ``auto`` = triton on CUDA when available, else gather. Also
    ``reference`` / ``gather`` / ``triton`` to force one."""
    if impl == "auto":
        impl = "triton" if value.is_cuda and triton_available() else "gather"
    fn = {
        "reference": ms_deform_attn_reference,
        "gather": ms_deform_attn_gather,
        "triton": ms_deform_attn_triton,
    }.get(impl)
    if fn is None:
        raise ValueError(f"unknown ms_deform_attn impl {impl!r}; use auto, reference, gather or triton")
    return fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR layout and init)."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 impl: str = "auto"):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.impl = impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # (H, 2) one direction per head
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,  # (B, Q, C)
        reference_points: torch.Tensor,  # (B, Q, L, 2) or (B, Q, 2), normalised (x, y)
        input_flatten: torch.Tensor,  # (B, S, C)
        spatial_shapes: torch.Tensor,  # (L, 2)
        level_start_index: torch.Tensor,  # (L,)
        input_padding_mask: torch.Tensor | None = None,  # (B, S) True = padding
    ) -> torch.Tensor:  # (B, Q, C)
        B, Q, _ = query.shape
        S = input_flatten.shape[1]
        H, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(B, S, H, self.d_model // H)
        # The sampling geometry stays in float32 under autocast: a bfloat16 location in [0, 1]
        # is off by up to 1/256 of the map, a pixel at the 256^2 level (benchmarks/gpu_psalm.py).
        with torch.autocast(device_type=query.device.type, enabled=False):
            q32 = query.float()
            offsets = F.linear(q32, self.sampling_offsets.weight.float(), self.sampling_offsets.bias.float())
            offsets = offsets.view(B, Q, H, L, P, 2)
            attn = F.linear(q32, self.attention_weights.weight.float(), self.attention_weights.bias.float())
            attn = attn.view(B, Q, H, L * P).softmax(-1).view(B, Q, H, L, P)
            reference_points = reference_points.float()
            if reference_points.dim() == 3:
                reference_points = reference_points[:, :, None, :].expand(B, Q, L, 2)
            # offsets are in pixels of each level: normalise by (W_l, H_l)
            normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).float()
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, attn, impl=self.impl)
        return self.output_proj(out)

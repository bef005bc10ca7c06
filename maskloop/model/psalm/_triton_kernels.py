"""Triton kernels for multi-scale deformable attention (forward and backward).

Imported lazily by ``deform_attn`` (this module imports ``triton`` at the top). One program
per (b*q, head): it walks the L*P sampling points, fetches the four bilinear corners of
each as Dh-vectors and accumulates in float32. Backward recomputes the corners, writes the
gradients of the sampling locations and attention weights directly (each sample is owned
by one program) and scatters the value gradient with ``atomic_add``.
"""

import triton
import triton.language as tl


@triton.jit
def _corner(value_ptr, base, row, ok, offs_d, mask_d, stride_s):
    ptrs = value_ptr + base + row * stride_s + offs_d
    return tl.load(ptrs, mask=mask_d & ok, other=0.0).to(tl.float32)

@triton.jit
def ms_deform_fwd_kernel(
    value_ptr, shapes_ptr, start_ptr, loc_ptr, attn_ptr, out_ptr,
    S, Q, H, Dh,
    L: tl.constexpr, P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bq = tl.program_id(0)  # b * Q + q
    h = tl.program_id(1)
    b = pid_bq // Q
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dh
    stride_s = H * Dh
    base = b * S * stride_s + h * Dh  # value[b, :, h, :]
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    samp = ((pid_bq * H + h) * L) * P  # index of (b, q, h, 0, 0)
    for lvl in tl.static_range(L):
        hl = tl.load(shapes_ptr + 2 * lvl)
        wl = tl.load(shapes_ptr + 2 * lvl + 1)
        st = tl.load(start_ptr + lvl)
        for p in tl.static_range(P):
            i = samp + lvl * P + p
            lx = tl.load(loc_ptr + 2 * i).to(tl.float32)
            ly = tl.load(loc_ptr + 2 * i + 1).to(tl.float32)
            a = tl.load(attn_ptr + i).to(tl.float32)
            x = lx * wl.to(tl.float32) - 0.5
            y = ly * hl.to(tl.float32) - 0.5
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            fx = x - x0f
            fy = y - y0f
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            x1 = x0 + 1
            y1 = y0 + 1
            okx0 = (x0 >= 0) & (x0 < wl)
            okx1 = (x1 >= 0) & (x1 < wl)
            oky0 = (y0 >= 0) & (y0 < hl)
            oky1 = (y1 >= 0) & (y1 < hl)
            v00 = _corner(value_ptr, base, st + y0 * wl + x0, okx0 & oky0, offs_d, mask_d, stride_s)
            v01 = _corner(value_ptr, base, st + y0 * wl + x1, okx1 & oky0, offs_d, mask_d, stride_s)
            v10 = _corner(value_ptr, base, st + y1 * wl + x0, okx0 & oky1, offs_d, mask_d, stride_s)
            v11 = _corner(value_ptr, base, st + y1 * wl + x1, okx1 & oky1, offs_d, mask_d, stride_s)
            s = (1 - fy) * ((1 - fx) * v00 + fx * v01) + fy * ((1 - fx) * v10 + fx * v11)
            acc += a * s
    out_ptrs = out_ptr + pid_bq * H * Dh + h * Dh + offs_d
    tl.store(out_ptrs, acc, mask=mask_d)

@triton.jit
def ms_deform_bwd_kernel(
    value_ptr, shapes_ptr, start_ptr, loc_ptr, attn_ptr, gout_ptr,
    gvalue_ptr, gloc_ptr, gattn_ptr,
    S, Q, H, Dh,
    L: tl.constexpr, P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bq = tl.program_id(0)
    h = tl.program_id(1)
    b = pid_bq // Q
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dh
    stride_s = H * Dh
    base = b * S * stride_s + h * Dh
    g = tl.load(gout_ptr + pid_bq * H * Dh + h * Dh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    samp = ((pid_bq * H + h) * L) * P
    for lvl in tl.static_range(L):
        hl = tl.load(shapes_ptr + 2 * lvl)
        wl = tl.load(shapes_ptr + 2 * lvl + 1)
        st = tl.load(start_ptr + lvl)
        for p in tl.static_range(P):
            i = samp + lvl * P + p
            lx = tl.load(loc_ptr + 2 * i).to(tl.float32)
            ly = tl.load(loc_ptr + 2 * i + 1).to(tl.float32)
            a = tl.load(attn_ptr + i).to(tl.float32)
            wf = wl.to(tl.float32)
            hf = hl.to(tl.float32)
            x = lx * wf - 0.5
            y = ly * hf - 0.5
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            fx = x - x0f
            fy = y - y0f
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            x1 = x0 + 1
            y1 = y0 + 1
            ok00 = (x0 >= 0) & (x0 < wl) & (y0 >= 0) & (y0 < hl)
            ok01 = (x1 >= 0) & (x1 < wl) & (y0 >= 0) & (y0 < hl)
            ok10 = (x0 >= 0) & (x0 < wl) & (y1 >= 0) & (y1 < hl)
            ok11 = (x1 >= 0) & (x1 < wl) & (y1 >= 0) & (y1 < hl)
            r00 = st + y0 * wl + x0
            r01 = st + y0 * wl + x1
            r10 = st + y1 * wl + x0
            r11 = st + y1 * wl + x1
            v00 = _corner(value_ptr, base, r00, ok00, offs_d, mask_d, stride_s)
            v01 = _corner(value_ptr, base, r01, ok01, offs_d, mask_d, stride_s)
            v10 = _corner(value_ptr, base, r10, ok10, offs_d, mask_d, stride_s)
            v11 = _corner(value_ptr, base, r11, ok11, offs_d, mask_d, stride_s)
            w00 = (1 - fx) * (1 - fy)
            w01 = fx * (1 - fy)
            w10 = (1 - fx) * fy
            w11 = fx * fy
            s = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
            tl.store(gattn_ptr + i, tl.sum(g * s, axis=0))
            ds_dx = (1 - fy) * (v01 - v00) + fy * (v11 - v10)
            ds_dy = (1 - fx) * (v10 - v00) + fx * (v11 - v01)
            tl.store(gloc_ptr + 2 * i, a * wf * tl.sum(g * ds_dx, axis=0))
            tl.store(gloc_ptr + 2 * i + 1, a * hf * tl.sum(g * ds_dy, axis=0))
            ga = g * a
            tl.atomic_add(gvalue_ptr + base + r00 * stride_s + offs_d, ga * w00, mask=mask_d & ok00)
            tl.atomic_add(gvalue_ptr + base + r01 * stride_s + offs_d, ga * w01, mask=mask_d & ok01)
            tl.atomic_add(gvalue_ptr + base + r10 * stride_s + offs_d, ga * w10, mask=mask_d & ok10)
            tl.atomic_add(gvalue_ptr + base + r11 * stride_s + offs_d, ga * w11, mask=mask_d & ok11)


import pytest
import torch

from maskloop.model.psalm.deform_attn import (
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_gather,
    ms_deform_attn_reference,
    triton_available,
)


def _inputs(B=2, Q=5, H=2, Dh=3, shapes=((6, 5), (3, 4), (2, 2)), P=3, seed=0, lo=-0.2, hi=1.2):
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes)
    start = torch.cat([ss.new_zeros(1), ss.prod(1).cumsum(0)[:-1]])
    S, L = int(ss.prod(1).sum()), len(shapes)
    v = torch.randn(B, S, H, Dh, dtype=torch.float64, generator=g).requires_grad_()
    # include points outside [0, 1] to exercise zero padding
    loc = (torch.rand(B, Q, H, L, P, 2, dtype=torch.float64, generator=g) * (hi - lo) + lo).requires_grad_()
    a = torch.rand(B, Q, H, L, P, dtype=torch.float64, generator=g).requires_grad_()
    return v, ss, start, loc, a


def test_gather_equals_reference_forward_and_backward():
    v, ss, start, loc, a = _inputs()
    ref = ms_deform_attn_reference(v, ss, start, loc, a)
    fast = ms_deform_attn_gather(v, ss, start, loc, a)
    assert fast.shape == (2, 5, 2 * 3)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (v, loc, a), go)
    g_fast = torch.autograd.grad(fast, (v, loc, a), go)
    for name, x, y in zip(("value", "locations", "weights"), g_fast, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10, msg=f"grad {name}")


def test_gather_gradcheck():
    v, ss, start, loc, a = _inputs(B=1, Q=2, H=2, Dh=2, shapes=((3, 4), (2, 2)), P=2, seed=1)
    assert torch.autograd.gradcheck(lambda v, lc, w: ms_deform_attn_gather(v, ss, start, lc, w), (v, loc, a))


def test_dispatch_and_triton_lazy():
    v, ss, start, loc, a = _inputs()
    out = ms_deform_attn(v, ss, start, loc, a)  # CPU -> gather
    torch.testing.assert_close(out, ms_deform_attn_reference(v, ss, start, loc, a))
    with pytest.raises(ValueError, match="unknown"):
        ms_deform_attn(v, ss, start, loc, a, impl="nope")
    if not triton_available():
        with pytest.raises(RuntimeError):
            ms_deform_attn(v, ss, start, loc, a, impl="triton")


def test_module_init_and_forward():
    torch.manual_seed(0)
    m = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    assert torch.all(m.sampling_offsets.weight == 0) and torch.all(m.attention_weights.weight == 0)
    bias = m.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 points along +x with offsets 1, 2, 3 pixels; same at every level
    torch.testing.assert_close(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[:, 0], bias[:, 1])
    levels = [(6, 6), (3, 3)]
    ss = torch.tensor(levels)
    start = torch.tensor([0, 36])
    x = torch.randn(2, 45, 16)
    q = torch.randn(2, 7, 16)
    ref = torch.rand(2, 7, 2)
    out1 = m(q, ref, x, ss, start)
    out2 = m(q, ref[:, :, None].expand(2, 7, 2, 2), x, ss, start)
    assert out1.shape == (2, 7, 16)
    torch.testing.assert_close(out1, out2)
    m.impl = "reference"
    torch.testing.assert_close(m(q, ref, x, ss, start), out1, rtol=1e-5, atol=1e-5)


def test_bf16_value_float32_geometry():
    """Under autocast the sampling geometry stays float32; every impl takes a bf16 value with
    float32 locations and gives the float32 result on the bf16-rounded value, in bf16."""
    from maskloop.model.psalm.deform_attn import MSDeformAttn, ms_deform_attn_gather, ms_deform_attn_reference

    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[6, 5], [3, 3]])
    start = torch.tensor([0, 30])
    v = torch.randn(2, 39, 2, 4, generator=g).bfloat16()
    loc = torch.rand(2, 3, 2, 2, 2, 2, generator=g)
    a = torch.rand(2, 3, 2, 2, 2, generator=g).softmax(-1)
    want = ms_deform_attn_reference(v.float(), shapes, start, loc, a)
    for fn in (ms_deform_attn_reference, ms_deform_attn_gather):
        vv = v.clone().requires_grad_()
        out = fn(vv, shapes, start, loc, a)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
        out.float().sum().backward()
        assert vv.grad is not None and vv.grad.dtype == torch.bfloat16
    m = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)
    seen = {}
    m.impl = "reference"
    import maskloop.model.psalm.deform_attn as da

    orig = da.ms_deform_attn

    def spy(value, ss, st, locations, attn, impl="auto"):
        seen["loc"], seen["attn"] = locations.dtype, attn.dtype
        return orig(value, ss, st, locations, attn, impl=impl)

    da.ms_deform_attn = spy
    try:
        q, src = torch.randn(2, 3, 8, generator=g), torch.randn(2, 39, 8, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(q, torch.rand(2, 3, 2, generator=g), src, shapes, start)
    finally:
        da.ms_deform_attn = orig
    assert seen == {"loc": torch.float32, "attn": torch.float32}

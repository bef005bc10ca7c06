"""Straight-through Gumbel top-k embeddings: exact forward, dense-reference gradients, no 4-D tensor."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from maskloop.train.gumbel import gumbel_topk_embed, gumbel_topk_weights, sample_gumbel


def _dense_reference(logits, W, noise, k, tau, hard, valid=None):
    """The textbook formula over the full vocabulary: w_full = hard_full - y_full.detach() + y_full."""
    # (B, T, V) x (V, D) -> (B, T, D)
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    vals, ids = logits.topk(k, dim=-1)
    y = torch.softmax((vals + noise) / tau, dim=-1)
    y_full = torch.zeros_like(logits).scatter(-1, ids, y)
    if hard:
        hard_ids = ids.gather(-1, y.argmax(-1, keepdim=True))
        hard_full = torch.zeros_like(logits).scatter(-1, hard_ids, 1.0)
        w = hard_full - y_full.detach() + y_full
    else:
        w = y_full
    return w @ W


def _case(B=2, T=5, V=60, D=12, k=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=dtype) * 2).requires_grad_()
    W = torch.randn(V, D, generator=g, dtype=dtype).requires_grad_()
    noise = sample_gumbel((B, T, k), dtype=dtype, generator=g)
    G = torch.randn(B, T, D, generator=g, dtype=dtype)  # upstream gradient
    return logits, W, noise, G


@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("tau", [0.7, 2.0])
@pytest.mark.parametrize("chunk", [1, 13, 4096])
def test_matches_dense_reference_float64(hard, tau, chunk):
    k = 8
    logits, W, noise, G = _case(k=k)
    emb, hard_ids = gumbel_topk_embed(logits, W, k=k, tau=tau, hard=hard, noise=noise, chunk=chunk)
    (emb * G).sum().backward()
    gl, gW = logits.grad.clone(), W.grad.clone()
    logits.grad = W.grad = None

    ref = _dense_reference(logits, W, noise, k, tau, hard)
    (ref * G).sum().backward()
    if hard:
        assert torch.equal(emb, W.detach()[hard_ids])  # exact, not just close
    torch.testing.assert_close(emb, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(gl, logits.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(gW, W.grad, atol=1e-10, rtol=0)
    assert gl.abs().sum() > 0 and gW.abs().sum() > 0


def test_forward_is_exact_embedding_row_low_precision():
    logits, W, noise, _ = _case(dtype=torch.float32)
    Wb = W.detach().bfloat16().requires_grad_()
    emb, hard_ids = gumbel_topk_embed(logits.bfloat16(), Wb, k=8, noise=noise)
    assert emb.dtype == torch.bfloat16
    assert torch.equal(emb, Wb.detach()[hard_ids])
    emb.float().sum().backward()
    assert Wb.grad.dtype == torch.bfloat16 and logits.grad is not None


def test_generator_reproducible_and_equals_explicit_noise():
    logits, W, _, _ = _case()
    a, ia = gumbel_topk_embed(logits, W, k=8, generator=torch.Generator().manual_seed(3))
    b, ib = gumbel_topk_embed(logits, W, k=8, generator=torch.Generator().manual_seed(3))
    noise = sample_gumbel((2, 5, 8), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    c, ic = gumbel_topk_embed(logits, W, k=8, noise=noise)
    assert torch.equal(a, b) and torch.equal(ia, ib) and torch.equal(ia, ic) and torch.equal(a, c)


def test_k_respected():
    logits, W, noise, G = _case(k=4)
    emb, _ = gumbel_topk_embed(logits, W, k=4, noise=noise)
    (emb * G).sum().backward()
    # gradient reaches exactly the k top logits of each position and nothing else
    top = logits.detach().topk(4, dim=-1).indices
    support = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top, True)
    assert (logits.grad[~support] == 0).all()
    assert ((logits.grad != 0).sum(-1) <= 4).all()
    # k = 1: the hard id is the argmax whatever the noise
    big_noise = torch.randn(2, 5, 1, dtype=torch.float64) * 100
    _, ids = gumbel_topk_embed(logits, W, k=1, noise=big_noise)
    assert torch.equal(ids, logits.detach().argmax(-1))


def test_tau_respected():
    logits, W, noise, _ = _case(k=8)
    for tau in (0.1, 0.7, 5.0):
        w, ids, _, y = gumbel_topk_weights(logits, k=8, tau=tau, noise=noise, hard=False)
        vals = logits.detach().gather(-1, ids)
        torch.testing.assert_close(y, torch.softmax((vals + noise) / tau, -1))
        assert torch.equal(w, y)
    # low temperature -> soft weights approach the hard one-hot
    _, ids, pos, y_cold = gumbel_topk_weights(logits, k=8, tau=1e-3, noise=noise)
    top2 = (logits.detach().gather(-1, ids) + noise).topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05  # positions without a near-tie
    assert clear.sum() > 0
    torch.testing.assert_close(y_cold[clear], F.one_hot(pos, 8).double()[clear], atol=1e-6, rtol=0)
    peak = [
        gumbel_topk_weights(logits, k=8, tau=t, noise=noise)[3].max(-1).values.mean() for t in (5, 1, 0.2)
    ]
    assert peak[0] < peak[1] < peak[2]
    with pytest.raises(ValueError, match="tau"):
        gumbel_topk_embed(logits, W, tau=0.0)


def test_excluded_ids_never_selected():
    logits, W, noise, G = _case(V=60, k=8)
    banned = torch.tensor([0, 1, 2, 3, 59])
    with torch.no_grad():
        logits[..., banned] += 100.0  # the banned ids would otherwise always win
    valid = torch.ones(60, dtype=torch.bool)
    valid[banned] = False
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        emb, hard_ids = gumbel_topk_embed(logits, W, k=8, generator=gen, valid_ids_mask=valid)
        _, ids, _, _ = gumbel_topk_weights(logits, k=8, valid_ids_mask=valid, noise=noise)
        assert not torch.isin(hard_ids, banned).any()
        assert not torch.isin(ids, banned).any()
    logits.grad = None
    emb, _ = gumbel_topk_embed(logits, W, k=8, noise=noise, valid_ids_mask=valid)
    (emb * G).sum().backward()
    assert (logits.grad[..., banned] == 0).all()
    gl = logits.grad.clone()
    logits.grad = W.grad = None
    (_dense_reference(logits, W, noise, 8, 0.7, True, valid) * G).sum().backward()
    torch.testing.assert_close(gl, logits.grad, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="selectable"):
        gumbel_topk_embed(logits, W, k=56, valid_ids_mask=valid)


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor produced by any op (forward and autograd backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("hard", [True, False])
def test_never_materialises_btkd(hard):
    B, T, V, D, k, chunk = 2, 8, 40, 32, 16, 16
    logits, W, noise, G = _case(B=B, T=T, V=V, D=D, k=k, dtype=torch.float32)
    mode = _MaxNumel()
    with mode:
        emb, _ = gumbel_topk_embed(logits, W, k=k, noise=noise, hard=hard, chunk=chunk)
        (emb * G).sum().backward()
    btkd = B * T * k * D
    largest_needed = max(V * D, B * T * V, B * T * D, chunk * D)  # dW, dlogits, dE, one chunk
    assert mode.max_numel <= largest_needed < btkd, (mode.max_numel, btkd)
    assert W.grad is not None and logits.grad is not None


def test_topk_beyond_the_selectable_ids_is_one_clear_error():
    logits = torch.randn(2, 3, 10)
    valid = torch.zeros(10, dtype=torch.bool)
    valid[:4] = True
    with pytest.raises(ValueError, match="k=5 exceeds the 4 selectable ids"):
        gumbel_topk_embed(logits, torch.randn(10, 6), k=5, tau=1.0, valid_ids_mask=valid)
    out, _ = gumbel_topk_embed(logits, torch.randn(10, 6), k=4, tau=1.0, valid_ids_mask=valid)
    assert out.shape == (2, 3, 6)

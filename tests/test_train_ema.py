"""EMA of trained parameters: reference values, exception-safe swap, state dict, memory."""

import pytest
import torch
from torch import nn

from maskloop.train.ema import EMA


def _model(frozen_width=8):
    torch.manual_seed(0)
    m = nn.ModuleDict(
        {"base": nn.Linear(frozen_width, frozen_width), "head": nn.Linear(4, 3), "lora": nn.Linear(3, 2)}
    )
    m["base"].requires_grad_(False)
    return m


def _step(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("warmup", [False, True])
def test_matches_reference_loop(warmup):
    model = _model()
    ema = EMA(dict(model.named_parameters()), decay=0.9, warmup=warmup)
    assert set(ema.shadow) == {"head.weight", "head.bias", "lora.weight", "lora.bias"}
    ref = {n: p.detach().clone().double() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(7):
        _step(model, step)
        ema.update()
        d = min(0.9, (1 + step) / (10 + step)) if warmup else 0.9
        for n, p in model.named_parameters():
            if p.requires_grad:
                ref[n] = d * ref[n] + (1 - d) * p.detach().double()
    assert ema.num_updates == 7
    for n, s in ema.shadow.items():
        assert s.dtype == torch.float32
        torch.testing.assert_close(s.double(), ref[n], atol=1e-6, rtol=0)


def test_swap_restores_exactly_and_is_exception_safe():
    model = _model()
    ema = EMA(model.named_parameters(), decay=0.5)
    for s in range(3):
        _step(model, s)
        ema.update()
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swap():
        for n, p in model.named_parameters():
            if n in ema.shadow:
                assert torch.equal(p, ema.shadow[n]) and not torch.equal(p, live[n])
            else:
                assert torch.equal(p, live[n])  # frozen base untouched
        with pytest.raises(RuntimeError, match="nested"):
            with ema.swap():
                pass
        with pytest.raises(RuntimeError, match="inside"):
            ema.update()
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n])
    with pytest.raises(ValueError, match="boom"):
        with ema.swap():
            raise ValueError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n])
    ema.update()  # usable again after an exception inside swap


def test_swap_bf16_params_restore_bitwise():
    model = _model().to(torch.bfloat16)
    ema = EMA(model.named_parameters(), decay=0.7)
    _step(model, 0)
    ema.update()
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swap():
        pass
    assert all(torch.equal(p, live[n]) for n, p in model.named_parameters())
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())


def test_state_dict_roundtrip_and_mismatch():
    model = _model()
    ema = EMA(model.named_parameters(), decay=0.8, warmup=True)
    for s in range(3):
        _step(model, s)
        ema.update()
    sd = ema.state_dict()
    other = EMA(_model().named_parameters(), decay=0.1)
    other.load_state_dict(sd)
    assert other.decay == 0.8 and other.warmup and other.num_updates == 3
    assert all(torch.equal(other.shadow[n], ema.shadow[n]) for n in ema.shadow)
    sd["shadow"]["head.weight"].add_(1)  # state_dict is a copy
    assert not torch.equal(sd["shadow"]["head.weight"], ema.shadow["head.weight"])
    bad = {"shadow": {"head.weight": torch.zeros(3, 4)}}
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="no trainable"):
        EMA({"w": nn.Parameter(torch.zeros(2), requires_grad=False)})


def test_memory_does_not_scale_with_frozen_part():
    small, big = _model(frozen_width=4), _model(frozen_width=512)
    e_small, e_big = EMA(small.named_parameters()), EMA(big.named_parameters())
    trained_bytes = sum(p.numel() * p.element_size() for p in big.parameters() if p.requires_grad)
    frozen_bytes = sum(p.numel() * p.element_size() for p in big.parameters() if not p.requires_grad)
    assert e_big.num_bytes() == e_small.num_bytes() <= trained_bytes
    assert frozen_bytes > 100 * e_big.num_bytes()

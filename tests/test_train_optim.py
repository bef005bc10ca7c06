"""Optimizer groups, warmup/cosine/constant schedule, non-finite guard."""

import json
import math

import pytest
import torch
from torch import nn

from maskloop.train.optim import NonFiniteGuard, build_optimizer, build_scheduler, lr_factor


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.scale = nn.Parameter(torch.ones(4))  # 1-D, no decay
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_optimizer_groups():
    net = _Net()
    opt = build_optimizer(net.named_parameters(), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert [id(p) for p in groups["decay"]["params"]] == [id(net.proj.weight)]
    assert {id(p) for p in groups["no_decay"]["params"]} == {
        id(net.proj.bias),
        id(net.norm.weight),
        id(net.norm.bias),
        id(net.scale),
    }
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["lr"] == 1e-3
    assert not opt.defaults.get("fused")  # CPU
    all_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(net.frozen.weight) not in all_ids
    # decoupled decay: a zero-gradient step shrinks only the decayed weight
    w0, s0 = net.proj.weight.detach().clone(), net.scale.detach().clone()
    for p in net.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(net.proj.weight, w0 * (1 - 1e-3 * 0.05))
    assert torch.equal(net.scale, s0)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(net.frozen.named_parameters(), lr=1e-3)


def test_tied_parameter_listed_once():
    lin = nn.Linear(3, 3)
    opt = build_optimizer([("a.weight", lin.weight), ("b.weight", lin.weight)], lr=1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == 1


def _lrs(total, **kw):
    p = nn.Parameter(torch.zeros(2, 2))
    opt = build_optimizer([("w", p)], lr=2.0)
    sched = build_scheduler(opt, total, **kw)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out, opt, sched


def test_cosine_schedule():
    lrs, _, _ = _lrs(100, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert lrs[0] == pytest.approx(2.0 * 1 / 10) and lrs[9] == pytest.approx(2.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warmup increases
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decreases
    mid = 10 + 45
    assert lrs[mid] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90))))
    assert lrs[-1] > 0.2 and lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 100, 10, "cosine", 0.0) == pytest.approx(0.0)  # held at the minimum
    assert min(lrs) > 0


def test_constant_schedule_and_state():
    lrs, opt, sched = _lrs(40, warmup_ratio=0.05, schedule="constant")
    assert lrs[:2] == [pytest.approx(1.0), pytest.approx(2.0)] and all(v == 2.0 for v in lrs[2:])
    lrs, _, _ = _lrs(10, warmup_ratio=0.0)
    assert lrs[0] == 2.0
    # the scheduler state dict is plain data (goes into state.json) and resumes exactly
    sd = sched.state_dict()
    json.dumps(sd)
    p = nn.Parameter(torch.zeros(2, 2))
    opt2 = build_optimizer([("w", p)], lr=2.0)
    s2 = build_scheduler(opt2, 40, warmup_ratio=0.05, schedule="constant")
    s2.load_state_dict(sd)
    assert s2.last_epoch == sched.last_epoch
    for bad in ({"schedule": "linearish"}, {"warmup_ratio": 1.5}, {"min_lr_ratio": -1}):
        with pytest.raises(ValueError):
            build_scheduler(opt2, 10, **bad)


def test_non_finite_guard():
    guard = NonFiniteGuard(max_consecutive=2)
    ok = [torch.ones(3), None]
    assert guard.check(torch.tensor(1.0), ok) is False
    assert guard.check(torch.tensor(float("nan")), ok) is True
    assert guard.check(torch.tensor(1.0), [torch.tensor([1.0, float("inf")])]) is True
    assert guard.consecutive == 2 and guard.total_skipped == 2
    assert guard.check(2.0, ok) is False and guard.consecutive == 0  # a good step resets the streak
    assert guard.check(float("inf")) is True
    assert guard.check(torch.tensor(1.0), [None, torch.tensor([float("nan")])], names=["a", "b"]) is True
    with pytest.raises(RuntimeError, match=r"3 consecutive.*\['b'\].*lower the learning rate"):
        guard.check(torch.tensor(1.0), [None, torch.tensor([float("nan")])], names=["a", "b"])
    assert guard.total_skipped == 5 and guard.total_checked == 7
    g2 = NonFiniteGuard()
    g2.load_state_dict(guard.state_dict())
    assert g2.state_dict() == guard.state_dict()
    # parameters can be passed directly: their .grad is checked
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([0.0, float("nan")])
    assert NonFiniteGuard().check(torch.tensor(0.5), [p]) is True

"""Checkpoints: round trip, atomic publish under simulated crashes, keep-last-N, RNG, clear errors."""

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import maskloop.train.checkpoint as ckpt
from maskloop.train.checkpoint import (
    CheckpointError,
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from maskloop.train.optim import build_optimizer, build_scheduler


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = build_optimizer(model.named_parameters(), lr=1e-3)
    sched = build_scheduler(opt, total_steps=10)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _save(root, step, model, opt=None, sched=None, **kw):
    trainable = {n: p.detach() for n, p in model.named_parameters()}
    return save_checkpoint(
        root,
        step,
        trainable,
        ema=kw.pop("ema", {n: t * 2 for n, t in trainable.items()}),
        optimizer_state=opt.state_dict() if opt else None,
        scheduler_state=sched.state_dict() if sched else None,
        sampler_state=kw.pop("sampler_state", {"epoch": 1, "index": step}),
        rng=kw.pop("rng", None),
        extra=kw.pop("extra", {"loss": 0.5}),
        **kw,
    )


def test_round_trip(tmp_path):
    model, opt, sched = _setup()
    rng = capture_rng()
    path = _save(tmp_path, 7, model, opt, sched, rng=rng)
    assert path.name == "step_00000007"
    assert {p.name for p in path.iterdir()} == {
        "trainable.safetensors",
        "ema.safetensors",
        "optimizer.pt",
        "rng.pt",
        "state.json",
    }
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 7 and "torch" in state["versions"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000007"

    for where in (tmp_path, path):
        ck = load_checkpoint(where)
        assert ck["step"] == 7 and ck["path"] == path
        for n, p in model.named_parameters():
            assert torch.equal(ck["trainable"][n], p.detach())
            assert torch.equal(ck["ema"][n], p.detach() * 2)
        assert ck["sampler_state"] == {"epoch": 1, "index": 7} and ck["extra"] == {"loss": 0.5}
    # optimizer + scheduler restore into fresh objects and continue identically
    model2, opt2, sched2 = _setup(seed=1)
    model2.load_state_dict({n: t for n, t in ck["trainable"].items()})
    opt2.load_state_dict(ck["optimizer_state"])
    sched2.load_state_dict(ck["scheduler_state"])
    assert sched2.last_epoch == sched.last_epoch and sched2.get_last_lr() == sched.get_last_lr()
    for o in (opt, opt2):
        for g in o.param_groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    # no EMA / no optimizer: absent pieces are None
    p2 = save_checkpoint(tmp_path, 8, {"w": torch.zeros(2)})
    ck = load_checkpoint(p2)
    assert ck["ema"] is None and ck["optimizer_state"] is None and ck["rng"] is None
    assert load_checkpoint(tmp_path, step=7)["step"] == 7
    assert load_checkpoint(tmp_path)["step"] == 8


def test_rng_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    state = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, rng=state)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_crash_mid_write_keeps_previous_latest(tmp_path, monkeypatch):
    model, opt, sched = _setup()
    _save(tmp_path, 10, model, opt, sched)

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    # crash after trainable/ema were written, while writing the optimizer state
    monkeypatch.setattr(ckpt, "_save_torch", boom)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 20, model, opt, sched)
    monkeypatch.undo()
    assert not (tmp_path / "step_00000020").exists()
    assert latest_checkpoint(tmp_path).name == "step_00000010"
    assert load_checkpoint(tmp_path)["step"] == 10
    # a leftover unfinished directory (hard kill: no cleanup ran) is ignored, then removed
    (tmp_path / ".tmp-step_00000020-dead").mkdir()
    (tmp_path / ".tmp-step_00000020-dead" / "trainable.safetensors").write_bytes(b"partial")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]
    assert load_checkpoint(tmp_path)["step"] == 10

    # crash after the step directory is published but before `latest` moves
    monkeypatch.setattr(ckpt, "_write_latest", boom)
    with pytest.raises(OSError):
        _save(tmp_path, 30, model, opt, sched)
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "step_00000010"
    assert load_checkpoint(tmp_path)["step"] == 10
    assert load_checkpoint(tmp_path / "step_00000030")["step"] == 30  # complete, loadable explicitly

    # the next successful save cleans the leftovers and moves latest
    _save(tmp_path, 40, model, opt, sched, keep_last=None)
    assert not list(tmp_path.glob(".tmp-*"))
    assert load_checkpoint(tmp_path)["step"] == 40


def test_keep_last_n(tmp_path):
    model, _, _ = _setup()
    for step in range(1, 6):
        _save(tmp_path, step * 100, model, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [400, 500]
    assert load_checkpoint(tmp_path)["step"] == 500
    # resumed from an earlier step: the new (lower-numbered) save is kept and becomes latest
    _save(tmp_path, 450, model, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [450, 500]
    assert load_checkpoint(tmp_path)["step"] == 450
    # re-saving an existing step replaces it
    _save(tmp_path, 450, model, keep_last=2, extra={"again": True})
    assert load_checkpoint(tmp_path)["extra"] == {"again": True}


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        load_checkpoint(tmp_path)
    model, opt, _ = _setup()
    path = _save(tmp_path, 5, model, opt)
    with pytest.raises(FileNotFoundError, match=r"available steps: \[5\]"):
        load_checkpoint(tmp_path, step=6)
    data = (path / "trainable.safetensors").read_bytes()
    (path / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trainable.safetensors is corrupt"):
        load_checkpoint(tmp_path)
    (path / "trainable.safetensors").write_bytes(data)
    (path / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="optimizer.pt is corrupt"):
        load_checkpoint(path)
    assert load_checkpoint(path, load_optimizer=False)["optimizer_state"] is None
    (path / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)
    (path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="state.json is corrupt"):
        load_checkpoint(path)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 6, {"w": torch.zeros(1)}, extra={"t": torch.zeros(1)})


def test_tied_tensors_saved(tmp_path):
    w = torch.randn(3, 3)
    path = save_checkpoint(tmp_path, 1, {"a": w, "b": w, "c": w[0]})
    ck = load_checkpoint(path)
    assert torch.equal(ck["trainable"]["a"], w) and torch.equal(ck["trainable"]["b"], w)
    assert torch.equal(ck["trainable"]["c"], w[0])

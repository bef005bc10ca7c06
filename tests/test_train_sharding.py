"""DDP and FSDP2 through the Trainer (2 gloo processes) against one process; sharded checkpoints; errors.

Same global batch: 2 processes x batch 2 == 1 process x batch 4, for sft (referring: a fixed-length
answer, per-mask mean losses, the question drawn for the global batch), loop1 and dual (surgery
statistics included).  The sharded (DCP) checkpoint resumes to the weights of an uninterrupted run with
2 processes and with 1.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, join_group

from maskloop.config import ConfigError
from maskloop.train.engine import TrainConfig, Trainer

DATA = {
    "sft": {"refer": [{"kind": "shapes_refer", "n": 8}]},
    "loop1": {"pairs": [{"kind": "shapes_pairs", "n": 8}]},
    "dual": {"pairs": [{"kind": "shapes_pairs", "n": 8}], "dam": [{"kind": "shapes_caption", "n": 8}]},
}


def cfg_for(recipe, run_dir, batch_size, **kw):
    base = {"recipe": recipe, "run_dir": str(run_dir), "steps": 2, "batch_size": batch_size, "accumulation": 2,
            "ckpt_every": 0, "log_every": 1, "progress": False, "lr": 1e-2, "warmup_ratio": 0.0,
            "data": DATA[recipe], "sft": {"lm_weight": 0.0}, "loop1": {"caption_len": 6, "topk": 8, "refer_ratio": 0.0}, "loop2": {"caption_len": 6}}
    base.update(kw)
    return TrainConfig.from_mapping(base)




def _result(tr):
    full = {k: tr.dist.full_tensor(v).detach().clone() for k, v in tr.params.items()}
    keys = ("loss", "grad_norm", "surgery/cos", "surgery/g1_norm", "surgery/g2_norm")
    return {"params": full, "logs": [{k: h[k] for k in keys if k in h} for h in tr.history]}


def _modes_worker(rank, world, port, root, mode):
    join_group(rank, world, port)
    out = {}
    for recipe in DATA:
        torch.manual_seed(0)
        tr = Trainer(cfg_for(recipe, Path(root) / f"{mode}-{recipe}", 2, distributed=mode))
        tr.fit()
        out[recipe] = _result(tr)
    if mode == "fsdp":  # the frozen base kept whole on every rank, only the trained weights sharded
        torch.manual_seed(0)
        tr = Trainer(cfg_for("loop1", Path(root) / "fsdp-frozen-whole", 2, distributed=mode, fsdp_shard_frozen=False))
        frozen = [p for p in tr.model.parameters() if not p.requires_grad]
        assert frozen and not any(type(p).__name__ == "DTensor" for p in frozen)
        assert any(type(p).__name__ == "DTensor" for p in tr.params.values())
        tr.fit()
        out["loop1-frozen-whole"] = _result(tr)
    if rank == 0:
        torch.save(out, Path(root) / f"{mode}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    out = {}
    for recipe in DATA:
        torch.manual_seed(0)
        tr = Trainer(cfg_for(recipe, root / recipe, 4))
        tr.fit()
        out[recipe] = _result(tr)
    return out


def _assert_same(run, ref, what):
    for k, p in ref["params"].items():
        torch.testing.assert_close(run["params"][k], p, rtol=1e-4, atol=2e-5, msg=f"{what}: {k}")
    assert run["logs"]
    for a, b in zip(run["logs"], ref["logs"][-len(run["logs"]):]):  # a resumed run logs its last steps
        assert a.keys() == b.keys(), what
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), f"{what}: {k}"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(tmp_path, single_runs, mode):
    mp.spawn(_modes_worker, args=(2, free_port(), str(tmp_path), mode), nprocs=2, join=True)
    got = torch.load(tmp_path / f"{mode}.pt")
    for recipe in DATA:
        _assert_same(got[recipe], single_runs[recipe], f"{mode}/{recipe}")
    assert "surgery/cos" in got["dual"]["logs"][0]
    if mode == "fsdp":
        _assert_same(got["loop1-frozen-whole"], single_runs["loop1"], "fsdp, frozen base whole / loop1")
    init = Trainer(cfg_for("loop1", tmp_path / "init", 4))
    moved = sum(float((init.params[k] - p).abs().sum()) for k, p in single_runs["loop1"]["params"].items())
    assert moved > 0  # trained weights are compared, not two copies of the initialisation


def _resume_worker(rank, world, port, root, phase):
    join_group(rank, world, port)
    torch.manual_seed(0)
    steps = 2 if phase == "first" else 4
    tr = Trainer(cfg_for("loop1", Path(root) / "run", 2, distributed="fsdp", steps=4, ckpt_every=2,
                         activation_checkpointing=True))
    if phase == "first":
        tr.fit(steps)  # then the process ends, as if killed after the checkpoint
    else:
        tr.resume(Path(root) / "run" / "checkpoints")
        tr.fit()
        res = _result(tr)  # on every rank: gathering the FSDP shards is a collective
        if rank == 0:
            torch.save(res, Path(root) / "resumed2.pt")
    torch.distributed.destroy_process_group()


def test_sharded_checkpoint_resumes_exactly_with_two_and_one_processes(tmp_path, single_runs):
    from maskloop.train.sharded_checkpoint import check_shards, is_sharded, read_sharded_tensors

    torch.manual_seed(0)
    ref = Trainer(cfg_for("loop1", tmp_path / "ref", 4, steps=4))
    ref.fit()
    ref = _result(ref)
    mp.spawn(_resume_worker, args=(2, free_port(), str(tmp_path), "first"), nprocs=2, join=True)
    step2 = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert is_sharded(step2) and len(list((step2 / "dcp").glob("*.distcp"))) == 2
    check_shards(step2)
    # same world size
    mp.spawn(_resume_worker, args=(2, free_port(), str(tmp_path), "second"), nprocs=2, join=True)
    _assert_same(torch.load(tmp_path / "resumed2.pt"), ref, "2 -> 2")
    # 2 -> 1 process (batch 4: the same global batch), no process group
    torch.manual_seed(0)
    one = Trainer(cfg_for("loop1", tmp_path / "one", 4, steps=4))
    one.resume(step2)
    one.fit()
    _assert_same(_result(one), ref, "2 -> 1")
    # export path: the whole trained tensors from the shards, in one process; a run dir of shards loads
    full = read_sharded_tensors(step2)
    assert set(full) == set(ref["params"]) and all(full[k].shape == v.shape for k, v in ref["params"].items())
    from maskloop.inference import load_model

    model = load_model(step2.parent.parent / "checkpoints" / "step_00000004")
    for k, p in model.named_parameters():
        if k in ref["params"]:
            torch.testing.assert_close(p.detach(), ref["params"][k], rtol=1e-4, atol=2e-5, msg=k)


def test_missing_shard_is_one_clear_error(tmp_path):
    from maskloop.train.checkpoint import CheckpointError
    from maskloop.train.sharded_checkpoint import save_sharded

    step = save_sharded(tmp_path, 3, tensors={"trainable": {"w": torch.ones(4)}}, per_rank={"x": 1}, shared={})
    (next((step / "dcp").glob("*.distcp"))).unlink()
    from maskloop.train.sharded_checkpoint import check_shards

    with pytest.raises(CheckpointError, match="missing 1 of its 1 shard file"):
        check_shards(step)


def test_fsdp_without_torchrun_and_indivisible_batch_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="torchrun"):
        Trainer(cfg_for("loop1", tmp_path, 2, distributed="fsdp"))
    with pytest.raises(ConfigError, match="distributed"):
        cfg_for("loop1", tmp_path, 2, distributed="zero3")
    from maskloop.train.sharding import per_rank_batch

    assert per_rank_batch(global_batch=8, world_size=2, accumulation=2) == 2
    with pytest.raises(ConfigError, match="global_batch=8 is not divisible by world size 3 x accumulation 1"):
        per_rank_batch(global_batch=8, world_size=3, accumulation=1)


def test_dry_run_prints_the_memory_plan(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"recipe": "loop1", "model": "sa2va-1b", "batch_size": 8, "data": DATA["loop1"],
                               "distributed": "fsdp", "activation_checkpointing": True}))
    r = subprocess.run([sys.executable, "-m", "maskloop.cli", "train", "--config", str(cfg), "--dry-run",
                        "--world-size", "8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "memory per GPU: preset sa2va-1b, 8 GPU(s), distributed=fsdp" in r.stdout
    assert "AdamW state" in r.stdout and "total" in r.stdout

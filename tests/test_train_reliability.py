"""#22 through the CLI and the Trainer: overrides on resume (the schedule re-planned, the run's identity
refused), `--resume RUN_DIR`, metrics.jsonl with every step once, skip counts with workers and across a
resume, no non-finite checkpoint, and one `error:` line (exit 2) for every bad input."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskloop.cli import main
from maskloop.train.checkpoint import list_checkpoints
from maskloop.train.optim import lr_factor

REPO = Path(__file__).resolve().parents[1]

TINY = ("recipe: sft\nmodel: tiny\nfreeze: all\nsteps: 2\nbatch_size: 2\naccumulation: 1\nckpt_every: 1\n"
        "keep_last: 10\nlog_every: 1\nprogress: false\nwarmup_ratio: 0\nema_decay: 0\n"
        "data:\n  refer: [{kind: shapes_refer, n: 8}]\n")


def _config(tmp_path, text: str = TINY) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return str(p)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step cosine run (checkpoints at steps 1 and 2)."""
    root = tmp_path_factory.mktemp("rel")
    cfg = _config(root)
    assert main(["train", "--config", cfg, "--run-dir", str(root / "run")]) == 0
    return root, cfg


def _copy_run(trained, tmp_path) -> Path:
    import shutil

    shutil.copytree(trained[0] / "run", tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------------------------------------- items 1, 5, 8


def test_resume_run_dir_with_new_lr_and_steps_replans_the_schedule(trained, tmp_path, capsys):
    run = _copy_run(trained, tmp_path)
    capsys.readouterr()
    # extending a finished cosine run: the old plan would train steps 3, 4 at lr 0
    assert main(["train", "--config", trained[1], "--run-dir", str(run), "--resume", str(run),  # item 5: RUN_DIR
                 "--set", "steps=4", "--set", "lr=2e-5"]) == 0
    out = capsys.readouterr().out
    plan = [line for line in out.splitlines() if "re-planned" in line]
    assert len(plan) == 1 and "from step 2" in plan[0] and "cosine over 4 steps" in plan[0], out
    assert f"lr at step 2: {2e-5 * lr_factor(2, 4, 0):.4g}" in plan[0]
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # every step once
    # a row's lr is the one for the next optimizer step: after step 3 that is step index 3 of the new plan
    assert rows[2]["lr"] == pytest.approx(2e-5 * lr_factor(3, 4, 0))
    assert json.loads((run / "train_config.json").read_text())["lr"] == 2e-5

    # the lr the resumed optimizer actually uses, and the refusals leave the run alone
    from maskloop.config import TrainConfig
    from maskloop.train.engine import Trainer

    cfg = TrainConfig.from_yaml(trained[1], [f"run_dir={tmp_path / 'other'}", "steps=6", "lr=1e-4",
                                             "schedule=constant"])
    tr = Trainer(cfg)
    tr.resume(run / "checkpoints" / "step_00000002")
    assert tr.step == 2 and [g["lr"] for g in tr.optimizer.param_groups] == [1e-4] * len(tr.optimizer.param_groups)
    before = {n: p.detach().clone() for n, p in tr.params.items()}
    tr.train_step()
    assert any(not torch.equal(before[n], p) for n, p in tr.params.items())
    assert tr.scheduler.get_last_lr()[0] == 1e-4


def test_metrics_cut_to_the_checkpoint_step_on_resume(trained, tmp_path, capsys):
    run = _copy_run(trained, tmp_path)
    assert main(["train", "--config", trained[1], "--run-dir", str(run), "--set", "steps=4",
                 "--resume", "auto"]) == 0
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4]
    capsys.readouterr()
    # from an earlier checkpoint: rows 2..4 are dropped (one atomic rewrite), then logged again
    assert main(["train", "--config", trained[1], "--run-dir", str(run), "--set", "steps=4",
                 "--resume", str(run / "checkpoints" / "step_00000001")]) == 0
    assert "dropped 3 metrics.jsonl row(s)" in capsys.readouterr().out
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4]
    assert not list(run.glob(".metrics*"))


@pytest.mark.parametrize("change, names", [
    ("seed=3", ["seed: 0 in the checkpoint, 3 now"]),
    ("model=tiny-demo", ["model: 'tiny'", "shape(s) differ"]),
    ("data={caption: [{kind: shapes_caption, n: 8}]}", ["data:", "data streams ['refer'] in the checkpoint"]),
])
def test_resume_refuses_another_model_recipe_or_data(trained, tmp_path, capsys, change, names):
    run = _copy_run(trained, tmp_path)
    capsys.readouterr()
    assert main(["train", "--config", trained[1], "--run-dir", str(run), "--set", change, "--resume", "auto"]) == 2
    line = _one_error_line(capsys)
    assert "belongs to another run" in line and "step_00000002" in line, line
    for n in names:
        assert n in line, line


# ---------------------------------------------------------------------------------------------- item 3


def _planted_refcoco(root: Path) -> dict:
    from maskloop.data import fixtures as F

    F.write_refcoco(root, num_images=8, refs_per_image=1, sentences_per_ref=1, size=(32, 40))
    manifest = F.corrupt_fraction(root, "refcoco", frac=0.5, seed=2)
    want = {f"refcoco/{k}": v for k, v in F.count_reasons(manifest).items()}
    assert sum(want.values()) == 4 and len(want) >= 3
    return want


@pytest.mark.parametrize("workers", [0, 2])
def test_planted_bad_files_counted_exactly_with_workers_and_across_a_resume(tmp_path, workers):
    from maskloop.config import TrainConfig
    from maskloop.train.engine import Trainer

    want = _planted_refcoco(tmp_path / "ref")
    mapping = {"recipe": "sft", "model": "tiny", "freeze": "all", "batch_size": 2, "accumulation": 1,
               "log_every": 1, "progress": False, "ema_decay": 0.0, "num_workers": workers, "ckpt_every": 2,
               "run_dir": str(tmp_path / "run"), "steps": 2,
               "data": {"refer": [{"kind": "refcoco", "root": str(tmp_path / "ref"), "split": "all"}]}}
    tr = Trainer(TrainConfig.from_mapping(mapping))
    n = len(tr.streams["refer"].dataset)
    tr.fit()  # half of the samples
    half = {k[len("data_skipped/refer/"):]: v for k, v in tr.history[-1].items() if k.startswith("data_skipped/refer/")}
    assert 0 < sum(half.values()) <= sum(want.values())
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step_00000002" / "state.json").read_text())
    assert saved["extra"]["data_skips"]["refer"]["items"]  # the counter is in the checkpoint

    steps = 2 * n // 2  # resumed: two epochs in all (every sample met, some twice: counted once)
    tr = Trainer(TrainConfig.from_mapping({**mapping, "steps": steps}))
    tr.resume(tmp_path / "run")
    assert tr.streams["refer"].skips.counts() == half  # restored, not restarted from zero
    tr.fit()
    last = tr.history[-1]
    got = {k[len("data_skipped/refer/"):]: v for k, v in last.items() if k.startswith("data_skipped/refer/")}
    assert got == want and last["data_skipped/refer"] == sum(want.values())


# ---------------------------------------------------------------------------------------------- item 4


def _finite_checkpoints(run: Path) -> list[int]:
    from maskloop.train.checkpoint import load_checkpoint

    steps = []
    for step, path in list_checkpoints(run / "checkpoints"):
        ck = load_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in ck["trainable"].values()), path
        steps.append(step)
    return steps


@pytest.mark.parametrize("ckpt_every", [1, 5])
def test_lr_inf_writes_no_nonfinite_checkpoint_and_stops_naming_parameters(tmp_path, capsys, ckpt_every):
    cfg = _config(tmp_path, TINY.replace("steps: 2", "steps: 5") + "lr: .inf\n")
    assert main(["train", "--config", cfg, "--run-dir", str(tmp_path / "run"),
                 "--set", f"ckpt_every={ckpt_every}"]) == 2
    line = _one_error_line(capsys)
    assert "training diverged" in line and "NaN/Inf" in line, line
    assert re.search(r"e\.g\. \['[A-Za-z_][\w.]*'", line), line  # parameters by name, not index
    assert _finite_checkpoints(tmp_path / "run") == []


def test_divergence_after_a_good_checkpoint_keeps_it(trained, tmp_path, capsys):
    run = _copy_run(trained, tmp_path)
    capsys.readouterr()
    assert main(["train", "--config", trained[1], "--run-dir", str(run), "--set", "steps=4", "--set", "lr=.inf",
                 "--resume", "auto"]) == 2
    line = _one_error_line(capsys)
    assert "step_00000002" in line and "intact" in line, line
    assert _finite_checkpoints(run) == [1, 2]


# ---------------------------------------------------------------------------------------------- items 6, 7


BAD = {
    "yaml": ("recipe: sft\nlr: [1e-5\n", ["run.yaml:3:1", "YAML syntax error"]),
    "type": ("recipe: sft\nlr: fast\n", ["lr='fast'", "expected"]),
    "lr<0": ("recipe: sft\nlr: -1e-5\n", ["lr=-1e-05", "> 0"]),
    "batch": ("recipe: sft\nbatch_size: 0\n", ["batch_size=0"]),
    "accumulation": ("recipe: sft\naccumulation: 0\n", ["accumulation=0"]),
    "tau": ("recipe: loop1\nloop1: {tau: 0}\n", ["loop1.tau=0"]),
    "precision": ("recipe: sft\nprecision: fp16\n", ["precision='fp16'", "'bf16'"]),
    "variant": ("recipe: loop1\nloop1: {variant: gumbell}\n", ["loop1.variant='gumbell'", "'gumbel'"]),
    "schedule": ("recipe: sft\nschedule: cosine_warm\n", ["schedule='cosine_warm'"]),
    "distributed": ("recipe: sft\ndistributed: zero3\n", ["distributed='zero3'"]),
    "surgery": ("recipe: dual\ndual: {surgery_mode: sometimes}\n", ["dual.surgery_mode='sometimes'"]),
    "no kind": (TINY.replace("{kind: shapes_refer, n: 8}", "{root: /data/refcoco}"), ["data.refer[0]", "no `kind`"]),
    "unknown kind": (TINY.replace("shapes_refer", "refcoko"), ["data.refer[0]", "'refcoko'"]),
    "unknown key": (TINY.replace("{kind: shapes_refer, n: 8}", "{kind: sa1b, rooot: /data/sa1b}"),
                    ["data.refer[0]", "['rooot']", "'sa1b'"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_error_line_naming_the_key(tmp_path, capsys, name):
    text, must = BAD[name]
    assert main(["train", "--config", _config(tmp_path, text), "--run-dir", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys)
    for m in must:
        assert m in line, line


def test_real_cli_error_line_and_debug_traceback(tmp_path):
    cfg = _config(tmp_path, "recipe: sft\nlr: [1e-5\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MASKLOOP_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "maskloop.cli", "train", "--config", cfg], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {cfg}:3:1: YAML syntax error: "
                                                                   "expected ',' or ']', but got '<stream end>'"]
    r = subprocess.run([sys.executable, "-m", "maskloop.cli", "train", "--config", cfg, "--debug"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr


def test_full_disk_while_checkpointing(trained, tmp_path, capsys, monkeypatch):
    import maskloop.train.checkpoint as C

    run = _copy_run(trained, tmp_path)
    real = C._save_tensors

    def full(tensors, path, step, what):
        if step == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, step, what)

    monkeypatch.setattr(C, "_save_tensors", full)
    capsys.readouterr()
    assert main(["train", "--config", trained[1], "--run-dir", str(run), "--set", "steps=3", "--resume", "auto"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: no space left on device ") and "step_00000003" in line, line
    assert "the previous checkpoint step_00000002 is intact" in line
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1, 2]
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_error_inside_a_data_loader_worker_is_one_line(tmp_path, capsys):
    from maskloop.data import fixtures as F

    F.write_refcoco(tmp_path / "ref", num_images=4, refs_per_image=1, sentences_per_ref=1, size=(32, 40))
    for p in (tmp_path / "ref").rglob("*.jpg"):
        p.write_bytes(b"not a jpeg")  # every image damaged: the source is unusable, found in a worker
    text = TINY.replace("{kind: shapes_refer, n: 8}", f"{{kind: refcoco, root: {tmp_path / 'ref'}, split: all}}")
    assert main(["train", "--config", _config(tmp_path, text), "--run-dir", str(tmp_path / "run"),
                 "--set", "num_workers=2"]) == 2
    line = _one_error_line(capsys)
    assert "refcoco" in line and "worker process" not in line, line

"""``logging: wandb``: the same scalars as metrics.jsonl / TensorBoard in an offline W&B run (read back from
its ``.wandb`` file), images logged, a clear error without the package."""

from __future__ import annotations

import json
import struct
import sys

import numpy as np
import pytest

from maskloop.errors import ConfigError
from maskloop.train.engine import TrainConfig, Trainer
from maskloop.train.logging import RunLogger


def wandb_history(run_dir):
    """The history rows ``{step: {key: value}}`` of the one offline run under ``run_dir/wandb``.

    The ``.wandb`` file is a LevelDB-style log (7-byte ``:W&B`` header, 32 KiB blocks of records
    ``crc32 | length u16 | type u8 | data``, types 1 full / 2 first / 3 middle / 4 last) of ``Record``
    protobufs; the history records hold each logged row as JSON values."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, rows = 7, 32768, b"", {}
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                rows.setdefault(rec.history.step.num, {}).update(row)
    return rows


@pytest.fixture
def offline(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for k in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(k, raising=False)


def test_training_scalars_reach_an_offline_wandb_run(tmp_path, offline):
    cfg = TrainConfig.from_mapping({
        "recipe": "sft", "run_dir": str(tmp_path / "run"), "steps": 3, "batch_size": 2, "accumulation": 1,
        "ckpt_every": 0, "log_every": 1, "progress": False, "lr": 1e-3, "warmup_ratio": 0.0,
        "logging": "wandb", "data": {"refer": [{"kind": "shapes_refer", "n": 8}],
                                     "caption": [{"kind": "shapes_caption", "n": 8}]}})
    tr = Trainer(cfg)
    tr.fit()
    tr.logger.log_image("examples/grid", np.full((20, 30, 3), 200, np.uint8))
    tr.logger.close()
    run_dir = tmp_path / "run"
    assert not (run_dir / "tb").exists()  # W&B instead of TensorBoard
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == [1, 2, 3]
    rows = wandb_history(run_dir)
    assert sorted(rows) == [1, 2, 3]
    for r in jsonl:
        logged = rows[r["step"]]
        expected = {k: v for k, v in r.items() if k != "step"}
        assert {"loss", "lr", "grad_norm", "samples_per_s"} <= set(expected)
        for k, v in expected.items():
            assert logged[k] == pytest.approx(v, rel=1e-6), k
    img = rows[3]
    assert img["examples/grid/_type"] == "image-file" and (img["examples/grid/width"], img["examples/grid/height"]) == (30, 20)
    (png,) = (run_dir / "wandb").glob("offline-run-*/files/" + img["examples/grid/path"])
    assert png.stat().st_size > 0


def test_wandb_offline_flag_without_the_environment(tmp_path, offline, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    logger = RunLogger(tmp_path)
    logger.start({"logging": "wandb", "wandb_offline": True, "wandb_project": "p"})
    logger.log(7, {"loss": 0.5, "samples": 4}, 1.0, {}, {"skipped_steps": 0})
    logger.close()
    row = wandb_history(tmp_path)[7]
    assert row["loss"] == 0.5 and row["samples_per_s"] == 4.0 and row["skipped_steps"] == 0


def test_wandb_selected_but_not_installed_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = TrainConfig.from_mapping({"recipe": "sft", "run_dir": str(tmp_path), "steps": 1, "progress": False,
                                    "logging": "wandb", "data": {"refer": [{"kind": "shapes_refer", "n": 2}]}})
    with pytest.raises(ConfigError, match=r"wandb needs the wandb package: pip install 'maskloop\[wandb\]'"):
        Trainer(cfg).fit()
    with pytest.raises(ConfigError, match="expected one of 'tensorboard', 'wandb'"):
        TrainConfig.from_mapping({"logging": "mlflow"})

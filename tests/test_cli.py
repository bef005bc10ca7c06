"""`maskloop` command line: help, clear errors (exit 2, the thing named), inference on a tiny checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import export_tiny_with_shape
from PIL import Image

from maskloop.cli import main

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter (what a user's shell does)."""
    return subprocess.run([sys.executable, "-m", "maskloop.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


def test_help_lists_every_verb():
    r = _cli("--help")
    assert r.returncode == 0
    for verb in ("demo", "train", "eval", "caption", "segment", "data", "export"):
        assert verb in r.stdout
    r = _cli("export", "--help")
    assert r.returncode == 0 and "sa2va" in r.stdout and "psalm-to-deformable" in r.stdout
    r = _cli("export", "psalm-to-deformable", "--help")
    assert r.returncode == 0 and "baseline" in r.stdout


def test_missing_config_is_one_clear_line(tmp_path):
    r = _cli("train", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert "nope.yaml" in r.stderr and "not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_recipe_and_bad_keys(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("recipe: loop3\nmodel: tiny\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'loop3'" in err and "sft" in err
    cfg.write_text("recipe: sft\nmodel: tiny\nstepz: 3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "stepz" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg.with_name("ok.yaml")), "--set", "steps"]) == 2
    cfg.write_text("recipe: sft\nmodel: tiny\n")
    assert main(["train", "--config", str(cfg), "--set", "steps"]) == 2
    assert "key=value" in capsys.readouterr().err
    cfg.write_text("recipe: sft\nmodel: /no/such/Sa2VA-4B\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "/no/such/Sa2VA-4B" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["caption", "segment", "eval", "export"])
def test_missing_checkpoint_path(tmp_path, capsys, verb):
    ck = str(tmp_path / "missing-run")
    args = {"caption": ["caption", "-c", ck, "--image", "x.png", "--mask", "m.png"],
            "segment": ["segment", "-c", ck, "--image", "x.png", "--text", "the circle"],
            "eval": ["eval", "-c", ck],
            "export": ["export", "sa2va", "-c", ck, "--out", str(tmp_path / "out")]}[verb]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "missing-run" in err and "checkpoint" in err


def test_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "img.png").write_bytes(b"")
    assert main(["segment", "-c", str(tmp_path), "--image", str(tmp_path / "img.png"), "--text", "a"]) == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- a tiny checkpoint


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny model exported as a checkpoint folder, a shapes image and its object mask."""
    return export_tiny_with_shape(tmp_path_factory.mktemp("cli"))


def test_caption_and_segment_write_overlays(exported, capsys):
    r = exported
    assert main(["caption", "-c", str(r / "ckpt"), "--image", str(r / "img.png"), "--mask", str(r / "mask.png"),
                 "--out", str(r / "cap.png"), "--max-new-tokens", "4"]) == 0
    out = Image.open(r / "cap.png")
    assert out.mode == "RGB" and min(out.size) >= 256  # enlarged from the 64x64 image
    assert main(["segment", "-c", str(r / "ckpt"), "--image", str(r / "img.png"), "--text", "the red circle",
                 "--out", str(r / "seg.png"), "--mask-out", str(r / "pred.png")]) == 0
    assert "mask:" in capsys.readouterr().out
    assert Image.open(r / "seg.png").size == out.size
    assert Image.open(r / "pred.png").size == (64, 64)  # the mask at the input image's size


def test_segment_question_and_several_regions(exported, capsys):
    """`segment --question`: free generation, one overlay per generated [SEG] (numbered); `caption` with two masks
    (Sa2VA's N-region prompt)."""
    from maskloop.inference import load_model, segment_question

    r = exported
    assert main(["segment", "-c", str(r / "ckpt"), "--image", str(r / "img.png"), "--question",
                 "please segment the red circle .", "--max-new-tokens", "3", "--out", str(r / "q.png")]) == 0
    assert "mask(s)" in capsys.readouterr().err
    model = load_model(r / "ckpt")
    # every answer token a [SEG]: 3 generated, the last never fed back -> 2 masks
    logits, seg = model.lm_logits, model.builder.seg_id
    model.lm_logits = lambda h: logits(h).index_add(-1, torch.tensor([seg]), torch.full((*h.shape[:-1], 1), 1e4))
    answer, masks, pngs = segment_question(model, str(r / "img.png"), "segment it", r / "multi.png",
                                           r / "multi_mask.png", max_new_tokens=3)
    assert answer.count("[SEG]") == 3 and len(masks) == 2 and masks[0].shape == (64, 64)
    assert [p.name for p in pngs] == ["multi_1.png", "multi_2.png"] and (r / "multi_mask_2.png").is_file()
    Image.fromarray(np.eye(64, dtype=np.uint8) * 255).save(r / "mask2.png")
    assert main(["caption", "-c", str(r / "ckpt"), "--image", str(r / "img.png"), "--mask", str(r / "mask.png"),
                 str(r / "mask2.png"), "--out", str(r / "cap2.png"), "--max-new-tokens", "3"]) == 0


def test_caption_rejects_empty_mask_and_missing_image(exported, capsys):
    r = exported
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(r / "empty.png")
    assert main(["caption", "-c", str(r / "ckpt"), "--image", str(r / "img.png"), "--mask", str(r / "empty.png")]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["caption", "-c", str(r / "ckpt"), "--image", str(r / "nope.png"), "--mask", str(r / "mask.png")]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_eval_writes_json_and_table(exported, capsys):
    r = exported
    assert main(["eval", "-c", str(r / "ckpt"), "--shapes", "6", "--batch-size", "4", "--max-new-tokens", "4",
                 "--out", str(r / "res.json"), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "refcoco+" in table and "refcocog (umd)" in table and "testA" in table  # the papers' layout
    assert "no-[SEG] %" in table and "cycle_mIoU=" in table
    res = json.loads((r / "res.json").read_text())
    assert res["refer"]["shapes_val"]["n"] == 6 and res["cycle"]["shapes_val"]["n"] == 6
    assert res["refer"]["shapes_val"]["n_scored"] == 6 and res["refer"]["shapes_val"]["n_skipped"] == 0
    assert res["counts"]["refer/shapes_val"] == {"n_scored": 6, "n_skipped": 0}
    assert "CIDEr" in res["caption"]["shapes_val"]


def test_train_resume_and_run_directory_inference(tmp_path, capsys):
    """`train` on the shapes world, `--resume auto`, then a training run dir serves `segment` / `export`."""
    run = tmp_path / "run"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "recipe: sft\nmodel: tiny\nfreeze: all\nsteps: 2\nbatch_size: 2\naccumulation: 1\nckpt_every: 1\n"
        "log_every: 1\nprogress: false\n"
        "data:\n  refer: [{kind: shapes_refer, n: 8}]\n  caption: [{kind: shapes_caption, n: 8}]\n")
    assert main(["train", "--config", str(cfg), "--run-dir", str(run)]) == 0
    assert (run / "checkpoints" / "step_00000002" / "state.json").is_file()
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), "--set", "steps=3", "--resume", "auto"]) == 0
    assert "step_00000002" in capsys.readouterr().out
    assert (run / "checkpoints" / "step_00000003").is_dir()

    from maskloop.data.sources.shapes import ShapesReferDataset
    from maskloop.inference import load_model
    from maskloop.train.checkpoint import load_checkpoint

    model = load_model(run)  # rebuilt from train_config.json + the latest trained weights
    ck = load_checkpoint(run / "checkpoints")
    name = next(iter(ck["trainable"]))
    assert torch.equal(dict(model.named_parameters())[name].detach(), ck["trainable"][name])
    Image.fromarray(ShapesReferDataset(1, seed="val").raw(0)["image"]).save(tmp_path / "img.png")
    assert main(["segment", "-c", str(run), "--image", str(tmp_path / "img.png"), "--text", "the square",
                 "--out", str(tmp_path / "o.png")]) == 0
    assert main(["export", "sa2va", "-c", str(run), "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "maskloop_config.json").is_file()


def test_data_check_reports_unusable_source(tmp_path, capsys):
    rc = main(["data", "check", "--source", "refcoco", str(tmp_path / "nothing"), "--no-progress"])
    assert rc != 0
    assert "nothing" in capsys.readouterr().out

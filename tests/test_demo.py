"""The quick embedded demo end to end (what CI runs): metrics computed, report written, training helps, the masks
follow the text."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from maskloop.cli import main
from maskloop.demo import run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo")
    res = run_demo(run_dir, quick=True, progress=False)
    return run_dir, res


@pytest.mark.slow
def test_quick_demo_metrics_beat_the_untrained_model(demo):
    run_dir, res = demo
    s = res["summary"]
    for stage in ("untrained", "sft", "dual"):
        for k, v in s[stage].items():
            assert math.isfinite(v), (stage, k, v)
    # referring segmentation and captioning are learned; the dual loop keeps them
    assert s["sft"]["refer_cIoU"] > s["untrained"]["refer_cIoU"] + 0.1
    assert s["dual"]["refer_cIoU"] > s["untrained"]["refer_cIoU"] + 0.1
    assert s["sft"]["caption_CIDEr"] > s["untrained"]["caption_CIDEr"] + 0.5
    assert s["dual"]["cycle_mIoU"] > s["untrained"]["cycle_mIoU"]
    # the masks follow the text: segmenting each image for another object's expression gives another mask
    # (1 - mean IoU of the two; 0 for a model that segments the same region whatever it is asked)
    assert s["untrained"]["refer_text_sensitivity"] < 0.1
    assert s["sft"]["refer_text_sensitivity"] > 0.3
    assert s["dual"]["refer_text_sensitivity"] > 0.3
    saved = json.loads((run_dir / "metrics.json").read_text())
    for stage in s:
        assert saved["summary"][stage] == pytest.approx(s[stage])
    assert saved["dual"]["refer"]["n"] == res["settings"]["val_scenes"]


@pytest.mark.slow
def test_quick_demo_report_and_model(demo, capsys):
    run_dir, res = demo
    md = (run_dir / "report.md").read_text()
    html = (run_dir / "report.html").read_text()
    for name in ("curves.png", "examples_dual.png", "examples_sft.png", "video_strip.png"):
        assert name in md and name in html
        with Image.open(run_dir / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    # the video result: a strip of the first held-out clip (4 rows: two video paths, per-frame, ground truth)
    # and J / F / J&F of every path over the clips, under the strip in both reports
    video = res["video"]
    n_clips, n_frames = video["settings"]["clips"], video["settings"]["frames"]
    with Image.open(run_dir / "video_strip.png") as im:
        assert im.size == (96 * n_frames + 2 * (n_frames - 1), 96 * 4 + 2 * 3)
    from maskloop.demo_video import PATHS

    for key, name in PATHS.items():
        r = video["paths"][key]
        assert r["n"] == n_clips and all(0.0 <= r[m] <= 1.0 for m in ("J", "F", "J&F")), (key, r)
        assert name in md and name in html
    assert 0 <= video["no_seg"]["generate"] <= n_clips
    assert md.index("video_strip.png") < md.index("| per-frame image path |")
    assert "after dual loop" in md and "refer_cIoU" in html
    assert (run_dir / "sft" / "metrics.jsonl").is_file() and (run_dir / "dual" / "metrics.jsonl").is_file()
    # the example grids are in the dual run's scalar log too (TensorBoard here; W&B with --logging wandb)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "dual" / "tb"))
    events.Reload()
    assert {"examples/after_sft", "examples/after_dual"} <= set(events.Tags()["images"])
    # the run directory serves inference
    from maskloop.data.sources.shapes import ShapesReferDataset

    raw = ShapesReferDataset(1, seed="test").raw(0)
    Image.fromarray(raw["image"]).save(run_dir / "img.png")
    Image.fromarray(raw["mask"].astype("uint8") * 255).save(run_dir / "mask.png")
    assert main(["caption", "-c", str(run_dir), "--image", str(run_dir / "img.png"), "--mask",
                 str(run_dir / "mask.png"), "--out", str(run_dir / "cap.png")]) == 0
    caption = capsys.readouterr().out.strip()
    assert caption and caption.split()[0] == "a"  # shapes captions read "a <size> <colour> <shape> ..."

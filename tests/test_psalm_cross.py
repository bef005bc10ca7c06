"""Cross-image region segmentation: PSALM's build_DAVIS json read as released, collated, trained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from maskloop.data.fixtures_cross import write_cross_image_psalm
from maskloop.data.psalm import PSALMCollator, PSALMTransform
from maskloop.data.sources.coco_interactive_cross import COCOInteractiveCrossDataset
from maskloop.model.psalm.model import PSALMModel, psalm_config


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    return write_cross_image_psalm(tmp_path_factory.mktemp("davis"), num_videos=2, frames=3)


def _png_ids(path, size):
    return np.asarray(Image.open(path).resize((size, size), Image.Resampling.NEAREST))


# follows zamling/PSALM datasets/build_DAVIS.py L93-L99 (row keys), L88-L91 (first_frame_anns)
#   (commit d5dbfda)
def test_reads_release_layout(cross):
    rows = json.loads(cross["json"].read_text())
    assert len(rows) == 4 and set(rows[0]) == {"image", "image_info", "anns", "first_frame_image", "first_frame_anns",
                                               "new_img_id", "video_name"}
    ds = COCOInteractiveCrossDataset(cross["json"], cross["root"], transform=PSALMTransform(32, 16))
    assert len(ds) == 4 and ds.skip_counts() == {}
    s = ds[1]
    assert s["task"] == "cross_image" and s["pixel_values"].shape == (3, 32, 32)
    assert s["prompt_pixel_values"].shape == (3, 32, 32) and not torch.equal(s["pixel_values"], s["prompt_pixel_values"])
    R = s["region_masks"].shape[0]
    assert R >= 1 and s["masks"].shape == (R, 16, 16) and s["labels"].tolist() == list(range(R))
    # regions are the first frame's objects, targets the same objects in the later frame (by id)
    ann = cross["root"] / "2017/trainval/Annotations/480p" / rows[1]["video_name"]
    first, target = _png_ids(ann / "00000.png", 16), _png_ids(ann / "00002.png", 16)
    for r, c in enumerate(s["category_ids"]):
        assert np.array_equal(s["region_masks"][r].numpy() > 0, first == c)
        assert np.array_equal(s["masks"][r].numpy() > 0, target == c)


# pairing rule follows zamling/PSALM datasets/build_DAVIS.py L88-L91 (commit d5dbfda); the skip counting is
#   not cited
def test_bad_rows_skipped_and_counted(cross, tmp_path):
    rows = json.loads(cross["json"].read_text())
    rows[0].pop("first_frame_anns")  # malformed
    rows[1]["first_frame_anns"] = rows[1]["first_frame_anns"][:1] + [{**rows[1]["first_frame_anns"][0],
                                                                       "category_id": 99.0}]  # does not pair
    rows[2]["anns"][0]["segmentation"] = {"counts": "@@@not-rle", "size": [48, 64]}  # undecodable
    rows.append({**rows[3], "image": "2017/trainval/JPEGImages/480p/nope/00001.jpg"})  # missing image
    p = tmp_path / "cross.json"
    p.write_text(json.dumps(rows))
    ds = COCOInteractiveCrossDataset(p, cross["root"], transform=PSALMTransform(32, 16))
    assert len(ds) == 3 and ds.skip_counts() == {"coco_interactive_cross/bad_json": 2}
    got = [ds[i] for i in range(len(ds))]
    assert all(g["task"] == "cross_image" for g in got)
    counts = ds.skip_counts()
    assert counts["coco_interactive_cross/bad_json"] == 2
    assert counts.get("coco_interactive_cross/bad_rle") == 1 and counts.get("coco_interactive_cross/missing_file") == 1


def test_mixed_task_collate_and_forward(cross):
    cfg = psalm_config("psalm-tiny")
    ds = COCOInteractiveCrossDataset(cross["json"], cross["root"], transform=PSALMTransform(cfg.image_size, 16))
    cs = [ds[0], ds[2]]
    region = {k: v for k, v in ds[1].items() if k != "prompt_pixel_values"}
    region["task"] = "region"
    tok = type("Tok", (), {"encode": lambda self, t, add_special_tokens=False: [5 + len(w) % 50 for w in t.split()],
                           "pad_token_id": 0})()
    batch = PSALMCollator(cfg, tok)([cs[0], region, cs[1]])
    groups = {g["task"]: g for g in batch["groups"]}
    assert set(groups) == {"cross_image", "region"} and groups["cross_image"]["index"] == [0, 2]
    g = groups["cross_image"]["inputs"]
    assert g["prompt_pixel_values"].shape == (2, 3, cfg.image_size, cfg.image_size)
    ids = g["input_ids"]
    t = cfg.tokens
    assert bool(((ids == t.image1).sum(1) == (ids == t.image).sum(1)).all()) and bool(((ids == t.image1_deform).sum(1) == 1).all())
    model = PSALMModel(cfg).eval()
    with torch.no_grad():
        out = model("cross_image", **g)
    R = g["region_masks"].shape[1]
    assert out.region_logits[-1].shape == (2, cfg.num_queries, R + 1)


def test_tiny_cross_image_training_loss_falls(cross, tmp_path):
    """`recipe: psalm` with `cross_image: true` trains the cross-image task through the Trainer."""
    from maskloop.recipes.psalm import train_psalm

    torch.set_num_threads(1)
    data = [{"kind": "coco_interactive_cross", "json_path": str(cross["json"]), "image_dir": str(cross["root"])}]
    cfg = dict(model="psalm-tiny", data=data, cross_image=True, max_steps=10, batch_size=2, accumulation=1, lr=1e-3, warmup_ratio=0.0,
               num_workers=0, num_points=64, run_dir=str(tmp_path / "run"), progress=False, ckpt_every=100, seed=0)
    hist = train_psalm(cfg)
    loss = [h["loss/cross_image"] for h in hist]
    assert len(loss) == 10 and sum(loss[-3:]) / 3 < 0.8 * sum(loss[:3]) / 3, loss


def test_recipe_starts_from_the_mask2former_pkl(cross, tmp_path):
    """`vision_tower: model_final.pkl` in a psalm recipe loads the Swin / mask head through the map."""
    from maskloop.model.psalm.checkpoints import native_to_detectron2, write_detectron2_pkl
    from maskloop.model.psalm.model import PSALMModel
    from maskloop.recipes.psalm import build_psalm

    torch.manual_seed(5)
    donor = PSALMModel(psalm_config("psalm-tiny"))
    pkl = write_detectron2_pkl(tmp_path / "model_final_x.pkl", native_to_detectron2(donor))
    data = [{"kind": "coco_interactive_cross", "json_path": str(cross["json"]), "image_dir": str(cross["root"])}]
    built = build_psalm({"model": "psalm-tiny", "data": data, "cross_image": True, "vision_tower": str(pkl)})
    m = built["model"]
    torch.testing.assert_close(m.vision_tower.hidden_states_norms["stage1"].weight,
                               donor.vision_tower.hidden_states_norms["stage1"].weight)
    torch.testing.assert_close(m.pixel_decoder.level_embed, donor.pixel_decoder.level_embed)


def test_cross_image_switch_and_its_data_agree(cross, tmp_path):
    from maskloop.config import ConfigError, TrainConfig
    from maskloop.recipes.psalm import build_psalm

    data = [{"kind": "coco_interactive_cross", "json_path": str(cross["json"]), "image_dir": str(cross["root"])}]
    with pytest.raises(ConfigError, match="cross_image: true"):
        build_psalm({"model": "psalm-tiny", "data": data})
    other = [{"kind": "coco_interactive", "json_path": str(tmp_path / "x.json"), "image_dir": str(tmp_path)}]
    with pytest.raises(ConfigError, match="no cross-image source"):
        build_psalm({"model": "psalm-tiny", "data": other, "cross_image": True})
    # the nested `recipe: psalm` config (maskloop train --config) reads the switch too
    cfg = TrainConfig.from_mapping({"recipe": "psalm", "model": "psalm-tiny", "psalm": {"data": data,
                                                                                        "cross_image": True}})
    built = build_psalm(cfg)
    assert [s.psalm_task for s in built["dataset"].sources] == ["cross_image"]
    assert build_psalm({"model": "psalm-tiny", "data": data}, eval_mode=True)["dataset"].repeats == [1]


def test_data_check_counts_and_lists_skipped_rows(cross, tmp_path, capsys):
    """`maskloop data check --source coco_interactive_cross JSON` on the fixture, good and damaged."""
    from maskloop.cli import main
    from maskloop.data.check import main_check

    args = ["--sam-size", "32", "--no-progress"]
    assert main_check(["--source", "coco_interactive_cross", str(cross["json"]), *args]) == 0
    out = capsys.readouterr().out
    assert "samples: 4 indexed, 4 ok, 0 skipped" in out and "bad items by reason: none" in out
    rows = json.loads(cross["json"].read_text())
    rows[0].pop("first_frame_anns")  # malformed: dropped at indexing
    rows[2]["anns"][0]["segmentation"] = {"counts": "@@@not-rle", "size": [48, 64]}  # undecodable: skipped at read
    rows.append({**rows[3], "image": "2017/trainval/JPEGImages/480p/nope/00001.jpg"})  # missing image
    bad = cross["json"].parent / "damaged.json"  # beside the release json: image_dir found above it
    bad.write_text(json.dumps(rows))
    assert main_check(["--source", "coco_interactive_cross", str(bad), *args]) == 0
    out = capsys.readouterr().out
    assert "samples: 4 indexed, 2 ok, 2 skipped" in out, out
    assert "bad_json=1" in out and "bad_rle=1" in out and "missing_file=1" in out
    assert "[missing_file]" in out and "nope/00001.jpg" in out
    # through the CLI, with an explicit image_dir; a json that is not there is unusable (exit 1)
    assert main(["data", "check", "--source", f"coco_interactive_cross:image_dir={cross['root']}", str(bad),
                 *args]) == 0
    assert main(["data", "check", "--source", "coco_interactive_cross", str(tmp_path / "none.json"), *args]) == 1
    assert "UNUSABLE" in capsys.readouterr().out

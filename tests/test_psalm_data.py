import json

import numpy as np
import pytest
import torch

from maskloop.data.fixtures import write_coco_psalm, write_shapes_psalm
from maskloop.data.psalm import PSALMCollator, PSALMMixture, PSALMTransform, SourceBatchSampler
from maskloop.data.sources.coco_instances import COCOInstancesDataset
from maskloop.data.sources.coco_interactive import PROMPT_TYPES, COCOInteractiveDataset, thicken
from maskloop.data.sources.coco_panoptic import COCOPanopticDataset, id_to_rgb, rgb_to_id
from maskloop.data.sources.refcoco import RefCOCODataset
from maskloop.data.transforms import SampleTransform
from maskloop.model.psalm.model import psalm_config

TF = PSALMTransform(image_size=64, mask_size=32)


@pytest.fixture()
def coco(tmp_path):
    return write_coco_psalm(tmp_path / "coco", num_images=3, crowd=True)


def test_panoptic_reader(coco):
    ds = COCOPanopticDataset(coco["root"], split="val2017", transform=TF)
    assert len(ds) == 3 and ds.class_names == ["rectangle", "ellipse", "background"] and ds.isthing == [True, True, False]
    s = ds[0]
    assert s["task"] == "panoptic" and s["pixel_values"].shape == (3, 64, 64) and s["pixel_values"].dtype == torch.float32
    assert s["panoptic_map"].shape == (32, 32) and s["panoptic_map"].dtype == torch.int64
    crowd = [g for g in s["segments"] if g["iscrowd"]]
    assert len(crowd) == 1  # kept for PQ ...
    assert len(s["masks"]) == len(s["segments"]) - 1 == len(s["labels"])  # ... but not a target
    assert s["masks"].dtype == torch.float32 and s["labels"].dtype == torch.long
    assert 2 in s["labels"].tolist()  # the stuff segment
    for m, lab in zip(s["masks"], s["labels"]):
        assert bool(((s["semantic_map"] == lab) | (m == 0)).all())
    assert 255 in s["semantic_map"].unique().tolist()  # the void border
    sem = COCOPanopticDataset(coco["root"], split="val2017", task="semantic", transform=TF)[1]
    assert sem["task"] == "semantic" and sorted(sem["labels"].tolist()) == sorted(set(sem["labels"].tolist()))


def test_panoptic_id_roundtrip():
    ids = np.array([[0, 1, 256], [65536 + 7, 255, 12345678]])
    assert (rgb_to_id(id_to_rgb(ids)) == ids).all()


def test_panoptic_corrupt_png_is_skipped(coco):
    png = sorted(coco["panoptic_pngs"].glob("*.png"))[1]
    png.write_bytes(png.read_bytes()[:40])
    ds = COCOPanopticDataset(coco["root"], split="val2017", transform=TF)
    ids = [ds[i]["image_id"] for i in range(len(ds))]
    assert ids == [1, 3, 3]  # sample 1 replaced by the next valid one
    assert ds.skip_counts() == {"coco_panoptic/corrupt_mask": 1}


def test_instances_reader_and_bad_polygon(coco):
    ds = COCOInstancesDataset(coco["root"], split="val2017", transform=TF)
    s = ds[0]
    assert s["task"] == "instance" and s["class_names"] == ["rectangle", "ellipse"]
    assert s["masks"].shape[1:] == (32, 32) and len(s["masks"]) == len(s["labels"]) == 1
    assert s["crowd_masks"].shape == (1, 32, 32) and s["crowd_labels"].tolist() == [0]  # uncompressed RLE crowd
    data = json.loads(coco["instances_json"].read_text())
    bad = next(a for a in data["annotations"] if a["image_id"] == 2)
    bad["segmentation"] = [[1.0, 2.0, 3.0]]
    coco["instances_json"].write_text(json.dumps(data))
    ds = COCOInstancesDataset(coco["root"], split="val2017", transform=TF)
    assert ds[1]["image_id"] == 3
    assert ds.skip_counts() == {"coco_instances/bad_rle": 1}
    assert ds.bad_items()[0][0] == f"instances_val2017.json#ann{bad['id']}"


def test_interactive_reader(coco):
    sizes = {}
    for t in PROMPT_TYPES:
        ds = COCOInteractiveDataset(coco["interactive_json"], coco["images"], prompt_type=t, transform=TF)
        s = ds[1]
        assert s["task"] == "region" and s["prompt_type"] == t
        R = len(s["labels"])
        assert s["region_masks"].shape == (R, 32, 32) == s["masks"].shape and s["labels"].tolist() == list(range(R))
        sizes[t] = s["region_masks"].sum().item()
    assert sizes["box"] >= sizes["mask"]
    ds = COCOInteractiveDataset(coco["interactive_json"], coco["images"], transform=TF, seed=3)
    assert {ds[i]["prompt_type"] for i in range(len(ds))} <= {"box", "scribble", "point"}


def test_thicken_discs():
    m = np.zeros((41, 41), bool)
    m[20, 20] = True
    disc = thicken(m, 10)
    yy, xx = np.mgrid[:41, :41]
    assert (disc == ((yy - 20) ** 2 + (xx - 20) ** 2 <= 100)).all()


def test_interactive_corrupt_image_is_skipped(coco):
    jpg = sorted(coco["images"].glob("*.jpg"))[0]
    jpg.write_bytes(jpg.read_bytes()[:100])
    ds = COCOInteractiveDataset(coco["interactive_json"], coco["images"], prompt_type="box", transform=TF)
    assert ds[0]["image_id"] == 1  # entry 0 (image 1) is bad -> entry 1
    assert ds.skip_counts() == {"coco_interactive/corrupt_image": 1}


@pytest.fixture(scope="module")
def shapes_mix(tmp_path_factory):
    p = write_shapes_psalm(tmp_path_factory.mktemp("shapes"), n=3)
    pan = COCOPanopticDataset(p["coco_root"], split="train2017", transform=TF)
    reg = COCOInteractiveDataset(p["interactive_json"], p["images"], prompt_type="point", transform=TF)
    ref = RefCOCODataset(p["refer_root"], transform=SampleTransform(image_size=64, sam_size=32))
    return p, pan, reg, ref


def test_shapes_mix_collate(shapes_mix):
    from maskloop.recipes.psalm import PSALM_DEFAULTS, _tokenizer

    _, pan, reg, ref = shapes_mix
    assert pan.class_names == ["circle", "square", "triangle", "background"]
    mix = PSALMMixture({"pan": pan, "reg": reg, "ref": ref})
    tok = _tokenizer(dict(PSALM_DEFAULTS), pan.class_names)
    cfg = psalm_config("psalm-tiny")
    col = PSALMCollator(cfg, tok)
    batch = col([mix[0], mix[len(pan)], mix[len(pan) + len(reg)], mix[1]])
    assert batch["size"] == 4 and [g["task"] for g in batch["groups"]] == ["panoptic", "region", "referring"]
    g = {x["task"]: x for x in batch["groups"]}
    p = g["panoptic"]["inputs"]
    assert g["panoptic"]["index"] == [0, 3]
    assert p["class_name_ids"].shape[:2] == (2, 4) and p["class_valid"].all()
    assert ((p["input_ids"] == cfg.tokens.cls).sum(1) == 4).all()
    assert ((p["input_ids"] == cfg.tokens.seg).sum(1) == cfg.num_queries).all()
    assert (p["labels"] != -100).sum() == 2  # the [SEG] token of each prompt
    r = g["region"]["inputs"]
    assert r["region_masks"].shape[0] == 1 and r["region_valid"].sum() == (r["input_ids"] == cfg.tokens.region).sum()
    f = g["referring"]["inputs"]
    assert f["refer_mask"].sum() > 0 and g["referring"]["targets"][0]["masks"].shape == (1, 32, 32)
    assert int(p["input_ids"].max()) < cfg.vocab_size


def test_source_batch_sampler():
    s0 = SourceBatchSampler([5, 4], batch_size=2, seed=1, num_replicas=2, rank=0)
    s1 = SourceBatchSampler([5, 4], batch_size=2, seed=1, num_replicas=2, rank=1)
    b0, b1 = list(s0), list(s1)
    assert len(b0) == len(b1) == len(s0) == 2
    for b in b0 + b1:
        assert len(b) == 2 and (all(i < 5 for i in b) or all(i >= 5 for i in b))  # one source per batch
    assert not set(sum(b0, [])) & set(sum(b1, []))
    assert list(s0) == b0  # deterministic within an epoch
    s0.load_state_dict({"epoch": 0, "skip": 1})
    assert list(s0) == b0[1:]  # resume skips consumed batches

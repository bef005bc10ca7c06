"""Every released format, written by the fixtures module and read through the public API."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from maskloop.data import (
    DAMDataset,
    OpenImagesDataset,
    RefCOCODataset,
    SA1BDataset,
    SampleTransform,
    SAVDataset,
    SAVPairsDataset,
    write_sav_pairs,
)
from maskloop.data import fixtures as F
from maskloop.data.io import decode_segmentation, rle_counts, validate_rle
from maskloop.data.robust import SampleError
from maskloop.data.sources.sav import iter_video_frames, read_video_frames

S, G, GRID = 56, 128, 4
T = SampleTransform(S, G, GRID)
SINGLE = ("pixel_values", "g_pixel_values", "prompt_masks", "masks")


def _check_tensors(sample, suffix=""):
    pv, gp = sample["pixel_values" + suffix], sample["g_pixel_values" + suffix]
    pm, m = sample["prompt_masks" + suffix], sample["masks" + suffix]
    assert pv.shape == (3, S, S) and pv.dtype == torch.float32 and torch.isfinite(pv).all()
    assert -2.2 < pv.min() and pv.max() < 2.7
    assert gp.shape == (3, G, G) and gp.dtype == torch.uint8
    assert pm.shape == (GRID, GRID) and pm.dtype == torch.uint8 and set(pm.unique().tolist()) <= {0, 1}
    assert m.shape == (G, G) and m.dtype == torch.float32 and set(m.unique().tolist()) <= {0.0, 1.0}
    assert m.sum() > 0


def _direct(path_or_img):
    img = path_or_img if isinstance(path_or_img, Image.Image) else Image.open(path_or_img)
    return np.asarray(img.convert("RGB").resize((G, G), Image.Resampling.BICUBIC)).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("fx")
    info = {
        "sa1b": F.write_sa1b(root / "sa1b", num_images=3),
        "sa1b_tar": F.write_sa1b(root / "sa1b_tar", num_images=5, as_tar=True, images_per_tar=2),
        "refcoco": F.write_refcoco(root / "refcoco", num_images=4),
        "refcocog": F.write_refcoco(root / "refcoco", dataset="refcocog", num_images=4),
        "oi": F.write_openimages(root / "oi", num_images=3),
        "oi_zip": F.write_openimages(root / "oi_zip", num_images=3, zipped=True),
        "dam": F.write_dam(root / "dam", splits=("COCOStuff", "SAV"), num_images=4),
        "sav": F.write_sav(root / "sav", num_videos=2),
    }
    return root, info


def test_rle_parser_matches_pycocotools():
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(0)
    m = rng.random((37, 23)) > 0.6
    r = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    runs = rle_counts(r["counts"])
    assert sum(runs) == 37 * 23 and sum(runs[1::2]) == m.sum()
    assert validate_rle({"size": [37, 23], "counts": r["counts"].decode()}) == (37, 23)
    with pytest.raises(SampleError) as e:
        validate_rle({"size": [37, 23], "counts": r["counts"].decode() + "55"})
    assert e.value.reason == "bad_rle"
    assert np.array_equal(decode_segmentation({"size": [37, 23], "counts": r["counts"].decode()}), m)


def test_sa1b_folder(fx):
    root, info = fx
    ds = SA1BDataset(root / "sa1b", transform=T)
    assert len(ds) == info["sa1b"]["num_annotations"]
    for i in range(len(ds)):
        s = ds[i]
        _check_tensors(s)
        assert s["dataset"] == "sa1b" and s["caption"] is None
    # g_pixel_values is the direct resize of the original file
    assert np.array_equal(ds[0]["g_pixel_values"].numpy(), _direct(root / "sa1b" / "sa_1.jpg"))
    # the mask is the annotation's RLE, resized
    meta = json.loads((root / "sa1b" / "sa_1.json").read_text())
    m = decode_segmentation(meta["annotations"][0]["segmentation"])
    want = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((G, G), Image.Resampling.NEAREST)) > 0
    assert np.array_equal(ds[0]["masks"].numpy() > 0, want)


def test_sa1b_tar_min_area_max_images(fx):
    root, info = fx
    ds = SA1BDataset(root / "sa1b_tar", transform=T)
    assert len(ds) == info["sa1b_tar"]["num_annotations"]
    assert all(loc[0] == "tar" for loc, *_ in ds.images)
    _check_tensors(ds[len(ds) - 1])
    assert len(SA1BDataset(root / "sa1b_tar", transform=T, max_images=2)) == 4
    areas = sorted(a["area"] for p in (root / "sa1b").glob("*.json") for a in json.loads(p.read_text())["annotations"])
    thr = areas[len(areas) // 2]
    assert len(SA1BDataset(root / "sa1b", transform=T, min_area=thr)) == sum(a >= thr for a in areas)
    # a single shard path works too
    assert len(SA1BDataset(root / "sa1b_tar" / "sa_000000.tar", transform=T)) == 4


def test_refcoco_splits_and_expressions(fx):
    root, info = fx
    train = RefCOCODataset(root / "refcoco", dataset="refcoco", split_by="unc", split="train", transform=T)
    assert len(train) == info["refcoco"]["splits"]["train"] * 2
    s = train[0]
    _check_tensors(s)
    assert s["dataset"] == "refcoco" and isinstance(s["expression"], str) and s["expression"].startswith("the ")
    assert train.text_length(0) == len(s["expression"])
    img = root / "refcoco" / "images" / "train2014" / "COCO_train2014_000000001000.jpg"
    assert np.array_equal(s["g_pixel_values"].numpy(), _direct(img))
    everything = RefCOCODataset(root / "refcoco", split="all", transform=T)
    for i in range(len(everything)):  # includes the crowd (uncompressed RLE) annotations
        _check_tensors(everything[i])
    val = RefCOCODataset(root / "refcoco", dataset="refcocog", split="val", transform=T,
                         image_dir=root / "refcoco" / "images" / "train2014")
    assert len(val) == info["refcocog"]["splits"]["val"] * 2


def test_openimages_folder_and_zip(fx):
    root, info = fx
    for key in ("oi", "oi_zip"):
        ds = OpenImagesDataset(root / key, split="train", transform=T)
        assert len(ds) == info[key]["num_masks"]
        caps = [ds[i]["caption"] for i in range(len(ds))]
        assert caps == info[key]["captions"]
        s = ds[1]  # stored at half resolution: resized to the image first
        _check_tensors(s)
        image_id = ds.items[1][1]
        assert np.array_equal(s["g_pixel_values"].numpy(), _direct(root / key / "train" / f"{image_id}.jpg"))


def test_dam_reader_and_index_cache(fx, tmp_path):
    root, info = fx
    cache = tmp_path / "cache"
    ds = DAMDataset(root / "dam", splits=["COCOStuff", "SAV"], transform=T, cache_dir=cache)
    assert len(ds) == info["dam"]["num_regions"]
    files = list(cache.glob("*.json"))
    assert len(files) == 2
    for i in range(len(ds)):
        s = ds[i]
        _check_tensors(s)
        assert s["caption"].startswith("A ") and s["dataset"] == "dam"
    # second construction uses the cache (does not rescan the shards)
    import maskloop.data.sources.dam as dam_mod

    calls = []
    orig = dam_mod.scan_tar
    dam_mod.scan_tar = lambda p: calls.append(p) or orig(p)
    try:
        ds2 = DAMDataset(root / "dam", transform=T, cache_dir=cache)
    finally:
        dam_mod.scan_tar = orig
    assert calls == [] and len(ds2) == len(ds)
    # mask from the inner pickle gives the same masks
    ds3 = DAMDataset(root / "dam", splits=["SAV"], transform=T, cache_dir=cache, mask_from="pickle")
    ds4 = DAMDataset(root / "dam", splits=["SAV"], transform=T, cache_dir=cache)
    assert torch.equal(ds3[0]["masks"], ds4[0]["masks"])
    # g_pixel_values equals a direct resize of the original member image
    import tarfile

    with tarfile.open(root / "dam" / "SAV" / "images" / "00000000.tar") as tf:
        img = Image.open(tf.extractfile("000000000001.jpg"))
        img.load()
    assert np.array_equal(ds4[0]["g_pixel_values"].numpy(), _direct(img))


def test_video_frame_indexing(fx):
    root, _ = fx
    mp4 = root / "sav" / "sav_000001.mp4"
    every = read_video_frames(mp4, range(16))
    assert sorted(every) == list(range(16))
    some = read_video_frames(mp4, [12, 4, 0])
    for k in (0, 4, 12):
        assert np.array_equal(np.asarray(some[k]), np.asarray(every[k]))
    assert [k for k, _ in iter_video_frames(mp4, [8, 0])] == [0, 8]
    with pytest.raises(SampleError) as e:
        read_video_frames(mp4, [40])
    assert e.value.reason == "bad_video"


def test_sav_pairs_from_release(fx):
    root, info = fx
    ds = SAVDataset(root / "sav", transform=T, frame_gap=(1, 2))
    # masklet 0 visible in 4 annotated frames, masklet 1 in 3, per video
    assert len(ds) == 2 * (4 + 3)
    for i in range(len(ds)):
        s = ds[i]
        _check_tensors(s, "1")
        _check_tensors(s, "2")
        k1, k2 = int(ds._frame[i]), ds.partner(i)
        assert 1 <= abs(k2 - k1) <= 2
    # the masks line up with the decoded frames: pixels under mask1 have the masklet's colour
    raw = ds.raw_pair(0)
    frame = np.asarray(raw["images"][0]).astype(float)
    m = decode_segmentation(raw["rles"][0])
    inside = frame[m].mean(0)
    outside = frame[~m].mean(0)
    assert np.abs(inside - outside).sum() > 60
    auto = SAVDataset(root / "sav", transform=T, use_manual=False, use_auto=True)
    assert len(auto) == 2 * 4
    assert SAVDataset(root / "sav", transform=T, frame_gap=1).partner(0) == 1


def test_sav_npz_pairs(fx, tmp_path):
    root, _ = fx
    res = write_sav_pairs(root / "sav", tmp_path / "pairs", frame_gap=(1, 2), max_frames_per_masklet=2)
    assert res["written"] == 2 * 2 * 2 and res["skipped"] == {}
    files = sorted((tmp_path / "pairs").rglob("*.npz"))
    assert len(files) == res["written"]
    with np.load(files[0], allow_pickle=False) as z:
        assert {"image1", "image2", "mask1", "mask2", "size", "frames", "video_id", "masklet_id", "version"} <= set(z.files)
        assert int(z["version"]) == 1 and str(z["video_id"]) == "sav_000001"
    ds = SAVPairsDataset(tmp_path / "pairs", transform=T)
    assert len(ds) == len(files)
    for i in range(len(ds)):
        s = ds[i]
        _check_tensors(s, "1")
        _check_tensors(s, "2")
        assert s["dataset"] == "sav"


def test_as_pair_for_single_image_sources(fx):
    root, _ = fx
    s = SA1BDataset(root / "sa1b", transform=T, as_pair=True)[0]
    for k in SINGLE:
        assert k not in s and torch.equal(s[k + "1"], s[k + "2"])


def test_missing_layout_errors_are_clear(tmp_path):
    from maskloop.data import DataError

    with pytest.raises(DataError, match="refs\\(unc\\).p"):
        RefCOCODataset(tmp_path)
    with pytest.raises(DataError, match="class-descriptions|segmentation.csv"):
        OpenImagesDataset(tmp_path)
    with pytest.raises(DataError, match="annotations.json"):
        DAMDataset(tmp_path)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="sa1b"):
        SA1BDataset(tmp_path / "empty")

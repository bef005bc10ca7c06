"""The synthetic shapes world: scenes, referring expressions, captions, datasets, on-disk writers."""

import hashlib
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskloop.data.sources.shapes import (
    COLORS,
    REGION_PHRASES,
    RELATIONS,
    SHAPES,
    SHAPES_VOCAB,
    SIZES,
    ShapeObject,
    ShapesClipDataset,
    ShapesMaskOnlyDataset,
    ShapesPairDataset,
    ShapesReferDataset,
    ShapesRegionCaptionDataset,
    all_words,
    caption_for,
    make_scene,
    referring_expression,
    referring_expressions,
    region_phrase,
    resolve_expression,
    varied_expressions,
    write_shapes_as,
)
from maskloop.data.transforms import SampleTransform

# pycocotools' RLE decode warns under numpy 2 (its code, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZES_T = dict(mllm_size=32, sam_size=64, prompt_grid=16)  # small tensors keep the tests fast


def _scenes(n, seed=7, size=64):
    return [make_scene(np.random.default_rng([seed, i, 0]), size) for i in range(n)]


def _matches_by_attributes(objs, text):
    """Independent check of the attribute rules: objects whose attributes contain every
    attribute word of the (relation-free) expression."""
    words = set(text.split()[1:])
    return [i for i, o in enumerate(objs) if words <= {o.shape, o.color, o.size}]


def test_scenes_deterministic_and_valid():
    a, b = _scenes(20), _scenes(20)
    for sa, sb in zip(a, b):
        assert np.array_equal(sa.image, sb.image) and np.array_equal(sa.masks, sb.masks)
        assert sa.objects == sb.objects
    c = _scenes(20, seed=8)
    assert not any(np.array_equal(x.image, y.image) for x, y in zip(a, c))
    for sc in a:
        assert sc.image.shape == (64, 64, 3) and sc.image.dtype == np.uint8
        n = len(sc.objects)
        assert 2 <= n <= 4
        assert sc.masks.shape == (n, 64, 64) and sc.masks.dtype == bool
        assert sc.masks.reshape(n, -1).sum(1).min() >= 20  # non-empty, clearly visible
        assert sc.masks.sum(0).max() == 1  # instance masks do not overlap
        for o in sc.objects:
            assert o.shape in SHAPES and o.color in COLORS and o.size in SIZES


def test_image_size_configurable():
    sc = make_scene(np.random.default_rng(0), image_size=96)
    assert sc.image.shape == (96, 96, 3) and sc.masks.shape[1:] == (96, 96)


def test_referring_expressions_are_unique():
    n_rel = 0
    for sc in _scenes(150, seed=3):
        for k, o in enumerate(sc.objects):
            exprs = referring_expressions(sc.objects, k, sc.size)
            assert exprs, f"object {k} of a scene has no unique expression"
            assert exprs[0] == referring_expression(sc.objects, k, sc.size)
            for e in exprs:
                assert resolve_expression(sc.objects, e) == [k], e
                if any(f" {r} " in e for r in RELATIONS):
                    n_rel += 1
                    # relational only when the object's own attributes are not unique
                    twins = [j for j, p in enumerate(sc.objects) if p.attributes == o.attributes]
                    assert len(twins) > 1
                else:
                    assert _matches_by_attributes(sc.objects, e) == [k], e
            # minimal: no shorter relation-free phrase picks out the object
            relational = any(f" {r} " in exprs[0] for r in RELATIONS)
            for attrs in ((), (o.color,), (o.size,), (o.size, o.color)):
                phrase = " ".join(("the", *attrs, o.shape))
                if relational or len(phrase.split()) < len(exprs[0].split()):
                    assert len(_matches_by_attributes(sc.objects, phrase)) > 1, (phrase, exprs[0])
    assert n_rel > 0  # duplicated objects occur, so relations are exercised


def test_colour_policy_names_the_target_colour():
    named = 0
    for sc in _scenes(120, seed=5):
        for k, o in enumerate(sc.objects):
            e = referring_expression(sc.objects, k, sc.size, policy="colour")
            assert resolve_expression(sc.objects, e) == [k], e
            own = e.split()[: e.split().index(o.shape) + 1]  # the target's own noun phrase
            if o.color in own:
                named += 1
                # the shortest such phrase: dropping the size (if any) leaves it ambiguous or colourless
                if "small" in own or "large" in own:
                    shorter = " ".join(w for w in e.split() if w not in ("small", "large"))
                    assert resolve_expression(sc.objects, shorter) != [k], e
            else:  # only when no unique phrase names the colour
                assert not any(o.color in x.split()[:4] for x in referring_expressions(sc.objects, k, sc.size))
    assert named > 0
    ds = ShapesReferDataset(30, seed="val", expression_policy="colour", **SIZES_T)
    minimal = ShapesReferDataset(30, seed="val", **SIZES_T)
    with_colour = sum(any(c in ds.raw(i)["expression"].split() for c in COLORS) for i in range(30))
    assert with_colour > sum(any(c in minimal.raw(i)["expression"].split() for c in COLORS) for i in range(30))
    with pytest.raises(ValueError, match="expression_policy"):
        ShapesReferDataset(3, expression_policy="longest", **SIZES_T)
    with pytest.raises(ValueError, match="policy"):
        referring_expression(sc.objects, 0, sc.size, policy="longest")


def test_relation_on_hand_made_scene():
    r = (205, 40, 40)
    objs = [
        ShapeObject("circle", "red", "large", 10.0, 32.0, 8.0, r),
        ShapeObject("circle", "red", "large", 54.0, 32.0, 8.0, r),
        ShapeObject("square", "blue", "small", 32.0, 20.0, 5.0, (50, 90, 230)),
    ]
    assert referring_expression(objs, 2, 64) == "the square"
    e0, e1 = referring_expression(objs, 0, 64), referring_expression(objs, 1, 64)
    assert e0 == "the circle left of the square" and e1 == "the circle right of the square"
    assert resolve_expression(objs, "the red circle") == [0, 1]  # ambiguous
    assert resolve_expression(objs, "the circle above the square") == []  # both are below it
    assert resolve_expression(objs, "the circle below the square") == [0, 1]
    with pytest.raises(ValueError):
        resolve_expression(objs, "the big circle")
    assert caption_for(objs[0], 64) == "a large red circle on the left"
    assert caption_for(objs[2], 64) == "a small blue square at the top"


def _cell(o, size):
    """Independent of region_phrase: (row, col) of the object's centre in the 3x3 grid."""
    return min(int(3 * o.cy / size), 2), min(int(3 * o.cx / size), 2)


_PHRASE_CELL = {"in the top left": (0, 0), "at the top": (0, 1), "in the top right": (0, 2),
                "on the left": (1, 0), "in the center": (1, 1), "on the right": (1, 2),
                "in the bottom left": (2, 0), "at the bottom": (2, 1), "in the bottom right": (2, 2)}


def test_varied_policy_names_colour_and_maybe_size_and_location():
    assert set(_PHRASE_CELL) == set(REGION_PHRASES.values())
    forms = {"plain": 0, "size": 0, "location": 0, "both": 0}
    for sc in _scenes(150, seed=13):
        for k, o in enumerate(sc.objects):
            where = region_phrase(o, sc.size)
            assert _PHRASE_CELL[where] == _cell(o, sc.size)
            exprs = varied_expressions(sc.objects, k, sc.size)
            for e in exprs:
                assert resolve_expression(sc.objects, e, sc.size) == [k], e
                has_loc, has_size = e.endswith(where), o.size in e.split()
                assert e.split()[:4 if has_size else 3][-2] == o.color  # the colour, right before the shape
                forms[{(0, 0): "plain", (1, 0): "size", (0, 1): "location", (1, 1): "both"}[has_size, has_loc]] += 1
                # independent check: the objects with every named attribute (and the named cell) are the target
                same = [j for j, p in enumerate(sc.objects) if p.shape == o.shape and p.color == o.color
                        and (not has_size or p.size == o.size)
                        and (not has_loc or _cell(p, sc.size) == _PHRASE_CELL[where])]
                assert same == [k], e
            # every unique combination is listed: a form left out is ambiguous
            for size, loc in ((None, None), (o.size, None), (None, where), (o.size, where)):
                e = " ".join(w for w in ("the", size, o.color, o.shape, loc) if w)
                assert (e in exprs) == (resolve_expression(sc.objects, e, sc.size) == [k]), e
            rng = np.random.default_rng(0)
            drawn = {referring_expression(sc.objects, k, sc.size, "varied", rng) for _ in range(20)}
            if exprs:
                assert drawn == set(exprs)  # 20 uniform draws among at most 4
            else:  # only a relation singles it out: the colour policy's expression
                assert drawn == {referring_expression(sc.objects, k, sc.size, "colour")}
    assert min(forms.values()) > 20, forms
    with pytest.raises(ValueError, match="rng"):
        referring_expression(sc.objects, 0, sc.size, "varied")
    ds = ShapesReferDataset(40, seed="val", expression_policy="varied", with_other=True, **SIZES_T)
    again = ShapesReferDataset(40, seed="val", expression_policy="varied", with_other=True, **SIZES_T)
    located = 0
    for i in range(40):
        item, raw = ds[i], ds.raw(i)
        objs, k = raw["scene"].objects, raw["object_index"]
        assert resolve_expression(objs, item["expression"], 64) == [k]
        assert resolve_expression(objs, item["other_expression"], 64) == [(k + 1) % len(objs)]
        assert item["expression"] == again.raw(i)["expression"]  # deterministic per item
        located += any(item["expression"].endswith(p) for p in REGION_PHRASES.values())
    assert 5 < located < 35
    with pytest.raises(ValueError, match="moving objects"):
        ShapesClipDataset(2, expression_policy="varied")


def test_location_phrases_resolve_on_hand_made_scene():
    r = (205, 40, 40)
    objs = [
        ShapeObject("circle", "red", "large", 10.0, 10.0, 6.0, r),  # top left
        ShapeObject("circle", "red", "small", 54.0, 54.0, 5.0, r),  # bottom right
        ShapeObject("square", "blue", "small", 32.0, 32.0, 5.0, (50, 90, 230)),  # center
    ]
    assert resolve_expression(objs, "the red circle in the top left", 64) == [0]
    assert resolve_expression(objs, "the circle in the bottom right", 64) == [1]
    assert resolve_expression(objs, "the square in the center", 64) == [2]
    assert resolve_expression(objs, "the red circle at the top", 64) == []
    assert resolve_expression(objs, "the circle in the top left below the square", 64) == []
    assert resolve_expression(objs, "the circle above the square in the center", 64) == [0]
    assert varied_expressions(objs, 0, 64) == ["the large red circle", "the red circle in the top left",
                                               "the large red circle in the top left"]
    with pytest.raises(ValueError, match="image size"):
        resolve_expression(objs, "the red circle in the top left")
    with pytest.raises(ValueError, match="not a shapes-world expression"):
        resolve_expression(objs, "the red circle in the middle", 64)


def test_vocabulary_covers_all_text():
    assert list(SHAPES_VOCAB) == all_words() == sorted(set(all_words()))
    vocab = set(SHAPES_VOCAB)
    for sc in _scenes(60, seed=11):
        for k, o in enumerate(sc.objects):
            assert set(caption_for(o, sc.size).split()) <= vocab
            for e in referring_expressions(sc.objects, k, sc.size):
                assert set(e.split()) <= vocab


def _check_single(item, s=32, g=64, grid=16):
    assert item["pixel_values"].shape == (3, s, s) and item["pixel_values"].dtype == torch.float32
    assert item["g_pixel_values"].shape == (3, g, g) and item["g_pixel_values"].dtype == torch.uint8
    assert item["prompt_masks"].shape == (grid, grid) and item["prompt_masks"].max() == 1
    assert item["masks"].shape == (g, g) and item["masks"].dtype == torch.float32
    assert set(item["masks"].unique().tolist()) == {0.0, 1.0}


def test_refer_and_caption_datasets():
    ds = ShapesReferDataset(n=6, seed="train", **SIZES_T)
    assert len(ds) == 6
    item = ds[0]
    _check_single(item)
    assert item["dataset"] == "shapes_refer"
    raw = ds.raw(0)
    assert resolve_expression(raw["scene"].objects, item["expression"]) == [raw["object_index"]]
    assert item["caption"] == raw["caption"]
    # same seed -> same items; a held-out seed gives other scenes
    again = ShapesReferDataset(n=6, seed="train", **SIZES_T)[0]
    assert torch.equal(item["g_pixel_values"], again["g_pixel_values"]) and item["expression"] == again["expression"]

    cap = ShapesRegionCaptionDataset(n=4, seed="val", transform=SampleTransform(32, 64, 16))
    it = cap[3]
    _check_single(it)
    assert it["dataset"] == "shapes_caption"
    assert it["caption"].startswith("a ") and set(it["caption"].split()) <= set(SHAPES_VOCAB)


def test_train_and_heldout_are_disjoint():
    def hashes(seed):
        ds = ShapesReferDataset(n=40, seed=seed, transform=SampleTransform(32, 64, 16))
        return {hashlib.sha1(ds.scene(i).image.tobytes()).hexdigest() for i in range(len(ds))}

    train, val = hashes("train"), hashes("val")
    assert len(train) == 40 and not train & val


def test_mask_only_dataset():
    ds = ShapesMaskOnlyDataset(n=3, seed=5, **SIZES_T)
    item = ds[1]
    _check_single(item)
    assert item["caption"] is None and item["dataset"] == "shapes_mask"
    pair = ShapesMaskOnlyDataset(n=3, seed=5, as_pair=True, **SIZES_T)[1]
    assert torch.equal(pair["masks1"], pair["masks2"]) and torch.equal(pair["masks1"], item["masks"])
    assert "pixel_values" not in pair and pair["pixel_values2"].shape == (3, 32, 32)


def test_pair_dataset_moves_the_same_object():
    ds = ShapesPairDataset(n=8, seed=2, **SIZES_T)
    moved = 0
    for i in range(len(ds)):
        s1, s2, k = ds.frames(i)
        assert [o.attributes for o in s1.objects] == [o.attributes for o in s2.objects]
        assert s2.masks.reshape(len(s2.objects), -1).any(1).all()
        assert s2.masks.sum(0).max() == 1
        moved += not np.array_equal(s1.masks[k], s2.masks[k])
    assert moved >= 6
    item = ds[0]
    for sfx in ("1", "2"):
        _check_single({k[:-1]: v for k, v in item.items() if k.endswith(sfx)})
    s1, _, k = ds.frames(0)
    assert item["caption"] == caption_for(s1.objects[k], 64) and item["dataset"] == "shapes_pair"


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_write_refcoco_reads_back(tmp_path):
    paths = write_shapes_as("refcoco", tmp_path, n=4, seed=9)
    scenes = _scenes(4, seed=9)
    refs = pickle.loads(paths["refs"].read_bytes())
    inst = json.loads(paths["instances"].read_text())
    assert len(refs) == sum(len(s.objects) for s in scenes)
    anns = {a["id"]: a for a in inst["annotations"]}
    imgs = {im["id"]: im for im in inst["images"]}
    for ref in refs:
        assert {"ref_id", "ann_id", "image_id", "split", "sentences", "sent_ids", "category_id", "file_name"} <= set(ref)
        sc = scenes[ref["image_id"] - 1]
        k = ref["ann_id"] % 100
        assert (paths["images"] / imgs[ref["image_id"]]["file_name"]).is_file()
        seg = anns[ref["ann_id"]]["segmentation"]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, 64, 64))
        assert _iou(mask_utils.decode(rle).astype(bool), sc.masks[k]) > 0.8  # polygon vs raster
        for s in ref["sentences"]:
            assert resolve_expression(sc.objects, s["sent"]) == [k] and s["tokens"] == s["sent"].split()

    from maskloop.data.sources.refcoco import RefCOCODataset

    ds = RefCOCODataset(tmp_path, transform=SampleTransform(32, 64, 16))
    assert len(ds) == sum(len(r["sentences"]) for r in refs)
    item = ds[0]
    _check_single(item)
    assert resolve_expression(scenes[refs[0]["image_id"] - 1].objects, item["expression"]) == [refs[0]["ann_id"] % 100]


def test_write_dam_and_sa1b_read_back(tmp_path):
    paths = write_shapes_as("dam", tmp_path / "dam", n=5, seed=4, shard_size=2)
    scenes = _scenes(5, seed=4)
    ann = json.loads(paths["annotations"].read_text())
    assert len(ann) == 5 and len(list(paths["images"].glob("*.tar"))) == 3
    sid = sorted(ann)[4]
    for k, region in enumerate(ann[sid]):
        rle = dict(region["mask_rle"], counts=region["mask_rle"]["counts"].encode())
        assert np.array_equal(mask_utils.decode(rle).astype(bool), scenes[4].masks[k])  # RLE is exact
        assert region["caption"] == caption_for(scenes[4].objects[k], 64)
    with tarfile.open(paths["images"] / "00000002.tar") as tf:
        assert sorted(tf.getnames()) == [f"{sid}.jpg", f"{sid}.pickle"]
        assert pickle.loads(tf.extractfile(f"{sid}.pickle").read()) == ann[sid]

    from maskloop.data.sources.dam import DAMDataset

    ds = DAMDataset(tmp_path / "dam", transform=SampleTransform(32, 64, 16), cache_dir=tmp_path / "cache")
    assert len(ds) == sum(len(s.objects) for s in scenes)
    item = ds[0]
    _check_single(item)
    assert item["caption"] == ann[sorted(ann)[0]][0]["caption"]

    write_shapes_as("sa1b", tmp_path / "sa1b", n=3, seed=4)
    meta = json.loads((tmp_path / "sa1b" / "sa_2.json").read_text())
    assert meta["image"]["file_name"] == "sa_2.jpg" and len(meta["annotations"]) == len(scenes[1].objects)
    from maskloop.data.sources.sa1b import SA1BDataset

    sa = SA1BDataset(tmp_path / "sa1b", transform=SampleTransform(32, 64, 16))
    assert len(sa) == sum(len(s.objects) for s in scenes[:3])
    _check_single(sa[0])

    with pytest.raises(ValueError, match="unknown kind"):
        write_shapes_as("coco", tmp_path / "x", n=1)

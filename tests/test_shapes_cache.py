"""The shapes world's scene cache: items are what a fresh draw gives, the cache is bounded and shared safely."""

import numpy as np
import pytest
import torch

from maskloop.data.sources import shapes
from maskloop.data.sources.shapes import (
    SceneCache,
    ShapesPairDataset,
    ShapesReferDataset,
    ShapesRegionCaptionDataset,
    make_scene,
)
from maskloop.data.transforms import SampleTransform

TF = SampleTransform(image_size=64, sam_size=64, prompt_grid=16)


@pytest.fixture
def cache(monkeypatch):
    c = SceneCache()
    monkeypatch.setattr(shapes, "SCENE_CACHE", c)
    return c


def _same_item(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_cached_items_equal_fresh_draws(cache, monkeypatch):
    kinds = [ShapesReferDataset(12, seed="train", transform=TF, with_other=True, expression_policy="colour"),
             ShapesRegionCaptionDataset(12, seed="train", transform=TF),
             ShapesPairDataset(12, seed="train", transform=TF),
             ShapesReferDataset(12, seed="train", transform=TF, colors=["red", "green"])]
    first = [[ds[i] for i in range(12)] for ds in kinds]
    assert cache.misses == 24 and len(cache) == 24  # one draw per (seed, index, colours), shared by the kinds
    again = [[ds[i] for i in range(12)] for ds in kinds]
    assert cache.misses == 24 and cache.hits >= 48
    monkeypatch.setattr(shapes, "SCENE_CACHE", SceneCache(max_bytes=0))  # no cache: every item drawn afresh
    fresh = [[ds[i] for i in range(12)] for ds in kinds]
    assert len(shapes.SCENE_CACHE) == 0
    for x, y, z in zip(first, again, fresh):
        for a, b, c in zip(x, y, z):
            _same_item(a, b)
            _same_item(a, c)
    # the scene itself equals make_scene on the item's own generator; a palette changes the scene
    ds = kinds[0]
    sc, ref = ds.scene(3), make_scene(ds._rng(3, 0), 64)
    assert np.array_equal(sc.image, ref.image) and np.array_equal(sc.masks, ref.masks)
    assert not np.array_equal(kinds[3].scene(3).image, sc.image)
    assert {o.color for i in range(12) for o in kinds[3].scene(i).objects} <= {"red", "green"}


def test_cached_scenes_are_read_only(cache):
    sc = ShapesReferDataset(3, seed="val", transform=TF).scene(0)
    with pytest.raises(ValueError):
        sc.image[0, 0, 0] = 1
    with pytest.raises(ValueError):
        sc.masks[0, 0, 0] = True


def test_cache_is_bounded_by_bytes_most_recent_kept():
    ds = ShapesReferDataset(10, seed="val", transform=TF)
    one = ds.scene(0)
    per = one.image.nbytes + one.masks.nbytes
    c = SceneCache(max_bytes=3 * 64 * 64 * 7)  # 86 kB: 2-4 scenes of 2-4 objects (20-29 kB each)
    for i in range(10):
        sc = ds.scene(i)
        c.put(("k", i), sc)
        assert c.nbytes <= c.max_bytes
        assert c.nbytes == sum(s.image.nbytes + s.masks.nbytes for s in c._d.values())
    assert 2 <= len(c) <= 4 and c.get(("k", 9)) is not None and c.get(("k", 0)) is None
    c.get(("k", 9))
    assert c.hits == 2 and c.misses == 1
    big = SceneCache(max_bytes=per - 1)  # a scene larger than the whole cache is not kept
    big.put("x", one)
    assert len(big) == 0 and big.nbytes == 0

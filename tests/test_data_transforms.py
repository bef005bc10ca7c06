"""SampleTransform: shapes, dtypes, ranges, direct resizes from the original pixels."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from maskloop.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SampleTransform

S, G, GRID = 56, 128, 4


def _image(h=90, w=120, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _mask(h=90, w=120):
    m = np.zeros((h, w), bool)
    m[20:60, 30:100] = True
    return m


def test_defaults_are_the_real_sizes():
    t = SampleTransform()
    assert (t.image_size, t.sam_size, t.prompt_grid, t.draft) == (448, 1024, 16, True)
    assert t.draft_size == 1024


def test_shapes_dtypes_ranges():
    t = SampleTransform(S, G, GRID)
    out = t(_image(), _mask())
    assert out["pixel_values"].shape == (3, S, S) and out["pixel_values"].dtype == torch.float32
    assert out["g_pixel_values"].shape == (3, G, G) and out["g_pixel_values"].dtype == torch.uint8
    assert out["prompt_masks"].shape == (GRID, GRID) and out["prompt_masks"].dtype == torch.uint8
    assert out["masks"].shape == (G, G) and out["masks"].dtype == torch.float32
    assert set(out["masks"].unique().tolist()) <= {0.0, 1.0}
    assert set(out["prompt_masks"].unique().tolist()) <= {0, 1}
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert out["pixel_values"].min() >= lo - 1e-5 and out["pixel_values"].max() <= hi + 1e-5


def test_both_images_are_direct_bicubic_resizes_of_the_original():
    img = _image()
    t = SampleTransform(S, G, GRID)
    out = t.image(img)
    want_g = np.asarray(img.resize((G, G), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(out["g_pixel_values"].numpy(), want_g)
    small = np.asarray(img.resize((S, S), Image.Resampling.BICUBIC), np.float32) / 255
    want_p = ((small - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)).transpose(2, 0, 1)
    assert np.allclose(out["pixel_values"].numpy(), want_p, atol=1e-6)
    # not a round trip of the small tensor: un-normalising + upsizing the 56 image differs
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rt = ((out["pixel_values"] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    rt = np.asarray(Image.fromarray(rt).resize((G, G), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert not np.array_equal(rt, out["g_pixel_values"].numpy())


def test_masks_are_nearest_resizes():
    t = SampleTransform(S, G, GRID)
    m = _mask()
    out = t.mask(m)
    pil = Image.fromarray(m.astype(np.uint8) * 255)
    assert np.array_equal(out["masks"].numpy() > 0, np.asarray(pil.resize((G, G), Image.Resampling.NEAREST)) > 0)
    # prompt cells as Sa2VA resizes them (torch nearest): cell (i, j) samples pixel (floor(i*H/g), floor(j*W/g))
    H, W = m.shape
    rows = [min(int(np.floor(i * np.float32(H / GRID))), H - 1) for i in range(GRID)]
    cols = [min(int(np.floor(j * np.float32(W / GRID))), W - 1) for j in range(GRID)]
    assert np.array_equal(out["prompt_masks"].numpy() > 0, m[np.ix_(rows, cols)] > 0)
    old = SampleTransform(S, G, GRID, prompt_resize="pil").mask(m)
    assert np.array_equal(old["prompt_masks"].numpy() > 0,
                          np.asarray(pil.resize((GRID, GRID), Image.Resampling.NEAREST)) > 0)
    assert not np.array_equal(old["prompt_masks"].numpy(), out["prompt_masks"].numpy())  # the rules differ here


def _jpeg_file(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    buf.seek(0)
    return buf


def test_jpeg_draft_mode_keeps_scale_at_least_target():
    big = _image(600, 640)
    t = SampleTransform(S, G, GRID, draft=True)
    im = Image.open(_jpeg_file(big))
    out = t.image(im)
    assert im.size == (160, 150)  # 1/4 DCT scale: still >= 128 on both axes
    ref = Image.open(_jpeg_file(big))
    ref.draft("RGB", (G, G))
    want = np.asarray(ref.convert("RGB").resize((G, G), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(out["g_pixel_values"].numpy(), want)
    # without draft the full image is decoded
    im2 = Image.open(_jpeg_file(big))
    SampleTransform(S, G, GRID, draft=False).image(im2)
    assert im2.size == (640, 600)
    # a JPEG smaller than 2x the target is decoded at full size
    im3 = Image.open(_jpeg_file(_image(200, 200)))
    t.image(im3)
    assert im3.size == (200, 200)


def test_pair_suffixes_and_sharing():
    t = SampleTransform(S, G, GRID)
    img, m = _image(), _mask()
    out = t.pair(img, m, img, m)
    assert sorted(out) == sorted(f"{k}{s}" for k in ("pixel_values", "g_pixel_values", "prompt_masks", "masks")
                                 for s in "12")
    assert out["pixel_values1"] is out["pixel_values2"]
    out2 = t.pair(img, m, _image(seed=1), m)
    assert not torch.equal(out2["g_pixel_values1"], out2["g_pixel_values2"])


def test_bad_mask_rank():
    with pytest.raises(ValueError):
        SampleTransform(S, G, GRID).mask(np.zeros((2, 3, 4)))

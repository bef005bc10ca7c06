"""InternVL dynamic tiling as Sa2VA's image inference uses it (issue 13, item 5).

References are written in the tests from the published behaviour (OpenGVLab/InternVL
``find_closest_aspect_ratio`` / ``dynamic_preprocess``, Sa2VA's ``predict_forward``): the candidate
grids as a set sorted by tile count, a strict-improvement scan with the area tie-break, a resize to the
grid and row-major crops, the thumbnail last; the image tokens of every tile in order, then the region
cells gathered from the last tile.
"""

import numpy as np
import pytest
import torch
from conftest import make_tiny
from PIL import Image

from maskloop.data.mixture import collate
from maskloop.data.tiles import TiledTransform, closest_grid, tile_images, tiled_inputs
from maskloop.data.transforms import SampleTransform
from maskloop.model.presets import get_preset


# follows OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py L813-L827 (find_closest_aspect_ratio,
# commit 2410d1d); same loop in magic-research/Sa2VA projects/llava_sam2/hf/models/modeling_sa2va_chat.py
# L775-L789 (commit d01bf3f)
def reference_grid(w, h, lo, hi, size):
    ratios = {(i, j) for n in range(lo, hi + 1) for i in range(1, n + 1) for j in range(1, n + 1) if lo <= i * j <= hi}
    ratios = sorted(ratios, key=lambda x: x[0] * x[1])
    aspect, best, best_diff = w / h, (1, 1), float("inf")
    for r in ratios:
        d = abs(aspect - r[0] / r[1])
        if d < best_diff:
            best_diff, best = d, r
        elif d == best_diff and w * h > 0.5 * size * size * r[0] * r[1]:
            best = r
    return best


SIZES = [(448, 448), (1000, 1000), (100, 100), (500, 800), (1500, 1000), (640, 480), (480, 640), (1920, 1080),
         (4000, 300), (300, 4000), (2000, 1000), (895, 448), (1344, 896), (333, 999), (5000, 5000), (50, 1000)]


# follows OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py L813-L827 (commit 2410d1d)
@pytest.mark.parametrize("lo,hi", [(1, 12), (1, 6), (2, 9), (1, 1)])
def test_grid_choice_matches_internvl_loop(lo, hi):
    rng = np.random.default_rng(0)
    sizes = SIZES + [tuple(int(v) for v in rng.integers(16, 3000, 2)) for _ in range(200)]
    for w, h in sizes:
        assert closest_grid(w, h, lo, hi, 448) == reference_grid(w, h, lo, hi, 448), (w, h)


# follows OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py L813-L827 (area tie-break, commit 2410d1d)
def test_grid_tie_breaks():
    # equal ratio differences (1x1, 2x2, 3x3 for a square): a later (larger) grid wins only when the image's
    # area exceeds half of its pixels: 600^2 < 0.5 * 448^2 * 4 < 700^2 < 0.5 * 448^2 * 9 < 1000^2
    assert closest_grid(448, 448) == (1, 1) and closest_grid(600, 600) == (1, 1)
    assert closest_grid(700, 700) == (2, 2) and closest_grid(1000, 1000) == (3, 3)
    # a strictly closer ratio wins whatever the image's size: a 150x100 image is cut 3x2
    assert closest_grid(150, 100) == (3, 2) and closest_grid(1500, 1000) == (3, 2)
    assert closest_grid(4000, 300) == (12, 1) and closest_grid(300, 4000) == (1, 12)


# follows OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py L830-L866 (dynamic_preprocess, thumbnail,
# commit 2410d1d); same in magic-research/Sa2VA projects/llava_sam2/hf/models/modeling_sa2va_chat.py L791-L831
# (commit d01bf3f)
def test_tiles_are_crops_of_the_grid_resize_plus_thumbnail():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (90, 200, 3), dtype=np.uint8))
    S = 64
    tiles = tile_images(img, 1, 12, S, True)
    c, r = reference_grid(200, 90, 1, 12, S)
    assert len(tiles) == c * r + 1 and c * r > 1
    big = np.asarray(img.resize((c * S, r * S), Image.Resampling.BICUBIC))
    for i in range(c * r):
        y, x = divmod(i, c)
        np.testing.assert_array_equal(np.asarray(tiles[i]), big[y * S:(y + 1) * S, x * S:(x + 1) * S])
    np.testing.assert_array_equal(np.asarray(tiles[-1]), np.asarray(img.resize((S, S), Image.Resampling.BICUBIC)))
    assert len(tile_images(img, 1, 12, S, use_thumbnail=False)) == c * r
    assert len(tile_images(img.resize((S, S)), 1, 12, S, True)) == 1  # one tile: no thumbnail


def test_tiled_transform_tensors():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (70, 150, 3), dtype=np.uint8))
    tf = TiledTransform(64, 128, 8, 1, 12, True, draft=False)
    out = tf.image(img)
    single = SampleTransform(64, 128, 8, draft=False).image(img)
    n = int(out["num_tiles"])
    assert out["pixel_values"].shape == (n, 3, 64, 64) and n > 1
    torch.testing.assert_close(out["pixel_values"][-1], single["pixel_values"])  # the thumbnail = the 1-tile input
    torch.testing.assert_close(out["g_pixel_values"], single["g_pixel_values"])


def test_collate_concatenates_tiles_and_regions():
    rng = np.random.default_rng(3)
    cfg = get_preset("tiny")
    cfg.tiles = True
    a = tiled_inputs(Image.fromarray(rng.integers(0, 256, (60, 200, 3), dtype=np.uint8)), cfg,
                     [np.ones((60, 200), bool), np.eye(60, 200, dtype=bool)])
    b = tiled_inputs(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), cfg, np.ones((64, 64), bool))
    batch = collate([a, b])
    na, nb = int(a["num_tiles"]), int(b["num_tiles"])
    assert nb == 1 and na > 1
    assert batch["pixel_values"].shape[0] == na + nb and batch["num_tiles"].tolist() == [na, nb]
    assert batch["prompt_masks"].shape == (3, 8, 8) and batch["num_regions"].tolist() == [2, 1]
    assert batch["masks"].shape == (3, 128, 128)
    with pytest.raises(ValueError, match="original image's size"):
        tiled_inputs(Image.new("RGB", (64, 32)), cfg, np.ones((64, 64), bool))


def _tiny_tiled_batch(model, shapes, seed=0):
    rng = np.random.default_rng(seed)
    model.cfg.tiles = True
    items = []
    for i, (h, w) in enumerate(shapes):
        m = np.zeros((h, w), bool)
        m[h // 4: h // 2 + i, w // 3: w // 2] = True
        items.append(tiled_inputs(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), model.cfg, m))
    return items, collate(items)


# follows magic-research/Sa2VA projects/llava_sam2/hf/models/modeling_sa2va_chat.py L655-L661 (tiles, regions on the last
# tile) and L333-L352 (region embeddings gathered from that tile) (commit d01bf3f)
def test_token_counts_and_region_on_the_thumbnail():
    model = make_tiny()
    model.eval()
    items, b = _tiny_tiled_batch(model, [(60, 200), (64, 64), (150, 40)])
    N = model.cfg.num_image_tokens
    with torch.no_grad():
        tile_feats = model.image_tokens(b["pixel_values"])  # (T, N, D)
        feats, n_image = model.image_inputs(None, tile_feats, b["num_tiles"])
        pm, k = model.region_prompt(b["prompt_masks"], b["num_regions"])
        emb, asm = model.build_inputs(model.builder.caption_parts(k, None, n_image, b["num_regions"]), feats, pm, n_image)
    assert n_image.tolist() == [int(it["num_tiles"]) * N for it in items]
    start = 0
    for r, it in enumerate(items):
        n = int(it["num_tiles"])
        mine = tile_feats[start:start + n]  # this sample's tiles, the thumbnail (or the only tile) last
        start += n
        ctx = asm.input_ids[r] == model.builder.img_ctx_id
        cells = it["prompt_masks"][0].flatten().bool()
        assert int(ctx.sum()) == n * N + int(cells.sum())  # n x 256-equivalent image tokens + K region tokens
        want = torch.cat([mine.reshape(n * N, -1), mine[-1][cells]])
        torch.testing.assert_close(emb[r][ctx], want)


def test_tiled_batch_equals_each_sample_alone():
    """Rows with 3, 1 and 4+ tiles batched: segment / caption outputs equal those of each sample run alone."""
    model = make_tiny(seed=1)
    model.eval()
    items, b = _tiny_tiled_batch(model, [(60, 200), (64, 64), (150, 40)])
    texts = ["the red circle", "a square", "green"]
    caps = ["a red circle", "blue", "small square left"]
    with torch.no_grad():
        feats = model.sam_features(b["g_pixel_values"])
        seg = model.segment(b["pixel_values"], feats, model.builder.expressions(texts), num_tiles=b["num_tiles"],
                            lm_loss=False)["mask_logits"]
        cap = model.caption_logits(b["pixel_values"], b["prompt_masks"], model.builder.caption_answer(caps),
                                   num_tiles=b["num_tiles"], num_regions=b["num_regions"])
        for r, it in enumerate(items):
            one = collate([it])
            f1 = model.sam_features(one["g_pixel_values"])
            s1 = model.segment(one["pixel_values"], f1, model.builder.expressions([texts[r]]),
                               num_tiles=one["num_tiles"], lm_loss=False)["mask_logits"]
            torch.testing.assert_close(seg[r], s1[0], rtol=1e-4, atol=1e-4)
            c1 = model.caption_logits(one["pixel_values"], one["prompt_masks"], model.builder.caption_answer([caps[r]]),
                                      num_tiles=one["num_tiles"], num_regions=one["num_regions"])
            T = int(c1["valid"].sum())
            torch.testing.assert_close(cap["logits"][r, :T], c1["logits"][0, :T], rtol=1e-4, atol=1e-4)


def test_one_tile_equals_the_untiled_path():
    """tiles=False inputs through the tiled code path (num_tiles = 1) give the default path's outputs."""
    model = make_tiny(seed=2)
    model.eval()
    rng = np.random.default_rng(4)
    img = Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8))
    m = np.zeros((50, 90), bool)
    m[10:30, 20:60] = True
    model.cfg.tiles = False
    one = collate([tiled_inputs(img, model.cfg, m)])
    plain = collate([SampleTransform(64, 128, 8, draft=False)(img, m)])
    torch.testing.assert_close(one["pixel_values"], plain["pixel_values"])
    with torch.no_grad():
        a = model.describe(one["pixel_values"], one["prompt_masks"], 6, num_tiles=one["num_tiles"],
                           num_regions=one["num_regions"])
        b = model.describe(plain["pixel_values"], plain["prompt_masks"], 6)
    assert torch.equal(a.ids, b.ids)


def test_evaluation_reads_tiled_batches():
    """Evaluation on a tiled transform (shapes images are square and small: one tile each) gives the
    numbers of the single-tile transform: the tiled path is wired through refer / caption / cycle."""
    from maskloop.data.sources.shapes import ShapesReferDataset, ShapesRegionCaptionDataset
    from maskloop.data.tiles import transform_for
    from maskloop.eval.cycle import evaluate_cycle
    from maskloop.eval.refer import evaluate_refer

    model = make_tiny(seed=3)
    cfg = model.cfg
    plain = transform_for(cfg)
    cfg.tiles = True
    tiled = transform_for(cfg)
    assert isinstance(tiled, TiledTransform) and not isinstance(plain, TiledTransform)
    a = evaluate_refer(model, ShapesReferDataset(4, seed="val", transform=tiled), batch_size=2, progress=False)
    b = evaluate_refer(model, ShapesReferDataset(4, seed="val", transform=plain), batch_size=2, progress=False)

    def scores(r):  # the metrics and counts, not the wall time
        return {s: {k: v for k, v in m.items() if k not in ("seconds", "s_per_sample")} for s, m in r.items()}

    assert scores(a) == scores(b)
    ds = ShapesRegionCaptionDataset(3, seed="val", transform=tiled)
    assert "num_tiles" in ds[0]
    c = evaluate_cycle(model, ds, batch_size=3, max_new_tokens=3, progress=False)
    d = evaluate_cycle(model, ShapesRegionCaptionDataset(3, seed="val", transform=plain), batch_size=3,
                       max_new_tokens=3, progress=False)
    untimed = {k: v for k, v in c["cycle"].items() if k != "seconds"}
    assert c["predictions"] == d["predictions"] and untimed == {k: v for k, v in d["cycle"].items() if k != "seconds"}


def test_inference_on_a_tiled_model():
    """`segment` / `caption` single-image helpers on a model whose config asks for tiles: several tiles, two
    regions on the thumbnail, one mask per generated [SEG] at the image's size."""
    from maskloop.inference import caption_region, segment_question, segment_text

    model = make_tiny(seed=5)
    model.eval()
    model.cfg.tiles = True
    rng = np.random.default_rng(6)
    img = Image.fromarray(rng.integers(0, 256, (60, 200, 3), dtype=np.uint8))
    assert len(tile_images(img, 1, 12, 64, True)) > 2
    a, b = np.zeros((60, 200), bool), np.zeros((60, 200), bool)
    a[5:30, 10:90], b[30:55, 120:190] = True, True
    text, _ = caption_region(model, img, [a, b], max_new_tokens=3)
    assert isinstance(text, str)
    logits, seg = model.lm_logits, model.builder.seg_id
    model.lm_logits = lambda h: logits(h).index_add(-1, torch.tensor([seg]), torch.full((*h.shape[:-1], 1), 1e4))
    answer, masks, _ = segment_question(model, img, "segment it", max_new_tokens=4)
    assert answer.count("[SEG]") == 4 and len(masks) == 3 and masks[0].shape == (60, 200)
    assert segment_text(model, img, "the red circle")[0].shape == (60, 200)

"""Metrics (cIoU / gIoU / P@k / cycle IoU), caption metrics and the visual report."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from maskloop.eval.caption_metrics import caption_scores, default_metrics, tokenize
from maskloop.eval.metrics import PRECISION_THRESHOLDS, CycleMeter, RefSegMeter, mask_iou
from maskloop.eval.report import example_grid, overlay, save_curves, write_report


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)


# 4x4 hand-made cases; I = |P & G|, U = |P | G| counted by hand.
Z = [[0] * 4] * 4
TOP2 = [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]  # 8 px
TL = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]  # 4 px
FULL = [[1] * 4] * 4  # 16 px
TWO = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]  # 2 px
THREE = [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]]  # 3 px
CASES = [  # (pred, gt, I, U, per-sample IoU)
    (TL, TOP2, 4, 8, 0.5),
    (FULL, TL, 4, 16, 0.25),
    (Z, Z, 0, 0, 1.0),  # both empty: IoU 1 by convention, adds 0/0 to the cIoU sums
    (Z, TWO, 0, 2, 0.0),  # empty prediction, non-empty GT
    (THREE, Z, 0, 3, 0.0),  # prediction on an empty GT
]


def _batch(cases):
    return torch.stack([_m(p) for p, *_ in cases]), torch.stack([_m(g) for _, g, *_ in cases])


def test_refseg_meter_hand_computed():
    pred, gt = _batch(CASES)
    m = RefSegMeter()
    ious = m.update(pred, gt)
    assert ious.tolist() == [c[4] for c in CASES]
    r = m.compute()
    assert r["cIoU"] == pytest.approx((4 + 4) / (8 + 16 + 0 + 2 + 3))  # 8/29
    assert r["gIoU"] == pytest.approx((0.5 + 0.25 + 1.0 + 0 + 0) / 5)  # 0.35
    assert r["P@0.5"] == pytest.approx(2 / 5)  # 0.5 (>=) and the empty-empty sample
    for t in (0.6, 0.7, 0.8, 0.9):
        assert r[f"P@{t}"] == pytest.approx(1 / 5)
    assert r["n"] == 5
    assert r["empty_pred_frac"] == pytest.approx(2 / 5)
    assert r["empty_gt_frac"] == pytest.approx(2 / 5)


def test_refseg_meter_empty_conventions():
    m = RefSegMeter()
    m.update(_m(Z), _m(Z))
    # only empty-empty: gIoU perfect; cIoU 0/(0+1e-10) = 0 as Sa2VA's evaluation computes it
    assert m.compute()["gIoU"] == 1.0 and m.compute()["cIoU"] == 0.0
    m.update(_m(Z), _m(TL))
    r = m.compute()
    assert r["gIoU"] == pytest.approx(0.5) and r["cIoU"] == 0.0  # empty pred vs 4 px GT -> 0/4
    assert math.isnan(RefSegMeter().compute()["cIoU"])


def test_refseg_meter_merge_and_state_match_single_pass():
    pred, gt = _batch(CASES)
    whole = RefSegMeter()
    whole.update(pred, gt)
    a, b = RefSegMeter(), RefSegMeter()
    a.update(pred[:2], gt[:2])
    b.update(pred[2:], gt[2:])
    # what an all_reduce(SUM) of the states gives
    c = RefSegMeter()
    c.load_state(a.state() + b.state())
    assert a.merge(b).compute() == whole.compute() == c.compute()
    assert c.all_reduce_().compute() == whole.compute()  # no process group: unchanged
    with pytest.raises(TypeError):
        a.merge(CycleMeter())


def test_refseg_meter_accepts_non_bool_and_checks_shapes():
    m = RefSegMeter()
    m.update(torch.tensor(TL, dtype=torch.float32), torch.tensor(TOP2, dtype=torch.uint8))  # (H, W)
    assert m.compute()["gIoU"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differ in shape"):
        m.update(torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 8, 8, dtype=torch.bool))
    assert set(PRECISION_THRESHOLDS) == {0.5, 0.6, 0.7, 0.8, 0.9}


def test_mask_iou_batched_symmetric():
    pred, gt = _batch(CASES)
    iou = mask_iou(pred, gt)
    assert iou.shape == (5,)
    assert iou.tolist() == [0.5, 0.25, 1.0, 0.0, 0.0]
    assert torch.equal(iou, mask_iou(gt, pred))
    assert mask_iou(_m(Z), _m(Z), empty_iou=0.0).item() == 0.0


def test_cycle_meter():
    m = CycleMeter()
    src = torch.stack([_m(TOP2), _m(TL), _m(TWO)])
    reseg = torch.stack([_m(TL), _m(TL), _m(Z)])  # IoU 0.5, 1.0, 0 (empty re-segmentation)
    assert m.update(src, reseg).tolist() == [0.5, 1.0, 0.0]
    r = m.compute()
    assert r["cycle_mIoU"] == pytest.approx(1.5 / 3)
    assert r["cycle_cIoU"] == pytest.approx((4 + 4 + 0) / (8 + 4 + 2))
    assert r["empty_reseg_frac"] == pytest.approx(1 / 3)
    assert r["n"] == 3


# ----------------------------------------------------------------------------- captions

REFS = {
    0: ["a small red circle in the top left", "the little red circle at the top left"],
    1: ["a large blue square at the bottom"],
    2: ["a green triangle on the right"],
    3: ["a small yellow circle in the center"],
    4: ["a large purple triangle in the bottom right"],
    5: ["a large white square on the left"],
}


def test_tokenize_ptb_like():
    assert tokenize("A man's dog (brown) doesn't run... well-known, 3.5 m!") == [
        "a", "man", "'s", "dog", "-lrb-", "brown", "-rrb-", "does", "n't", "run", "well-known", "3.5", "m"
    ]  # PTB's brackets survive pycocoevalcap's strip (its list holds the upper-case -LRB-)


def test_caption_scores_identical_is_max():
    s = caption_scores({i: r[0] for i, r in REFS.items()}, REFS)
    assert list(s) == list(default_metrics())
    for n in range(1, 5):
        assert s[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert s["ROUGE-L"] == pytest.approx(1.0)
    assert 9.0 < s["CIDEr"] < 10.0  # id 0's second reference differs from the prediction
    single = {i: r[:1] for i, r in REFS.items()}
    assert caption_scores({i: r[0] for i, r in single.items()}, single, ["CIDEr"])["CIDEr"] == pytest.approx(10.0)
    assert s["METEOR-nosyn"] > 0.99
    assert s["chrF"] == pytest.approx(100.0)


def test_caption_scores_disjoint_and_empty_are_near_zero():
    for hyp in ("zebra xylophone quartz", ""):
        s = caption_scores({i: hyp for i in REFS}, REFS)
        assert s["BLEU-1"] < 1e-6 and s["BLEU-4"] < 1e-6
        assert s["ROUGE-L"] == 0.0 and s["CIDEr"] == 0.0 and s["METEOR-nosyn"] == 0.0
        assert s["chrF"] < 15.0  # character n-grams share a few letters


def test_caption_scores_ordering():
    close = {i: r[0].replace("small", "large") if "small" in r[0] else r[0].replace("large", "small")
             for i, r in REFS.items()}  # one word wrong per caption
    far = {i: " ".join(r[0].split()[:3]) for i, r in REFS.items()}  # "a small red"
    s_close, s_far = caption_scores(close, REFS), caption_scores(far, REFS)
    for k in default_metrics():
        assert 0 < s_far[k] < s_close[k], k
    # stems count for METEOR-nosyn ("circles" ~ "circle"), synonyms do not ("little" vs "small")
    stem = caption_scores({0: "a small red circles in the top left"}, {0: [REFS[0][0]]}, metrics=["METEOR-nosyn"])
    syn = caption_scores({0: "a little red circle in the top left"}, {0: [REFS[0][0]]}, metrics=["METEOR-nosyn"])
    assert stem["METEOR-nosyn"] > syn["METEOR-nosyn"]


def test_caption_scores_input_errors():
    with pytest.raises(ValueError, match="no prediction"):
        caption_scores({0: "a"}, {0: ["a"], 1: ["b"]})
    with pytest.raises(ValueError, match="no references"):
        caption_scores({0: "a", 7: "b"}, {0: ["a"]})
    with pytest.raises(ValueError, match="unknown caption metric"):
        caption_scores({0: "a"}, {0: ["a"]}, metrics=["SPICE"])
    with pytest.raises(TypeError):
        caption_scores({0: "a"}, {0: "a"})


# ----------------------------------------------------------------------------- report


def test_overlay_colours_mask_and_outline():
    img = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    out = np.asarray(overlay(img, mask, color=(200, 100, 0), alpha=0.5))
    assert out.shape == (8, 8, 3)
    assert tuple(out[3, 3]) == (100, 50, 0)  # interior: blended
    assert tuple(out[2, 2]) == (200, 100, 0)  # boundary: full colour
    assert tuple(out[0, 0]) == (0, 0, 0)
    # a mask at another resolution is resized to the image
    full = np.asarray(overlay(img, torch.ones(4, 4), color=(9, 8, 7), alpha=1.0, outline=False))
    assert (full == (9, 8, 7)).all()
    dimmed = np.asarray(overlay(np.full((8, 8, 3), 100, np.uint8), mask, alpha=0.0, dim_outside=0.5))
    assert tuple(dimmed[0, 0]) == (50, 50, 50) and tuple(dimmed[3, 3]) == (100, 100, 100)


def test_report_files(tmp_path):
    curves = save_curves({"loss/loop1": [(0, 1.0), (10, 0.5), (20, 0.3)], "loss/loop2": [(0, 2.0), (20, 1.0)],
                          "cos_g1_g2": [(0, 0.1), (20, -0.2)]}, tmp_path / "curves.png")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    m = np.zeros((64, 64), bool)
    m[10:30, 10:30] = True
    grid = example_grid([
        dict(image=img, mask=m, caption="a small red circle in the top left", pred_mask=m, title="#0 IoU 1.00"),
        dict(image=torch.from_numpy(img).permute(2, 0, 1), mask=torch.from_numpy(m), caption="",
             pred_mask=None, reference="a large blue square"),
    ], tmp_path / "examples.png")
    for p in (curves, grid):
        with Image.open(p) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    md = write_report(tmp_path, {"refer": {"cIoU": 0.8125, "gIoU": 0.75, "n": 12}, "caption": {"CIDEr": 1.5}},
                      curves, grid, notes="tiny demo run")
    text = md.read_text()
    assert "| refer | cIoU | 0.8125 |" in text and "](curves.png)" in text and "](examples.png)" in text
    html = (tmp_path / "report.html").read_text()
    assert "src='examples.png'" in html and "0.7500" in html and "tiny demo run" in html

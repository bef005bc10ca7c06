"""J / F / J&F against a direct pixel-loop reference of DAVIS-2017's definitions, and known values."""

import math

import numpy as np
import pytest

from maskloop.eval.video import JFMeter, bound_pixels, db_boundary, db_iou, f_measure, jf_expression, seg2bmap


# follows davisvideochallenge/davis2017-evaluation davis2017/metrics.py L122-L178 (_seg2bmap)
#   (commit ac7c43f)
def ref_bmap(seg):
    """DAVIS seg2bmap, pixel by pixel: differs from right / lower / lower-right neighbour (outside = 0);
    the last row compares with the right neighbour only, the last column with the lower one only."""
    h, w = seg.shape
    at = lambda y, x: bool(seg[y, x]) if (y < h and x < w) else False  # noqa: E731
    b = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            v = at(y, x)
            if y == h - 1 and x == w - 1:
                b[y, x] = False
            elif y == h - 1:
                b[y, x] = v != at(y, x + 1)
            elif x == w - 1:
                b[y, x] = v != at(y + 1, x)
            else:
                b[y, x] = v != at(y, x + 1) or v != at(y + 1, x) or v != at(y + 1, x + 1)
    return b


# follows davisvideochallenge/davis2017-evaluation davis2017/metrics.py L57-L119 (f_measure)
#   (commit ac7c43f)
def ref_f(gt, pred, bound_th=0.008):
    h, w = gt.shape
    r = bound_th if bound_th >= 1 else math.ceil(bound_th * math.sqrt(h * h + w * w))
    bp, bg = ref_bmap(pred), ref_bmap(gt)
    pts_p, pts_g = np.argwhere(bp), np.argwhere(bg)

    def matched(src, dst):
        if len(dst) == 0:
            return 0
        return sum(int(((dst - p) ** 2).sum(1).min() <= r * r) for p in src)

    n_p, n_g = len(pts_p), len(pts_g)
    if n_p == 0 and n_g > 0:
        P, R = 1.0, 0.0
    elif n_p > 0 and n_g == 0:
        P, R = 0.0, 1.0
    elif n_p == 0 and n_g == 0:
        P, R = 1.0, 1.0
    else:
        P, R = matched(pts_p, pts_g) / n_p, matched(pts_g, pts_p) / n_g
    return 0.0 if P + R == 0 else 2 * P * R / (P + R)


# follows davisvideochallenge/davis2017-evaluation davis2017/metrics.py L6-L37 (db_eval_iou)
#   (commit ac7c43f)
def ref_j(gt, pred):
    inter, union = int((gt & pred).sum()), int((gt | pred).sum())
    return 1.0 if union == 0 else inter / union


def square(h, w, y, x, s):
    m = np.zeros((h, w), bool)
    m[y : y + s, x : x + s] = True
    return m


H, W = 40, 60  # diagonal 72.1 -> tolerance ceil(0.577) = 1 pixel


# follows davisvideochallenge/davis2017-evaluation davis2017/metrics.py L57, L77-L78 (bound_th 0.008,
#   bound_pix) (commit ac7c43f)
def test_tolerance_is_ceil_of_diagonal_fraction():
    assert bound_pixels((H, W)) == 1
    assert bound_pixels((480, 854)) == math.ceil(0.008 * math.hypot(480, 854)) == 8
    assert bound_pixels((1080, 1920)) == 18
    assert bound_pixels((10, 10), bound_th=3) == 3


# follows davisvideochallenge/davis2017-evaluation davis2017/metrics.py L122-L178 (_seg2bmap)
#   (commit ac7c43f)
@pytest.mark.parametrize("seed", range(3))
def test_bmap_matches_pixel_loop(seed):
    rng = np.random.default_rng(seed)
    m = rng.random((13, 17)) > 0.6
    np.testing.assert_array_equal(seg2bmap(m), ref_bmap(m))


# follows davisvideochallenge/davis2017-evaluation davis2017/metrics.py L6-L37 (db_eval_iou), L57-L119
#   (f_measure) (commit ac7c43f)
def test_known_values():
    empty, full = np.zeros((H, W), bool), np.ones((H, W), bool)
    assert db_iou(empty, empty) == 1.0 and f_measure(empty, empty) == 1.0
    assert db_iou(full, full) == 1.0 and f_measure(full, full) == 1.0
    # DAVIS's seg2bmap gives a full mask no boundary at all (the last row / column rules), so a full mask
    # against an empty one has two empty boundary maps: P = R = 1, F = 1, while J = 0
    assert not seg2bmap(full).any()
    assert db_iou(full, empty) == 0.0 and f_measure(full, empty) == 1.0
    obj = square(H, W, 5, 5, 8)
    assert f_measure(obj, empty) == 0.0  # nothing predicted: P = 1, R = 0
    assert f_measure(empty, obj) == 0.0  # nothing to find: P = 0, R = 1
    s = 10
    for k in (1, 2, 4):
        gt, pred = square(H, W, 10, 10, s), square(H, W, 10, 10 + k, s)
        assert db_iou(gt, pred) == pytest.approx((s - k) / (s + k))
    # shifted by 1 pixel: every boundary pixel within the 1-pixel tolerance
    assert f_measure(square(H, W, 10, 10, s), square(H, W, 11, 10, s)) == pytest.approx(1.0)
    assert f_measure(square(H, W, 10, 10, s), square(H, W, 11, 11, s)) < 1.0  # sqrt(2) > 1 pixel
    # thin objects: a 1-pixel line shifted by one pixel shares no pixel but its boundary matches
    a, b = np.zeros((H, W), bool), np.zeros((H, W), bool)
    a[20, 5:50], b[21, 5:50] = True, True
    assert db_iou(a, b) == 0.0
    assert f_measure(a, b) == pytest.approx(1.0)
    b2 = np.zeros((H, W), bool)
    b2[25, 5:50] = True  # 5 pixels away: beyond tolerance
    assert f_measure(a, b2) == pytest.approx(0.0)


# follows davisvideochallenge/davis2017-evaluation davis2017/metrics.py L6-L37 (db_eval_iou), L57-L119
#   (f_measure, disk dilation L86-L89) (commit ac7c43f)
@pytest.mark.parametrize("seed", range(4))
def test_f_and_j_match_reference(seed):
    rng = np.random.default_rng(seed)
    for _ in range(4):
        gt = square(H, W, *rng.integers(0, 25, 2), int(rng.integers(1, 15)))
        pred = np.roll(gt, tuple(rng.integers(-4, 5, 2)), axis=(0, 1)) | (rng.random((H, W)) > 0.97)
        assert f_measure(gt, pred) == pytest.approx(ref_f(gt, pred), abs=1e-12)
        assert db_iou(gt, pred) == pytest.approx(ref_j(gt, pred), abs=1e-12)
    # a larger tolerance (bound_th >= 1 is pixels)
    gt, pred = square(H, W, 5, 5, 12), square(H, W, 8, 9, 12)
    assert f_measure(gt, pred, bound_th=3) == pytest.approx(ref_f(gt, pred, bound_th=3), abs=1e-12)


# db_boundary follows davisvideochallenge/davis2017-evaluation davis2017/metrics.py L40-L54
#   (db_eval_boundary) (commit ac7c43f); the JFMeter / group means are maskloop's own (not cited)
def test_expression_and_split_means():
    gt = np.stack([square(H, W, 10, 10, 10), np.zeros((H, W), bool)])
    pred = np.stack([square(H, W, 10, 12, 10), np.zeros((H, W), bool)])
    r = jf_expression(gt, pred)
    j = np.mean([ref_j(g, p) for g, p in zip(gt, pred)])
    f = np.mean([ref_f(g, p) for g, p in zip(gt, pred)])
    assert r["J"] == pytest.approx(j) and r["F"] == pytest.approx(f) and r["J&F"] == pytest.approx((j + f) / 2)
    np.testing.assert_allclose(db_boundary(gt, pred), [ref_f(g, p) for g, p in zip(gt, pred)])
    meter = JFMeter()
    meter.add("v/0", gt, pred, group="a")
    meter.add("v/1", gt, gt, group="b")
    s = meter.summary()
    assert s["n"] == 2 and s["J"] == pytest.approx((j + 1) / 2) and s["J&F"] == pytest.approx(((j + f) / 2 + 1) / 2)
    g = meter.by_group()
    assert set(g) == {"a", "b", "overall"} and g["b"]["J&F"] == 1.0 and g["a"]["J"] == pytest.approx(j)
    with pytest.raises(ValueError):
        meter.add("v/0", gt, gt)

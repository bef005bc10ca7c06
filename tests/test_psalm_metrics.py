import numpy as np
import pytest

from maskloop.eval.psalm_metrics import PQAccumulator, SemanticConfusion, instance_ap, refer_iou, region_miou


def test_pq_hand_case():
    # 10x10: gt thing (cat 1) rows 0-4, gt stuff (cat 2) rows 5-9
    gt = np.zeros((10, 10), int)
    gt[:5], gt[5:] = 1, 2
    gt_segs = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}]
    # pred: thing rows 0-3 (IoU 0.8, TP), extra thing on row 4 (IoU 0.2 -> FP), stuff exact (TP)
    pred = np.zeros((10, 10), int)
    pred[:4], pred[4], pred[5:] = 7, 8, 9
    pred_segs = [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 1}, {"id": 9, "category_id": 2}]
    acc = PQAccumulator({1: True, 2: False})
    acc.add(pred, pred_segs, gt, gt_segs)
    r = acc.compute()
    c1 = r["per_class"][1]
    assert (c1["tp"], c1["fp"], c1["fn"]) == (1, 1, 0)
    assert c1["sq"] == pytest.approx(0.8) and c1["rq"] == pytest.approx(1 / 1.5)
    assert c1["pq"] == pytest.approx(0.8 / 1.5)
    assert r["Stuff"]["pq"] == pytest.approx(1.0)
    assert r["Things"]["pq"] == pytest.approx(0.8 / 1.5)
    assert r["All"]["pq"] == pytest.approx((0.8 / 1.5 + 1.0) / 2)


def test_pq_void_and_crowd():
    gt = np.zeros((10, 10), int)  # 0 = void
    gt[:4] = 1
    gt[6:] = 3  # crowd region of cat 1
    gt_segs = [{"id": 1, "category_id": 1}, {"id": 3, "category_id": 1, "iscrowd": 1}]
    pred = np.zeros((10, 10), int)
    pred[:5] = 5  # covers gt 1 (40) + one void row (10): union excludes void -> IoU 1.0
    pred[6:] = 6  # lies entirely on the crowd region: not a FP
    acc = PQAccumulator({1: True})
    acc.add(pred, [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 1}], gt, gt_segs)
    c1 = acc.compute()["per_class"][1]
    assert (c1["tp"], c1["fp"], c1["fn"]) == (1, 0, 0)
    assert c1["pq"] == pytest.approx(1.0)


def test_miou_hand_case():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 0]])
    cm = SemanticConfusion(3)
    cm.add(pred, gt)
    r = cm.compute()
    # class 0: tp 3, union 4 ; class 1: tp 3, union 4 ; class 2 absent
    assert r["per_class_iou"][0] == pytest.approx(0.75) and r["per_class_iou"][1] == pytest.approx(0.75)
    assert np.isnan(r["per_class_iou"][2])
    assert r["miou"] == pytest.approx(0.75)
    assert r["pixel_acc"] == pytest.approx(6 / 7)


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_ap_hand_cases():
    g = _box(20, 20, 0, 8, 0, 10)  # 80 px
    # perfect prediction of cat 1, cat 2 missed entirely -> AP = mean(1, 0) = 0.5
    gts = [{"masks": np.stack([g, _box(20, 20, 10, 20, 10, 20)]), "labels": [1, 2]}]
    preds = [{"masks": g[None], "labels": [1], "scores": [0.9]}]
    r = instance_ap(gts, preds)
    assert r["AP"] == pytest.approx(0.5) and r["AP50"] == pytest.approx(0.5)
    # IoU 50/80 = 0.625: matched at thresholds .50 .55 .60 only -> AP 0.3, AP50 1, AP75 0
    gts = [{"masks": g[None], "labels": [1]}]
    preds = [{"masks": _box(20, 20, 0, 5, 0, 10)[None], "labels": [1], "scores": [0.9]}]
    r = instance_ap(gts, preds)
    assert r["AP"] == pytest.approx(0.3) and r["AP50"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(0.0)
    # a higher-scored false positive ahead of the true positive halves precision at recall 1
    preds = [{"masks": np.stack([_box(20, 20, 12, 20, 12, 20), g]), "labels": [1, 1], "scores": [0.95, 0.9]}]
    r = instance_ap(gts, preds)
    assert r["AP50"] == pytest.approx(0.5)


def test_refer_and_region_iou():
    a = _box(10, 10, 0, 5, 0, 10)  # 50
    b = _box(10, 10, 0, 10, 0, 10)  # 100
    r = refer_iou([a, b], [b, b])
    assert r["giou"] == pytest.approx((0.5 + 1.0) / 2)
    assert r["ciou"] == pytest.approx((50 + 100) / (100 + 100))
    assert region_miou([a], [a]) == 1.0

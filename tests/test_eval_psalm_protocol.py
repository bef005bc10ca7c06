"""PSALM / Mask2Former evaluation conventions: original-size scoring, COCO area ranges, detectron2's mIoU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskloop.data.psalm import PSALMTransform
from maskloop.eval.psalm_metrics import SemanticConfusion, instance_ap


# follows facebookresearch/detectron2 (commit 02b5c4e2):
#   detectron2/evaluation/sem_seg_evaluation.py L138-L141 (conf[pred, gt]),
#   L186-L198 (mIoU over classes with ground truth)
def test_miou_averages_only_classes_with_ground_truth():
    """GT: 4 px of class 0; prediction: 2 of them class 0, 2 class 1 (a class only predicted).
    detectron2: IoU_0 = 2 / 4, class 1 has no GT pixel -> not averaged: mIoU 0.5 (not (0.5 + 0) / 2)."""
    gt = np.zeros((2, 2), np.int64)
    pred = np.array([[0, 0], [1, 1]])
    c = SemanticConfusion(3)
    c.add(pred, gt)
    r = c.compute()
    assert r["miou"] == pytest.approx(0.5) and r["pixel_acc"] == pytest.approx(0.5)
    # the reference: detectron2's SemSegEvaluator arithmetic written out (conf[pred, gt], as it stores it)
    conf = np.zeros((3, 3))
    for p, g in zip(pred.ravel(), gt.ravel()):
        conf[p, g] += 1
    tp = conf.diagonal()
    pos_gt, pos_pred = conf.sum(0), conf.sum(1)
    valid = (pos_gt > 0) & (pos_gt + pos_pred - tp > 0)
    assert r["miou"] == pytest.approx((tp[valid] / (pos_gt + pos_pred - tp)[valid]).sum() / valid.sum())


def _small_object_case():
    """A 200x200 image with one 30x30 object (900 px < 32^2: COCO 'small'); a perfect prediction."""
    m = np.zeros((1, 200, 200), bool)
    m[0, 50:80, 60:90] = True
    return m


# follows facebookresearch/detectron2 (commit 02b5c4e2):
#   detectron2/evaluation/coco_evaluation.py L686-L689 (APs/APm/APl),
#   L475-L478 (the 32^2 / 96^2 bounds, as written in _evaluate_box_proposals)
# follows zamling/PSALM (commit d5dbfda):
#   psalm/model/language_model/llava_phi.py L1416-L1429 (masks scored at the original height x width)
def test_ap_area_ranges_apply_to_original_pixels():
    m = _small_object_case()
    orig = PSALMTransform(image_size=1024, mask_size="original").masks(m)
    big = PSALMTransform(image_size=1024).masks(m)  # the old way: every mask resized to 1024^2
    assert orig.shape == (1, 200, 200) and big.shape == (1, 1024, 1024)

    def ap(masks):
        gt = {"masks": masks.bool(), "labels": torch.zeros(1, dtype=torch.long), "iscrowd": torch.zeros(1).long()}
        pr = {"masks": masks.bool(), "labels": torch.zeros(1, dtype=torch.long), "scores": torch.ones(1)}
        return instance_ap([gt], [pr])

    a, b = ap(orig), ap(big)
    assert a["AP"] == pytest.approx(1.0) and a["APs"] == pytest.approx(1.0) and a["APl"] == -1.0
    # at 1024^2 the same object has ~23600 px: 'large', so APs is undefined and the split's APs moves
    assert b["APs"] == -1.0 and b["APl"] == pytest.approx(1.0)


# follows zamling/PSALM (commit d5dbfda):
#   psalm/model/language_model/llava_phi.py L1416-L1429, through
#   facebookresearch/detectron2 detectron2/modeling/postprocessing.py L77-L101 (commit 02b5c4e2)
def test_original_mode_keeps_an_object_that_a_resize_would_lose():
    m = np.zeros((1, 600, 600), bool)
    m[0, 300, 300:302] = True  # a 1x2 px sliver
    assert not PSALMTransform(image_size=64).masks(m).any()
    assert PSALMTransform(image_size=64, mask_size="original").masks(m).sum() == 2
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    assert torch.equal(PSALMTransform(image_size=64, original=True).label_map(ids), torch.from_numpy(ids))


# follows zamling/PSALM (commit d5dbfda):
#   psalm/model/language_model/llava_phi.py L1416-L1429 (scored at the original height x width)
def test_evaluate_psalm_scores_at_the_original_size(tmp_path, monkeypatch):
    """Shapes scenes of 48x48 px, a model fed 64x64: every task's ground truth reaches the metrics at 48x48,
    the region prompts reach the model at 64x64, and the readers are put back afterwards."""
    from maskloop.data.fixtures import write_shapes_psalm
    from maskloop.eval import psalm_eval
    from maskloop.recipes.psalm import build_psalm

    torch.set_num_threads(1)
    info = write_shapes_psalm(tmp_path, n=3, image_size=48)
    data = [{"kind": "coco_panoptic", "root": str(info["coco_root"]), "split": info["split"]},
            {"kind": "refcoco", "root": str(info["refer_root"])},
            {"kind": "coco_interactive", "json_path": str(info["interactive_json"]), "image_dir": str(info["images"]),
             "prompt_type": "box"}]
    built = build_psalm(dict(model="psalm-tiny", data=data), eval_mode=True)
    sizes, region_inputs = set(), set()
    add = psalm_eval._Task.add

    def spy(self, out, b, meta, post):
        for k in ("semantic_map", "masks"):
            if k in meta:
                sizes.add((self.task, tuple(meta[k].shape[-2:])))
        return add(self, out, b, meta, post)

    monkeypatch.setattr(psalm_eval._Task, "add", spy)
    fwd = built["model"].forward

    def seen(task, **kw):
        if "region_masks" in kw:
            region_inputs.add(tuple(kw["region_masks"].shape[-2:]))
        return fwd(task, **kw)

    monkeypatch.setattr(built["model"], "forward", seen)
    res = psalm_eval.evaluate_psalm(built["model"], built["dataset"], built["collator"], batch_size=3,
                                    print_table=False)
    assert {s for _, s in sizes} == {(48, 48)} and {t for t, _ in sizes} == {"panoptic", "referring", "region"}
    assert region_inputs == {(64, 64)}
    assert res["eval/n_skipped"] == 0 and res["eval/n_scored"] == len(built["dataset"])
    transforms = [getattr(d, "transform", None) for d in psalm_eval._readers(built["dataset"])]
    assert not any(getattr(t, "original", False) for t in transforms)  # restored
    assert built["collator"].region_size is None

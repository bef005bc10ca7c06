"""The referring-evaluation protocol (Sa2VA's), original-size scoring and skip-and-count, on hand-made cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny

from maskloop.eval.data import EvalSplit, eval_loader, eval_transform
from maskloop.eval.metrics import RefSegMeter
from maskloop.eval.refer import (
    SA2VA_REFER_QUESTION,
    evaluate_refer,
    first_seg_index,
    generate_refer,
    logits_at,
    score_batch,
    to_device,
)
from maskloop.model.grounded import Generated


# ------------------------------------------------------------------ no [SEG] -> empty prediction, counted
# follows magic-research/Sa2VA (commit d01bf3f):
#   projects/llava_sam2/evaluation/refcoco_eval.py L101-L105 (an answer without [SEG] gives a None mask),
#   projects/llava_sam2/evaluation/dataset/RES.py L196-L248 (evaluate: None skipped L214-L215,
#   gIoU L233, cIoU L240)
def test_no_seg_answer_is_counted_as_sa2va_scores_it():
    gt = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt[:, :2] = True  # 8 px each
    logits = torch.full((2, 4, 4), -5.0)
    logits[0, :2] = 5.0  # row 0 predicts its GT exactly; row 1 answered without [SEG]
    has_seg = torch.tensor([True, False])
    sa2va, empty = RefSegMeter(), RefSegMeter()
    score_batch(sa2va, logits, has_seg, {"gt_mask": list(gt)}, no_seg="sa2va")
    score_batch(empty, logits, has_seg, {"gt_mask": list(gt)}, no_seg="empty")
    a, b = sa2va.compute(), empty.compute()
    # Sa2VA's RESDataset.evaluate: the missing mask adds 0 to the gIoU sum, n counts it, the cIoU sums skip it
    assert a["n"] == 2 and a["gIoU"] == pytest.approx(0.5) and a["cIoU"] == pytest.approx(1.0)
    assert a["no_seg_frac"] == pytest.approx(0.5) and a["P@0.5"] == pytest.approx(0.5)
    # 'empty': an empty mask, so the GT's 8 px enter the union
    assert b["gIoU"] == pytest.approx(0.5) and b["cIoU"] == pytest.approx(8 / 16) and b["no_seg_frac"] == 0.5


# follows magic-research/Sa2VA (commit d01bf3f):
#   projects/llava_sam2/hf/models/modeling_sa2va_chat.py L747-L751 and L768-L773
#   (sequences[0][:-1]: only fed-back [SEG]s),
#   projects/llava_sam2/evaluation/refcoco_eval.py L107 (the first mask, pred_mask[0])
def test_first_seg_index_takes_the_first_fed_back_seg(tiny_tokenizer):
    model = make_tiny()
    seg, end, pad = model.builder.seg_id, model.builder.end_id, model.builder.pad_id
    ids = torch.tensor([[5, seg, 6, seg, end, pad], [5, 6, 7, end, pad, pad], [5, 6, 7, 8, 9, seg]])
    lengths = torch.tensor([4, 3, 6])
    finished = torch.tensor([True, True, False])
    # row 2: [SEG] is the last token of an answer cut at max_new_tokens: never fed back, so no mask (as Sa2VA)
    assert first_seg_index(model, ids, lengths, finished).tolist() == [1, -1, -1]


def _batch(model, n=2, seed=0):
    torch.manual_seed(seed)
    S, G = model.cfg.vision.image_size, model.cfg.sam2.image_size
    return {"pixel_values": torch.randn(n, 3, S, S), "g_pixel_values": torch.randint(0, 256, (n, 3, G, G)).to(torch.uint8),
            "expression": ["the red circle", "the small blue square"][:n]}


# follows magic-research/Sa2VA (commit d01bf3f):
#   projects/llava_sam2/evaluation/dataset/RES.py L163-L168 (the "Please segment {} in this image." question),
#   projects/llava_sam2/evaluation/refcoco_eval.py L107 (the first [SEG] mask)
def test_generated_seg_gives_the_teacher_forced_mask_of_the_same_answer(monkeypatch):
    """Free generation answering "sure , [SEG] . [SEG]" (row 0) / "sure ." (row 1): row 0's mask is the one
    the model's own teacher-forced path gives for the same prompt and the answer up to its first [SEG]."""
    model = make_tiny().eval()
    b = model.builder
    seg, end, pad = b.seg_id, b.end_id, b.pad_id
    ans0 = b.ids("sure ,") + [seg] + b.ids(".") + [seg]
    ans1 = b.ids("sure .")
    T = 8
    ids = torch.full((2, T), pad)
    ids[0, : len(ans0) + 1] = torch.tensor(ans0 + [end])
    ids[1, : len(ans1) + 1] = torch.tensor(ans1 + [end])
    fake = Generated(ids, torch.tensor([len(ans0), len(ans1)]), torch.tensor([True, True]))
    seen = {}

    def generate(emb, mask, pos, max_new_tokens, **kw):
        seen["L"] = emb.shape[1]
        return fake

    monkeypatch.setattr(model, "generate", generate)
    batch = _batch(model)
    with torch.no_grad():
        out = generate_refer(model, batch, max_new_tokens=T)
        assert out["has_seg"].tolist() == [True, False]
        assert torch.isinf(out["logits"][1]).all() and (out["logits"][1] < 0).all()  # no mask for row 1
        # reference: the model's teacher-forced segment() with Sa2VA's question and the answer to the first [SEG]
        pre, suf = SA2VA_REFER_QUESTION.split("{expr}")
        q = [(b.ids(pre), b.ids(suf) + list(b._suffix_ids), b.ids("sure ,") + [seg])]
        ref = model.segment(batch["pixel_values"][:1], model.sam_features(batch["g_pixel_values"][:1]),
                            b.expressions(batch["expression"][:1]), questions=q, lm_loss=False)["mask_logits"]
    assert torch.allclose(out["logits"][0], ref[0], atol=1e-4)
    assert "[SEG]" in out["answers"][0]


# follows magic-research/Sa2VA (commit d01bf3f):
#   projects/llava_sam2/evaluation/refcoco_eval.py L101-L105,
#   projects/llava_sam2/evaluation/dataset/RES.py L214-L215
def test_evaluate_refer_generate_counts_no_seg(monkeypatch):
    model = make_tiny().eval()
    b = model.builder

    def generate(emb, mask, pos, max_new_tokens, **kw):  # every answer: "sure ." (no [SEG])
        B = emb.shape[0]
        ids = torch.full((B, max_new_tokens), b.pad_id)
        ids[:, :2] = torch.tensor(b.ids("sure ."))
        ids[:, 2] = b.end_id
        return Generated(ids, torch.full((B,), 2), torch.ones(B, dtype=torch.bool))

    monkeypatch.setattr(model, "generate", generate)
    from maskloop.data.sources.shapes import ShapesReferDataset

    ds = ShapesReferDataset(3, seed="val", transform=eval_transform(model.cfg))
    r = evaluate_refer(model, {"s": ds}, batch_size=2, progress=False, max_new_tokens=4)["s"]
    assert r["no_seg_frac"] == 1.0 and r["gIoU"] == 0.0 and r["n_scored"] == 3 and r["empty_pred_frac"] == 1.0


# ------------------------------------------------------------------ original size vs SAM size
# follows magic-research/Sa2VA (commit d01bf3f):
#   projects/llava_sam2/hf/models/modeling_sa2va_chat.py L759-L762
#   (bilinear resize to the original (h, w), sigmoid > 0.5)
def test_logits_resized_bilinearly_to_the_original_non_square_size():
    g = torch.randn(32, 32)
    got = logits_at(g, (12, 20))
    ref = F.interpolate(g[None, None], size=(12, 20), mode="bilinear", align_corners=False)[0, 0].sigmoid() > 0.5
    assert got.shape == (12, 20) and torch.equal(got, ref)


# follows magic-research/Sa2VA (commit d01bf3f):
#   projects/llava_sam2/hf/models/modeling_sa2va_chat.py L759-L762 (masks at the original size),
#   projects/llava_sam2/evaluation/dataset/RES.py L235-L240 (cIoU = summed intersection / summed union)
def test_original_size_scoring_weighs_images_by_their_pixels():
    """Known answers: a 10x20 image predicted wrong, a 100x200 image predicted right (GT = whole image).
    At the original size cIoU = 20000 / (20000 + 200); at a common SAM size both weigh the same: 0.5."""
    G = 16
    logits = torch.stack([torch.full((G, G), -4.0), torch.full((G, G), 4.0)])
    gts = [torch.ones(10, 20, dtype=torch.bool), torch.ones(100, 200, dtype=torch.bool)]
    orig, sam = RefSegMeter(), RefSegMeter()
    assert score_batch(orig, logits, torch.ones(2, dtype=torch.bool), {"gt_mask": gts}) == "original"
    assert score_batch(sam, logits, torch.ones(2, dtype=torch.bool), {"masks": torch.ones(2, G, G)}) == "sam"
    assert orig.compute()["cIoU"] == pytest.approx(20000 / 20200)
    assert sam.compute()["cIoU"] == pytest.approx(0.5)
    assert orig.compute()["gIoU"] == sam.compute()["gIoU"] == pytest.approx(0.5)


def test_eval_transform_keeps_the_original_mask():
    from PIL import Image

    model = make_tiny()
    tf = eval_transform(model.cfg)
    m = np.zeros((30, 50), bool)
    m[3:7, 10:41] = True
    out = tf(Image.fromarray(np.zeros((30, 50, 3), np.uint8)), m)
    assert out["orig_size"] == (30, 50) and torch.equal(out["gt_mask"], torch.from_numpy(m))
    G = model.cfg.sam2.image_size
    assert out["masks"].shape == (G, G)  # the model-side tensors are unchanged


# ------------------------------------------------------------------ nothing substituted
def test_missing_image_is_skipped_and_counted_not_replaced(tmp_path):
    from maskloop.data.fixtures import write_refcoco
    from maskloop.data.sources.refcoco import RefCOCODataset

    info = write_refcoco(tmp_path, num_images=4, refs_per_image=1, sentences_per_ref=1, size=(48, 64))
    model = make_tiny()
    ds = RefCOCODataset(info["root"], split="train", transform=eval_transform(model.cfg))
    assert len(ds) == 3  # images 0, 1, 2 are train
    (tmp_path / "images" / "train2014" / "COCO_train2014_000000001001.jpg").unlink()
    # the training reader substitutes: 3 items, one a duplicate of its neighbour
    assert [ds[i]["expression"] for i in range(3)].count(ds[2]["expression"]) == 2
    ds2 = RefCOCODataset(info["root"], split="train", transform=eval_transform(model.cfg))
    seen, skipped = [], {}
    for batch in eval_loader(ds2, batch_size=2):
        seen += batch.get("expression", [])
        for k, v in batch["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    assert skipped == {"missing_file": 1} and len(seen) == 2 and len(set(seen)) == 2
    r = evaluate_refer(model, {"v": ds2}, batch_size=2, progress=False, protocol="teacher_forced")["v"]
    assert r["n_scored"] == 2 and r["n_skipped"] == 1 and r["n"] == 2 and r["skipped"] == {"missing_file": 1}
    assert r["scored_at"] == "original"


def test_eval_split_counts_a_plain_dataset_error():
    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            if i == 1:
                raise FileNotFoundError("gone")
            return {"x": torch.zeros(2)}

    items = [EvalSplit(Bad())[i] for i in range(3)]
    assert "_skip" in items[1] and items[1]["_skip"] == "missing_file" and "x" in items[0]


def test_cli_eval_on_the_refcoco_fixture_prints_the_papers_table(tmp_path, capsys):
    """`maskloop eval` on RefCOCO + RefCOCOg fixtures (non-square 48x64 images): the papers' columns, counts."""
    from maskloop.cli import main
    from maskloop.data.fixtures import write_refcoco
    from maskloop.model.checkpoints import save_published

    write_refcoco(tmp_path / "refer", "refcoco", num_images=12, refs_per_image=1, sentences_per_ref=1)
    write_refcoco(tmp_path / "refer", "refcocog", num_images=8, refs_per_image=1, sentences_per_ref=1)
    (tmp_path / "refer" / "images" / "train2014" / "COCO_train2014_000000001003.jpg").unlink()  # refcoco val
    save_published(make_tiny(), tmp_path / "ckpt")
    out = tmp_path / "res.json"
    assert main(["eval", "-c", str(tmp_path / "ckpt"), "--refcoco", str(tmp_path / "refer"), "--refcoco-dataset",
                 "refcoco", "refcocog", "--batch-size", "2", "--max-new-tokens", "4", "--out", str(out),
                 "--no-progress"]) == 0
    table = capsys.readouterr().out
    print(table)
    assert "refcoco+" in table and "refcocog (umd)" in table and "no-[SEG] %" in table
    res = json.loads(out.read_text())
    assert set(res["refer"]) == {"refcoco_val", "refcoco_testA", "refcoco_testB", "refcocog_val", "refcocog_test"}
    assert res["refer"]["refcoco_val"]["n_skipped"] == 1 and res["refer"]["refcoco_val"]["n_scored"] == 0
    assert res["refer"]["refcoco_testA"]["n_scored"] == 1 and res["refer"]["refcoco_testA"]["scored_at"] == "original"
    assert res["counts"]["refer/refcocog_test"] == {"n_scored": 1, "n_skipped": 0}


def test_to_device_keeps_lists():
    b = to_device({"a": torch.zeros(1), "gt_mask": [torch.zeros(2, 3)]}, "cpu")
    assert isinstance(b["gt_mask"], list)


# ------------------------------------------------------------------ small conventions
def test_degenerate_polygon_keeps_its_sample_in_evaluation(tmp_path):
    """A polygon pycocotools decodes (collinear points: an empty mask) keeps its sample for evaluation; the
    training reader still skips the empty one; one pycocotools refuses (4 numbers) is a bad_rle."""
    import pickle

    from maskloop.data.fixtures import write_refcoco
    from maskloop.data.io import decode_segmentation
    from maskloop.data.robust import SampleError
    from maskloop.data.sources.refcoco import RefCOCODataset

    with pytest.raises(SampleError, match="pycocotools"):
        decode_segmentation([[10, 10, 20, 20]], 48, 64)
    assert decode_segmentation([[5, 5, 10, 10, 15, 15]], 48, 64).sum() == 0  # decodes (to nothing)
    info = write_refcoco(tmp_path, num_images=4, refs_per_image=1, sentences_per_ref=1, size=(48, 64))
    inst = json.loads((tmp_path / "refcoco" / "instances.json").read_text())
    refs = pickle.loads((tmp_path / "refcoco" / "refs(unc).p").read_bytes())
    ann = next(a for a in inst["annotations"] if a["id"] == refs[0]["ann_id"])
    ann["segmentation"] = [[5.0, 5.0, 10.0, 10.0, 15.0, 15.0]]  # three collinear points
    (tmp_path / "refcoco" / "instances.json").write_text(json.dumps(inst))
    model = make_tiny()
    ev = RefCOCODataset(info["root"], split="train", transform=eval_transform(model.cfg))
    r = evaluate_refer(model, {"t": ev}, batch_size=3, progress=False, protocol="teacher_forced")["t"]
    assert r["n_scored"] == 3 and r["n_skipped"] == 0 and r["empty_gt_frac"] == pytest.approx(1 / 3)
    from maskloop.data.transforms import SampleTransform

    tr = RefCOCODataset(info["root"], split="train", transform=SampleTransform(32, 32, 4))
    tr[0]
    assert tr.skip_counts() == {"refcoco/empty_mask": 1}


# follows magic-research/Sa2VA (commit d01bf3f):
#   projects/llava_sam2/evaluation/dataset/RES.py L226-L227 (empty union: gIoU +1) and L240 (cIoU + 1e-10)
def test_all_empty_split_gives_one_cIoU_in_every_meter():
    from maskloop.eval.metrics import CycleMeter
    from maskloop.eval.psalm_metrics import refer_iou

    z = torch.zeros(3, 5, 7, dtype=torch.bool)
    r, c = RefSegMeter(), CycleMeter()
    r.update(z, z)
    c.update(z, z)
    vals = {r.compute()["cIoU"], c.compute()["cycle_cIoU"], refer_iou(list(z), list(z))["ciou"]}
    assert vals == {0.0}  # Sa2VA: sum I / (sum U + 1e-10)
    assert r.compute()["gIoU"] == 1.0  # ... while every both-empty sample is a perfect gIoU

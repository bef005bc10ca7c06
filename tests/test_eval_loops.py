"""Evaluation loops (refer / caption / cycle): known answers with a stub model, and the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from maskloop.eval.caption import evaluate_captions
from maskloop.eval.cycle import evaluate_cycle
from maskloop.eval.refer import eval_mode, evaluate_refer, evaluate_text_sensitivity
from maskloop.model.grounded import Generated
from maskloop.model.prompts import Ragged

G = 16  # "SAM" size of the stub data


class _Builder:
    def expressions(self, texts):
        return Ragged.from_lists([[1] * len(t.split()) for t in texts], pad_id=0)

    def decode(self, ids, lengths):
        return ["a red circle" if int(n) > 0 else "" for n in lengths]


class StubModel(torch.nn.Module):
    """Predicts the mask stored in channel 0 of ``g_pixel_values`` (``mode='oracle'``) or the left half.

    ``describe`` returns 3 tokens ("a red circle"), or nothing for ``empty_caption``; every
    expression part ``segment`` receives is recorded.
    """

    def __init__(self, mode: str = "oracle", empty_caption: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.mode, self.empty_caption = mode, empty_caption
        self.builder = _Builder()
        self.seen_exprs: list = []
        self.modes_seen: list[bool] = []

    def sam_features(self, g):
        return g

    def image_tokens(self, pv):
        return None  # segment() ignores image features

    def segment(self, pv, feats, expr, questions=None, gt_masks=None, image_feats=None, lm_loss=True):
        self.seen_exprs.append(expr)
        self.modes_seen.append(self.training)
        B = feats.shape[0]
        if self.mode == "oracle":
            m = feats[:, 0] > 127
        elif self.mode == "words":  # left half for 3-word expressions, right half otherwise
            m = torch.zeros(B, G, G, dtype=torch.bool)
            three = (expr.lengths == 3)[:, None, None]
            m[:, :, : G // 2] = three
            m[:, :, G // 2 :] = ~three
        elif self.mode == "empty":
            m = torch.zeros(B, G, G, dtype=torch.bool)
        else:
            m = torch.zeros(B, G, G, dtype=torch.bool)
            m[:, :, : G // 2] = True
        return {"mask_logits": torch.where(m, 10.0, -10.0)}

    def describe(self, pv, prompt_masks, max_new_tokens=32):
        B = pv.shape[0]
        n = 0 if self.empty_caption else 3
        ids = torch.full((B, max_new_tokens), 9, dtype=torch.long)
        ids[:, :n] = torch.tensor([5, 6, 7])[:n]
        return Generated(ids, torch.full((B,), n), torch.ones(B, dtype=torch.bool))


def _masks(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        m = np.zeros((G, G), bool)
        y, x = rng.integers(0, G - 6, 2)
        h, w = rng.integers(2, 7, 2)
        m[y : y + h, x : x + w] = True
        out.append(m)
    return out


class MaskDataset(torch.utils.data.Dataset):
    def __init__(self, masks, caption="a red circle"):
        self.masks, self.caption = masks, caption

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        m = torch.from_numpy(self.masks[i])
        g = torch.zeros(3, G, G, dtype=torch.uint8)
        g[0] = m.to(torch.uint8) * 255
        return {"pixel_values": torch.zeros(3, 8, 8), "g_pixel_values": g, "masks": m.float(),
                "prompt_masks": torch.ones(4, 4, dtype=torch.uint8), "expression": "the red circle",
                "caption": self.caption, "dataset": "stub"}


def test_refer_oracle_and_left_half_known_ciou_giou():
    masks = _masks(7)
    ds = MaskDataset(masks)
    res = evaluate_refer(StubModel("oracle"), {"a": ds}, batch_size=3, progress=False, protocol="teacher_forced")
    assert res["a"]["cIoU"] == pytest.approx(1.0) and res["a"]["gIoU"] == pytest.approx(1.0)
    assert res["a"]["n"] == 7  # the last, partial batch counted
    left = np.zeros((G, G), bool)
    left[:, : G // 2] = True
    inter = [float((m & left).sum()) for m in masks]
    union = [float((m | left).sum()) for m in masks]
    out = evaluate_refer(StubModel("left"), ds, batch_size=4, progress=False, protocol="teacher_forced")  # a bare dataset: one split
    assert len(out) == 1
    res = next(iter(out.values()))
    assert res["cIoU"] == pytest.approx(sum(inter) / sum(union))
    assert res["gIoU"] == pytest.approx(np.mean([i / u for i, u in zip(inter, union)]))


class PairDataset(MaskDataset):
    """MaskDataset items plus a second expression ("the square", 2 words) whose object is the right half."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        right = torch.zeros(G, G)
        right[:, G // 2 :] = 1
        return {**item, "other_expression": "the square", "other_masks": right}


def test_text_sensitivity_known_answers():
    ds = PairDataset(_masks(5))
    follows = evaluate_text_sensitivity(StubModel("words"), ds, batch_size=2, progress=False)
    assert follows["n"] == 5
    assert follows["mask_IoU_between_expressions"] == pytest.approx(0.0)  # left vs right half: disjoint
    assert follows["text_sensitivity"] == pytest.approx(1.0)
    assert follows["other_IoU"] == pytest.approx(1.0)  # the second mask is the other object
    ignores = evaluate_text_sensitivity(StubModel("left"), ds, batch_size=3, progress=False)
    assert ignores["text_sensitivity"] == pytest.approx(0.0)  # the same mask whatever is asked
    assert ignores["other_IoU"] == pytest.approx(0.0)
    empty = evaluate_text_sensitivity(StubModel("empty"), ds, batch_size=5, progress=False)
    assert empty["mask_IoU_between_expressions"] == pytest.approx(1.0)  # two empty masks agree
    with pytest.raises(KeyError, match="other_expression"):
        evaluate_text_sensitivity(StubModel("left"), MaskDataset(_masks(2)), progress=False)


def test_text_sensitivity_meter_gives_the_refer_metrics_of_the_same_pass():
    from maskloop.eval.metrics import RefSegMeter

    ds = PairDataset(_masks(6))
    meter = RefSegMeter()
    evaluate_text_sensitivity(StubModel("left"), ds, batch_size=4, progress=False, meter=meter)
    ref = evaluate_refer(StubModel("left"), ds, batch_size=4, progress=False, protocol="teacher_forced")
    r = next(iter(ref.values()))
    assert meter.compute() == pytest.approx({k: r[k] for k in meter.compute()})


def test_refer_max_samples_and_eval_mode_restored():
    model = StubModel("oracle")
    model.train()
    res = evaluate_refer(model, {"a": MaskDataset(_masks(9))}, batch_size=4, max_samples=5, progress=False, protocol="teacher_forced")
    assert res["a"]["n"] == 5
    assert model.modes_seen and not any(model.modes_seen)  # evaluated in eval mode
    assert model.training  # ... and put back


def test_cycle_segments_the_generated_tokens_and_scores_captions():
    model = StubModel("oracle")
    ds = MaskDataset(_masks(5))
    res = evaluate_cycle(model, ds, batch_size=2, max_new_tokens=6, keep_examples=3, progress=False)
    assert res["cycle"]["cycle_mIoU"] == pytest.approx(1.0) and res["cycle"]["n"] == 5
    expr = model.seen_exprs[0]
    assert isinstance(expr, Ragged) and expr.lengths.tolist() == [3, 3]
    assert expr.ids[0, :3].tolist() == [5, 6, 7]  # the describe() ids, not a re-tokenised string
    assert res["caption"]["BLEU-1"] == pytest.approx(1.0) and res["caption"]["empty_frac"] == 0.0
    assert len(res["examples"]) == 3 and res["examples"][0]["caption"] == "a red circle"
    assert res["examples"][0]["reference"] == "a red circle"


def test_cycle_with_left_half_resegmentation_and_empty_captions():
    masks = _masks(4)
    res = evaluate_cycle(StubModel("left", empty_caption=True), MaskDataset(masks), batch_size=4, progress=False)
    left = np.zeros((G, G), bool)
    left[:, : G // 2] = True
    want = np.mean([(m & left).sum() / (m | left).sum() for m in masks])
    assert res["cycle"]["cycle_mIoU"] == pytest.approx(want)
    assert res["caption"]["empty_frac"] == 1.0 and res["caption"]["BLEU-1"] == pytest.approx(0.0, abs=1e-6)


def test_evaluate_captions_matches_references():
    res = evaluate_captions(StubModel(), MaskDataset(_masks(6), caption="a red circle"), batch_size=4,
                            max_new_tokens=5, progress=False)
    assert res["n"] == 6 and res["mean_len"] == 3.0
    assert res["BLEU-1"] == pytest.approx(1.0) and res["ROUGE-L"] == pytest.approx(1.0)
    res = evaluate_captions(StubModel(), MaskDataset(_masks(6), caption="a large blue square at the top"),
                            batch_size=4, progress=False)
    assert res["ROUGE-L"] < 0.5


# ---------------------------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny():
    from maskloop.data.sources.shapes import ShapesReferDataset, ShapesRegionCaptionDataset
    from maskloop.data.transforms import SampleTransform
    from maskloop.train.engine import TrainConfig, build_model

    torch.manual_seed(0)
    model = build_model(TrainConfig.from_mapping({"model": "tiny", "freeze": "all"}))
    c = model.cfg
    tf = SampleTransform(c.vision.image_size, c.sam2.image_size, c.prompt_grid)
    return model, ShapesReferDataset(7, seed="val", transform=tf), ShapesRegionCaptionDataset(5, seed="val", transform=tf)


@pytest.mark.parametrize("protocol", ["generate", "teacher_forced"])
def test_tiny_refer_is_batch_size_invariant(tiny, protocol):
    model, refer, _ = tiny
    a = evaluate_refer(model, {"v": refer}, batch_size=7, progress=False, protocol=protocol, max_new_tokens=4)["v"]
    b = evaluate_refer(model, {"v": refer}, batch_size=3, progress=False, protocol=protocol, max_new_tokens=4)["v"]
    assert a["n"] == b["n"] == 7
    assert a["cIoU"] == pytest.approx(b["cIoU"], abs=1e-6) and a["gIoU"] == pytest.approx(b["gIoU"], abs=1e-6)
    assert 0.0 <= a["cIoU"] <= 1.0


def test_tiny_cycle_runs_and_eval_mode_keeps_single_mask_decoding(tiny):
    model, _, regions = tiny
    dec = model.sam.sam.mask_decoder
    before = dec.dynamic_multimask_via_stability
    model.train()
    with eval_mode(model):
        assert not model.training and dec.dynamic_multimask_via_stability is False
        assert not torch.is_grad_enabled()
    assert model.training and dec.dynamic_multimask_via_stability == before
    res = evaluate_cycle(model, regions, batch_size=2, max_new_tokens=4, keep_examples=2, progress=False)
    assert res["cycle"]["n"] == 5 and math.isfinite(res["cycle"]["cycle_mIoU"])
    assert len(res["examples"]) == 2 and res["examples"][0]["image"].shape == (3, 128, 128)

"""Several [SEG] per answer and N-region caption prompts (issue 13, items 6 and 7).

References are per-sample loops written from Sa2VA's published behaviour: a [SEG]'s prompt is the last
hidden state at the [SEG] token's own position through ``text_hidden_fcs``, decoded by SAM2 on that
sample's image, one mask per [SEG] in order; in free generation those hidden states are the ones of the
generated tokens fed back one by one (all but the last generated token); the N-region prompt is
"There are N part regions in the picture: region1<vp>...</vp>, region2<vp>...</vp>.\\n".
"""

import pytest
import torch
from conftest import WORDS, tiny_batch

from maskloop.data.mixture import collate
from maskloop.model import losses as L
from maskloop.model.grounded import Generated, GroundedMLLM
from maskloop.model.presets import get_preset
from maskloop.model.prompts import IMG_CONTEXT, SEG, Ragged, build_word_tokenizer
from maskloop.model.sequence import assemble

EXTRA = ["region2", "region3", "and", "the", "cat", "dog", "no", "mask", "sure", "it", "is"]


def make_model(seed=0) -> GroundedMLLM:
    torch.manual_seed(seed)
    return GroundedMLLM(get_preset("tiny"), build_word_tokenizer(WORDS + EXTRA))


ANSWERS = ["no mask .", "sure , [SEG] .", "[SEG] , [SEG] and [SEG] ."]  # 0 / 1 / 3 [SEG]


def _questions(model, answers):
    qs = model.builder.seg_question(len(answers), fixed=True)
    return [(p, s, model.builder.ids(a) + [model.builder.end_id]) for (p, s, _), a in zip(qs, answers)]


def _reference_masks(model, pv, gp, expr_text, question):
    """One sample alone: hidden at each [SEG] position (a loop over positions) -> text_hidden_fcs -> SAM2."""
    b = model.builder
    expr = b.expressions([expr_text])
    emb, asm = model.build_inputs(b.seg_parts(expr, [question]), model.image_tokens(pv))
    hidden = model.run_llm(emb, asm.attention_mask, asm.position_ids)[0]
    feats = model.sam_features(gp)
    out = []
    for p, t in enumerate(asm.input_ids[0].tolist()):
        if t == b.seg_id:
            prompt = model.text_hidden_fcs(hidden[p])[None, None]
            out.append(model.sam.upsample(model.sam.decode(feats, prompt))[0])
    return out


def test_zero_one_three_seg_per_answer_masks_in_order():
    model = make_model()
    model.eval()
    pv, gp, _ = tiny_batch(model, B=3)
    texts = ["the red circle", "a square", "green triangle"]
    qs = _questions(model, ANSWERS)
    with torch.no_grad():
        out = model.segment(pv, model.sam_features(gp), model.builder.expressions(texts), qs, lm_loss=False)
        assert out["seg_counts"].tolist() == [0, 1, 3] and out["seg_rows"].tolist() == [1, 2, 2, 2]
        ref = [m for r in range(3) for m in _reference_masks(model, pv[r:r + 1], gp[r:r + 1], texts[r], qs[r])]
    assert out["mask_logits"].shape[0] == len(ref) == 4
    for got, want in zip(out["mask_logits"], ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the three masks of row 2 differ: each [SEG] has its own hidden state
    assert not torch.allclose(out["mask_logits"][1], out["mask_logits"][2])
    # Sa2VA's referring evaluation keeps each answer's first mask; none -> an empty prediction
    first, present = model.first_mask_per_row(out["mask_logits"], out["seg_rows"], 3)
    assert present.tolist() == [False, True, True] and bool((first[0] == float("-inf")).all())
    assert torch.equal(first[1], out["mask_logits"][0]) and torch.equal(first[2], out["mask_logits"][1])
    none, p0 = model.first_mask_per_row(out["mask_logits"][:0], out["seg_rows"][:0], 2)
    assert none.shape == (2, *out["mask_logits"].shape[1:]) and not p0.any()


def test_several_masks_per_sample_as_training_targets():
    """Samples carry (k, G, G) targets with ``num_masks``; collate flattens them; the loss is the mean of the
    per-mask losses and its gradient reaches the [SEG] head."""
    model = make_model(1)
    model.train()
    pv, gp, _ = tiny_batch(model, B=3)
    G = model.cfg.sam2.image_size
    g = torch.Generator().manual_seed(0)
    items = [{"masks": (torch.rand(k, G, G, generator=g) > 0.5).float(), "num_masks": torch.tensor(k)} for k in (0, 1, 3)]
    batch = collate(items)
    assert batch["masks"].shape == (4, G, G) and batch["num_masks"].tolist() == [0, 1, 3]
    questions = ["please segment the cat and the dog .", "please segment the cat .", "segment them ."]
    out = model.segment_answer(pv, model.sam_features(gp), questions, model.builder.answers(ANSWERS),
                               gt_masks=batch["masks"])
    per_mask = [L.mask_losses(out["low_res"][i:i + 1], batch["masks"][i:i + 1])["loss_mask"] for i in range(4)]
    torch.testing.assert_close(out["loss_mask"], torch.stack(per_mask).mean(), rtol=1e-5, atol=1e-6)
    (out["loss_mask"] + out["loss_lm"]).backward()
    assert model.text_hidden_fcs[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[SEG\]"):
        model.segment_answer(pv, model.sam_features(gp), questions, model.builder.answers(ANSWERS),
                             gt_masks=batch["masks"][:3])
    # no [SEG] anywhere: zero mask loss that still backpropagates
    none = model.segment_answer(pv, model.sam_features(gp), questions, model.builder.answers(["no mask ."] * 3),
                                gt_masks=batch["masks"][:0])
    assert none["mask_logits"].shape[0] == 0 and float(none["loss_mask"].detach()) == 0.0
    none["loss_mask"].backward()


# follows magic-research/Sa2VA projects/llava_sam2/hf/models/modeling_sa2va_chat.py L744-L766 (predict_forward, one mask per
# [SEG]) and L768-L773 (get_seg_hidden_states) (commit d01bf3f)
def _sa2va_generated_masks(model, pv, gp, question, gen_ids, finished):
    """Sa2VA's predict_forward for one sample: prefill, feed the generated tokens back one by one (all but
    the last), keep the last hidden state of each fed token; those fed as [SEG] -> masks."""
    from transformers import DynamicCache

    b = model.builder
    emb, asm = model.build_inputs(b.question_parts([question]), model.image_tokens(pv))
    cache = DynamicCache(config=model.llm.config)
    model.run_llm(emb, asm.attention_mask, asm.position_ids, cache)
    mask, pos = asm.attention_mask, asm.position_ids[:, -1:]
    feats = model.sam_features(gp)
    out = []
    for t in gen_ids[:-1]:  # sequences[:-1]
        pos, mask = pos + 1, torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        h = model.run_llm(model.embed_tokens(torch.tensor([[t]])), mask, pos, cache)[0, -1]
        if t == b.seg_id:
            out.append(model.sam.upsample(model.sam.decode(feats, model.text_hidden_fcs(h)[None, None]))[0])
    return out


# follows magic-research/Sa2VA projects/llava_sam2/hf/models/modeling_sa2va_chat.py L744-L773 (commit d01bf3f)
def test_free_generation_one_mask_per_generated_seg(monkeypatch):
    model = make_model(2)
    model.eval()
    b = model.builder
    pv, gp, _ = tiny_batch(model, B=3)
    end, pad, seg = b.end_id, b.pad_id, b.seg_id
    w = b.ids("the cat and")
    T = 6
    rows = [w + [end, pad, pad],  # no [SEG]
            [w[0], seg, w[2], seg, end, pad],  # two, finished
            [seg, w[1], seg, w[2], w[0], seg]]  # cut at T: the final [SEG] is never fed back -> two masks
    ids = torch.tensor(rows)
    finished = torch.tensor([True, True, False])
    lengths = torch.tensor([3, 4, 6])
    monkeypatch.setattr(model, "generate", lambda *a, **k: Generated(ids, lengths, finished))
    questions = ["please segment the cat .", "segment the cat and the dog .", "segment ."]
    with torch.no_grad():
        out = model.generate_segment(pv, model.sam_features(gp), questions, max_new_tokens=T)
        ref = []
        for r in range(3):
            n_gen = int(lengths[r]) + int(finished[r])
            ref += _sa2va_generated_masks(model, pv[r:r + 1], gp[r:r + 1], questions[r], rows[r][:n_gen], finished[r])
    assert out["seg_counts"].tolist() == [0, 2, 2] and len(ref) == 4
    for got, want in zip(out["mask_logits"], ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert out["texts"][1].count(SEG) == 2


def test_free_generation_end_to_end_counts():
    model = make_model(4)
    model.eval()
    with torch.no_grad():  # words only, [SEG] made likely, so that answers hold some
        model.internvl.lm_head.weight[len(model.tokenizer):] = 0
        model.new_head[int(model.new_token_slot[model.builder.seg_id])] *= 3.0
    pv, gp, _ = tiny_batch(model, B=3)
    with torch.no_grad():
        out = model.generate_segment(pv, model.sam_features(gp), ["segment the cat .", "segment .", "the dog"],
                                     max_new_tokens=6)
    fed = out["lengths"] - (~out["finished"]).long()
    want = [int((out["ids"][r, : int(fed[r])] == model.builder.seg_id).sum()) for r in range(3)]
    assert out["seg_counts"].tolist() == want and out["mask_logits"].shape[0] == sum(want) >= 1
    assert [t.count(SEG) for t in out["texts"]] != want  # a [SEG] as the cut answer's last token: no mask
    assert (out["ids"] != model.builder.img_ctx_id).all()


# ---------------------------------------------------------------------------------------------- N regions


# follows magic-research/Sa2VA projects/llava_sam2/hf/models/modeling_sa2va_chat.py L684-L693 (N-region prompt string) (commit d01bf3f)
def _expanded_ids(model, n_image, ks):
    """The prompt as Sa2VA writes it, expanded to one string and tokenised at once."""
    b, tok = model.builder, model.tokenizer
    regions = "".join(f"{', ' if i else ''}region{i + 1}<vp>{IMG_CONTEXT * k}</vp>" for i, k in enumerate(ks))
    text = (f"There are {len(ks)} part regions in the picture: {regions}.\n"
            "Please generate a detailed description for the given image region.")
    return b._user + [b.img_ctx_id] * n_image + b._after_img + tok.encode(text, add_special_tokens=False) + b._suffix_ids


# follows magic-research/Sa2VA projects/llava_sam2/hf/models/modeling_sa2va_chat.py L684-L693 (commit d01bf3f)
def test_n_region_prompt_string():
    model = make_model()
    b = model.builder
    k = torch.tensor([[3, 0, 0], [2, 5, 0], [1, 1, 4]])
    n_reg = torch.tensor([1, 2, 3])
    asm = assemble(b.caption_parts(k, None, None, n_reg), 3, b.pad_id)
    for r in range(3):
        got = asm.input_ids[r][asm.attention_mask[r].bool()].tolist()
        assert got == _expanded_ids(model, model.cfg.num_image_tokens, k[r, : n_reg[r]].tolist()), r
    # one region through the slot path = the single-region layout
    one = assemble(b.caption_parts(k[:, :1], None, None, torch.ones(3, dtype=torch.long)), 3, b.pad_id)
    assert torch.equal(one.input_ids, assemble(b.caption_parts(k[:, 0]), 3, b.pad_id).input_ids)
    with pytest.raises(ValueError, match="regions"):
        b.caption_parts(k, None, None, torch.tensor([0, 1, 1]))


def test_n_region_tokens_in_order_and_batched_equals_alone():
    model = make_model(4)
    model.eval()
    pv, _, _ = tiny_batch(model, B=3)
    g = model.cfg.prompt_grid
    gen = torch.Generator().manual_seed(1)
    regions = [[(torch.rand(g, g, generator=gen) > 0.7).to(torch.uint8) for _ in range(n)] for n in (1, 3, 2)]
    flat = torch.stack([m for rs in regions for m in rs])
    n_reg = torch.tensor([1, 3, 2])
    caps = model.builder.caption_answer(["a red circle", "blue and green", "small"])
    with torch.no_grad():
        feats = model.image_tokens(pv)
        pm, k = model.region_prompt(flat, n_reg)
        emb, asm = model.build_inputs(model.builder.caption_parts(k, None, None, n_reg), feats, pm)
        for r, rs in enumerate(regions):
            ctx = asm.input_ids[r] == model.builder.img_ctx_id
            want = torch.cat([feats[r]] + [feats[r][m.flatten().bool()] for m in rs])
            torch.testing.assert_close(emb[r][ctx], want)
        out = model.caption_logits(pv, flat, caps, num_regions=n_reg)
        for r, rs in enumerate(regions):
            one = model.caption_logits(pv[r:r + 1], torch.stack(rs)[None], Ragged(caps.ids[r:r + 1], caps.lengths[r:r + 1],
                                                                                  target=True))
            n = int(caps.lengths[r])
            torch.testing.assert_close(out["logits"][r, :n], one["logits"][0, :n], rtol=1e-4, atol=1e-4)
        d = model.describe(pv, flat, 4, num_regions=n_reg)
        assert d.ids.shape == (3, 4)

"""The grounded model's forward paths, gradients and generation (tiny preset, CPU)."""

import random

import pytest
import torch
from conftest import make_tiny, selected_lm_loss, tiny_batch

from maskloop.model.prompts import Ragged


def test_gradients_reach_trained_parts_only():
    model = make_tiny()
    model.train()
    pv, gp, masks = tiny_batch(model)
    feats = model.sam_features(gp)
    expr = model.builder.expressions(["the red circle", "a small blue square", "green triangle"])
    qs = model.builder.seg_question(3, rng=random.Random(0))
    out = model.segment(pv, feats, expr, qs, gt_masks=masks)
    k = torch.tensor([3, 1, 5])
    pm = torch.zeros(3, 8, 8)
    pm.view(3, -1)[0, :3] = 1
    pm.view(3, -1)[1, 10] = 1
    pm.view(3, -1)[2, 20:25] = 1
    assert pm.flatten(1).sum(1).tolist() == k.tolist()
    cap = model.caption_logits(pv, pm, model.builder.caption_answer(["a red circle", "blue", "small square"]))
    (out["loss_mask"] + out["loss_lm"] + cap["loss_lm"]).backward()
    groups = model.parameter_groups()
    for g in ("lora", "projector", "text_hidden_fcs", "sam2_decoder", "new_tokens"):
        grads = [p.grad for _, p in groups[g] if p.grad is not None]
        assert grads, f"no gradient in trained group {g}"
        assert sum(float(x.abs().sum()) for x in grads) > 0, f"zero gradient in {g}"
        assert all(p.requires_grad for _, p in groups[g])
    for g in ("vision", "llm_base", "sam2_encoder"):
        assert all(p.grad is None and not p.requires_grad for _, p in groups[g]), g
    # LoRA B starts at zero: A's gradient is zero on the first step, B's must not be
    lora_b = [p.grad for n, p in groups["lora"] if "lora_B" in n]
    assert all(float(x.abs().sum()) > 0 for x in lora_b)
    # the decoder's used parts get gradient: conv_s0/conv_s1 (applied to the frozen encoder's features) too
    names = {n: p for n, p in groups["sam2_decoder"]}
    assert names["sam.sam.mask_decoder.conv_s0.weight"].grad.abs().sum() > 0
    assert names["sam.sam.mask_decoder.output_hypernetworks_mlps.0.proj_out.weight"].grad.abs().sum() > 0


@pytest.mark.parametrize("seg_answer", ["fixed", "phrase"])
def test_embeds_path_equals_token_path(seg_answer):
    model = make_tiny(seg_answer=seg_answer)
    model.eval()
    pv, gp, _ = tiny_batch(model)
    feats = model.sam_features(gp)
    expr = model.builder.expressions(["the red circle", "a small blue square left of", "green"])
    qs = model.builder.seg_question(3, rng=random.Random(1))
    with torch.no_grad():
        a = model.segment(pv, feats, expr, qs)
        b = model.segment(pv, feats, model.expression_embeds(expr.ids, expr.lengths), qs)
    torch.testing.assert_close(a["mask_logits"], b["mask_logits"], rtol=1e-5, atol=1e-5)
    if seg_answer == "fixed":  # with "phrase", the copied expression is an LM target only as tokens
        torch.testing.assert_close(a["loss_lm"], b["loss_lm"])


def test_phrase_answer_repeats_the_expression_before_seg():
    from maskloop.config import ConfigError
    from maskloop.model.presets import get_preset
    from maskloop.model.sequence import assemble

    model = make_tiny(seg_answer="phrase")
    bld = model.builder
    expr = bld.expressions(["the red circle", "green"])
    qs = bld.seg_question(2, fixed=True)
    asm = assemble(bld.seg_parts(expr, qs), 2, bld.pad_id)
    text = [model.tokenizer.decode(r[m.bool()].tolist()) for r, m in zip(asm.input_ids, asm.attention_mask)]
    assert text[0].endswith("segment the red circle in this image? <|end|> \n <|assistant|> \n"
                            " sure, <p> the red circle </p> [SEG]. <|end|>"), text[0]
    assert text[1].endswith("sure, <p> green </p> [SEG]. <|end|>"), text[1]
    # every answer token is an LM target (labels sit one position earlier), the copied phrase included
    for b, n_expr in ((0, 3), (1, 1)):
        targets = asm.labels[b][asm.labels[b] != -100]
        want = bld._phrase_answer[0] + expr.ids[b, :n_expr].tolist() + bld._phrase_answer[1]
        assert targets.tolist() == want
    # embeddings: the same positions, no targets on the copy (no text: the question keeps its "the")
    asm = assemble(bld.seg_parts(expr, qs, drop_article=False), 2, bld.pad_id)
    emb = model.expression_embeds(expr.ids, expr.lengths)
    asm_e = assemble(bld.seg_parts(emb, qs), 2, bld.pad_id)
    assert len(asm_e.embeds) == 2 and asm_e.input_ids.shape == asm.input_ids.shape
    assert ((asm_e.labels != -100).sum(1) == (asm.labels != -100).sum(1) - expr.lengths).all()
    cfg = get_preset("tiny")
    cfg.seg_answer = "both"
    with pytest.raises(ConfigError, match="seg_answer"):
        cfg.validate()


def _reference_greedy(model, pv, prompt_masks, T):
    """One sample at a time, no padding, no cache: the full sequence re-run at every step."""
    outs = []
    for b in range(pv.shape[0]):
        feats = model.image_tokens(pv[b : b + 1])
        k = prompt_masks[b : b + 1].flatten(1).sum(1).long()
        ids = []
        for _ in range(T):
            ans = Ragged(torch.tensor([ids or [0]]), torch.tensor([len(ids)]))
            parts = model.builder.caption_parts(k, ans if ids else None)
            emb, asm = model.build_inputs(parts, feats, prompt_masks[b : b + 1])
            h = model.run_llm(emb, asm.attention_mask, asm.position_ids)[:, -1]
            logits = model.lm_logits(h)[0]
            nxt = int(logits.masked_fill(model.caption_banned(logits.device), float("-inf")).argmax(-1))
            ids.append(nxt)
            if nxt == model.builder.end_id:
                break
        outs.append(ids)
    return outs


def test_batched_generation_equals_stepwise_greedy_without_cache():
    model = make_tiny(seed=3)
    model.eval()
    with torch.no_grad():  # make the end token likely early for some rows: a ragged finish
        model.new_head.mul_(1.0)
        model.internvl.lm_head.weight[model.builder.end_id] *= 3.0
    pv, _, _ = tiny_batch(model, B=4, seed=5)
    pm = torch.zeros(4, 8, 8, dtype=torch.uint8)
    pm[0, 1:3, 1:3] = 1
    pm[1, 5, 5] = 1
    pm[2] = 1
    pm[3, :, 0] = 1  # K = 4, 1, 64, 8: ragged prompts
    T = 12
    with torch.no_grad():
        gen = model.describe(pv, pm, max_new_tokens=T)
        ref = _reference_greedy(model, pv, pm, T)
    end, pad = model.builder.end_id, model.builder.pad_id
    assert gen.ids.shape == (4, T)
    for b, r in enumerate(ref):
        got = gen.ids[b].tolist()
        assert got[: len(r)] == r
        assert all(t == pad for t in got[len(r) :])
        assert gen.finished[b].item() == (r[-1] == end)
        assert gen.lengths[b].item() == len([t for t in r if t != end])


def test_answer_without_seg_gives_no_mask_and_targets_must_match():
    """An answer may hold no [SEG] (issue 13): no mask; targets that do not match the [SEG] count: a clear error."""
    model = make_tiny()
    pv, gp, masks = tiny_batch(model, B=1)
    expr = model.builder.expressions(["red"])
    bad = [(model.builder.seg_question(1, fixed=True)[0][0], model.builder._suffix_ids, model.builder.ids("no mask"))]
    out = model.segment(pv, model.sam_features(gp), expr, bad)
    assert out["mask_logits"].shape[0] == 0 and out["seg_counts"].tolist() == [0]
    try:
        model.segment(pv, model.sam_features(gp), expr, bad, gt_masks=masks)
    except ValueError as e:
        assert "[SEG]" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_static_cache_decoder_equals_dynamic_cache_loop():
    model = make_tiny(seed=3)
    model.eval()
    with torch.no_grad():
        model.internvl.lm_head.weight[model.builder.end_id] *= 3.0
        for n, p in model.named_parameters():
            if "lora_B" in n:  # a trained adapter: the decoder merges it into its weights
                p.normal_(std=0.05)
    pv, _, _ = tiny_batch(model, B=4, seed=5)
    pm = torch.zeros(4, 8, 8, dtype=torch.uint8)
    pm[0, 1:3, 1:3] = 1
    pm[1, 5, 5] = 1
    pm[2] = 1
    pm[3, :, 0] = 1
    with torch.no_grad():
        plain = model.describe(pv, pm, max_new_tokens=12, static=False)
        fast = model.describe(pv, pm, max_new_tokens=12, static=True)
        again = model.describe(pv[[1, 0, 3, 2]], pm[[1, 0, 3, 2]], max_new_tokens=12, static=True)  # reused buffers
    assert torch.equal(plain.ids, fast.ids)
    assert torch.equal(plain.lengths, fast.lengths) and torch.equal(plain.finished, fast.finished)
    assert torch.equal(again.ids, plain.ids[[1, 0, 3, 2]])


def test_captions_never_contain_image_grounding_or_pad_tokens():
    """A head that prefers <IMG_CONTEXT> / [SEG]: both decoders pick the best allowed token instead."""
    from maskloop.model.prompts import IMG_CONTEXT, SEG

    model = make_tiny(seed=3)
    model.eval()
    img, seg = (model.tokenizer.convert_tokens_to_ids(t) for t in (IMG_CONTEXT, SEG))
    with torch.no_grad():
        model.internvl.lm_head.weight[img] *= 50.0
        model.new_head[list(model.new_token_ids.tolist()).index(seg)] *= 50.0
    pv, _, _ = tiny_batch(model, B=3, seed=5)
    pm = torch.zeros(3, 8, 8, dtype=torch.uint8)
    pm[0, 1:3, 1:3] = 1
    pm[1, 5, 5] = 1
    pm[2] = 1
    banned = model.caption_banned(pv.device)
    assert banned[img] and banned[seg] and banned[model.builder.pad_id] and not banned[model.builder.end_id]
    with torch.no_grad():
        feats = model.image_tokens(pv)
        k = pm.flatten(1).sum(1).long()
        emb, asm = model.build_inputs(model.builder.caption_parts(k), feats, pm)
        free = model.generate(emb, asm.attention_mask, asm.position_ids, 6, static=False)
        plain = model.describe(pv, pm, max_new_tokens=6, static=False)
        fast = model.describe(pv, pm, max_new_tokens=6, static=True)
        ref = _reference_greedy(model, pv, pm, 6)
    assert (free.ids == img).any() or (free.ids == seg).any()  # unconstrained, the head's favourites win
    assert torch.equal(plain.ids, fast.ids)
    for b, r in enumerate(ref):
        assert plain.ids[b, : len(r)].tolist() == r
        assert not banned[plain.ids[b, : plain.lengths[b]]].any()


def test_sync_free_paths_equal_the_selecting_reference():
    """The scatter-based embedding placement, the one-[SEG]-a-row lookup and the gathered LM loss (no host
    synchronisation on an accelerator) give the values and gradients of the boolean-selection forms."""
    from maskloop.model.prompts import Embeds
    from maskloop.model.region import inject_visual_tokens

    model = make_tiny()
    model.train()
    pv, gp, masks = tiny_batch(model)
    feats = model.sam_features(gp)
    expr = model.builder.expressions(["the red circle", "a small blue square", "green triangle"])
    emb_expr = model.expression_embeds(expr.ids, expr.lengths)
    visible = torch.tensor([3, 0, 2])
    e = Embeds(emb_expr.embeds.detach().clone().requires_grad_(), visible)
    qs = model.builder.seg_question(3, rng=random.Random(0))
    parts = model.builder.seg_parts(e, qs)
    assert model._one_seg_each(parts, 3)

    image = model.image_tokens(pv)
    emb, asm = model.build_inputs(parts, image)
    # reference: index_put of the selected rows, as before
    ref = model.embed_tokens(asm.input_ids)
    for i, part in asm.embeds:
        pos, valid = asm.positions[i]
        rows = torch.arange(3)[:, None].expand_as(pos)
        ref = ref.index_put((rows[valid], pos[valid]), part.embeds[valid].to(ref.dtype))
    ref = inject_visual_tokens(ref, asm.input_ids, model.builder.img_ctx_id, image)
    torch.testing.assert_close(emb, ref, rtol=0, atol=0)
    w = torch.randn_like(emb)
    g1, = torch.autograd.grad((emb * w).sum(), e.embeds, retain_graph=True)
    g2, = torch.autograd.grad((ref * w).sum(), e.embeds, retain_graph=True)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    assert g1[1].abs().sum() == 0 and g1[0, 3:].abs().sum() == 0  # unused rows / slots get no gradient

    hidden = model.run_llm(emb, asm.attention_mask, asm.position_ids)
    fast = model.decode_seg(hidden, asm.input_ids, feats, masks, one_each=True)
    slow = model.decode_seg(hidden, asm.input_ids, feats, masks)
    for k in ("mask_logits", "loss_mask", "seg_rows", "seg_counts"):
        torch.testing.assert_close(fast[k], slow[k], rtol=0, atol=0)
    sel = asm.labels != -100
    want = selected_lm_loss(model.lm_logits(hidden[sel]), asm.labels[sel])
    torch.testing.assert_close(model._lm_loss(hidden, asm), want)

    # a row with two [SEG], or ids only on the device: the host cannot tell, the general path is taken
    two = [(qs[0][0], qs[0][1], qs[0][2] + [model.builder.seg_id])] + qs[1:]
    assert not model._one_seg_each(model.builder.seg_parts(e, two), 3)
    bad = asm.input_ids.clone()
    bad[0, int(asm.attention_mask[0].argmax())] = model.builder.seg_id  # the row's first real token
    with pytest.raises(ValueError, match="exactly one"):
        model.decode_seg(hidden, bad, feats, one_each=True)

"""Which SAM2 mask a language prompt gets, against a reference written from Sa2VA's behaviour.

Sa2VA (``SAM2Base._forward_sam_heads`` with ``multimask_min_pt_num: 0`` and a zero-point language prompt)
asks for the multimask output and keeps, per prompt, ``argmax`` of the predicted IoUs of tokens 1-3, in
training and inference.  The reference below reads all four decoder tokens' masks and IoUs and picks in a
per-sample loop; the stability rule of the ``"single"`` option is written out by hand (SAM2's
``_dynamic_multimask_via_stability``: IoU of logits > 0.05 and > -0.05, threshold 0.98).
"""

import copy

import pytest
import torch
from conftest import make_tiny, tiny_batch

from maskloop.model.presets import get_preset, sam2_config
from maskloop.model.sam2_head import SAM2Head


def _heads():
    cfg = get_preset("tiny")
    cfg.sam2.dynamic_multimask = True
    torch.manual_seed(3)
    best = SAM2Head(sam2_config(cfg), True, "best_iou")
    with torch.no_grad():  # O(1) logits (transformers' 0.02 init gives ~1e-5 at these widths)
        for m in best.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.weight.normal_(0, 1 / m.weight[0].numel() ** 0.5)
            elif isinstance(m, torch.nn.Embedding):
                m.weight.normal_(0, 1)
        iou_head = best.sam.mask_decoder.iou_prediction_head.proj_out
        iou_head.weight.mul_(10)  # a prompt-dependent ranking of the tokens
        iou_head.bias[2] -= 0.8
    single = SAM2Head(sam2_config(cfg), True, "single")
    single.load_state_dict(best.state_dict())
    return cfg, best, single


def _all_tokens(head, feats, prompt):
    """Masks (B, 4, h, w) and IoUs (B, 4) of all four decoder tokens, read from the decoder's two outputs."""
    dec = head.sam.mask_decoder
    old = dec.dynamic_multimask_via_stability
    dec.dynamic_multimask_via_stability = False
    try:
        head.language_mask = "single"
        m0 = head.decode(feats, prompt)
        head.language_mask = "best_iou"
        # the multimask masks and IoUs: call the decoder as decode() does, without the selection
        B = prompt.shape[0]
        sam = head.sam
        pts = torch.zeros(B, 1, 1, 2)
        lbl = -torch.ones(B, 1, 1, dtype=torch.int32)
        sparse, dense = sam.prompt_encoder(input_points=pts, input_labels=lbl, input_boxes=None, input_masks=None)
        sparse = torch.cat([sparse, prompt[:, None]], 2)
        pos = sam.get_image_wide_positional_embeddings().repeat(B, 1, 1, 1)
        kw = dict(image_embeddings=feats.embed, image_positional_embeddings=pos, sparse_prompt_embeddings=sparse,
                  dense_prompt_embeddings=dense, high_resolution_features=list(feats.high_res))
        mm, iou_mm, _, _ = dec(multimask_output=True, **kw)
        _, iou0, _, _ = dec(multimask_output=False, **kw)
    finally:
        dec.dynamic_multimask_via_stability = old
    return torch.cat([m0[:, None], mm[:, 0]], 1), torch.cat([iou0[:, 0], iou_mm[:, 0]], 1)


def _reference(masks, ious, rule, training):
    out = []
    for m, iou in zip(masks, ious):  # one prompt at a time
        best = m[1 + int(torch.argmax(iou[1:]))]
        if rule == "best_iou":
            out.append(best)  # Sa2VA: token 0 never used
            continue
        lo, hi = (m[0] > 0.05).sum().item(), (m[0] > -0.05).sum().item()
        stable = (lo / hi if hi > 0 else 1.0) >= 0.98
        out.append(m[0] if (training or stable) else best)
    return torch.stack(out)


# follows magic-research/Sa2VA projects/llava_sam2/models/extension/sam2_base.py L247-L254 (best-IoU multimask pick),
# third_parts/sam2/sam2_configs/sam2_hiera_l.yaml L113 (multimask_min_pt_num: 0) and
# third_parts/sam2/modeling/sam2_base.py L802-L810 (_use_multimask) (commit d01bf3f); the "single" rule follows
# third_parts/sam2/modeling/sam/mask_decoder.py L251-L299 (_get_stability_scores,
# _dynamic_multimask_via_stability) (commit d01bf3f)
@pytest.mark.parametrize("confident", [True, False])
def test_language_mask_choice_matches_sa2va_reference(confident):
    cfg, best, single = _heads()
    g = torch.Generator().manual_seed(0)
    B = 6
    gp = torch.randint(0, 256, (B, 3, 128, 128), generator=g, dtype=torch.uint8)
    prompt = torch.randn(B, 1, cfg.sam2.prompt_dim, generator=g)
    for h in (best, single):
        last = h.sam.mask_decoder.output_hypernetworks_mlps[0].proj_out
        with torch.no_grad():
            if confident:  # token 0's logits far from 0: stable, SAM2 keeps it
                last.weight.mul_(1e3)
            else:  # token 0's logits all 0: stability 0, SAM2 falls back
                last.weight.zero_()
                last.bias.zero_()
    with torch.no_grad():
        feats = best.encode(gp)
        masks, ious = _all_tokens(copy.deepcopy(best), feats, prompt)
        for training in (False, True):
            best.train(training)
            single.train(training)
            got_best = best.decode(feats, prompt)
            got_single = single.decode(feats, prompt)
            torch.testing.assert_close(got_best, _reference(masks, ious, "best_iou", training), rtol=0, atol=0)
            torch.testing.assert_close(got_single, _reference(masks, ious, "single", training), rtol=0, atol=0)
            if confident or training:  # token 0 kept by "single": a different mask from Sa2VA's choice
                assert not torch.equal(got_best, got_single)
            else:  # token 0 unstable: in eval SAM2's fallback is Sa2VA's pick
                assert torch.equal(got_best, got_single)
    # the pick varies with the prompt (not one fixed token)
    assert len(set(ious[:, 1:].argmax(-1).tolist())) > 1


# follows magic-research/Sa2VA projects/llava_sam2/models/extension/sam2_base.py L247-L254 (commit d01bf3f)
def test_segment_loss_is_on_the_selected_mask():
    """Training: GroundedMLLM.segment's mask loss is computed on the best-IoU multimask token (Sa2VA)."""
    model = make_tiny(seed=1)
    model.sam.language_mask = "best_iou"
    model.train()
    pv, gp, gt = tiny_batch(model, B=2)
    feats = model.sam_features(gp)
    out = model.segment(pv, feats, model.builder.expressions(["a red circle", "a blue square"]), gt_masks=gt)
    from maskloop.model import losses as L

    c = model.cfg
    want = L.mask_losses(out["low_res"], gt, c.bce_weight, c.dice_weight)["loss_mask"]
    torch.testing.assert_close(out["loss_mask"], want)
    out["loss_mask"].backward()
    hyper = model.sam.mask_decoder.output_hypernetworks_mlps
    assert hyper[0].proj_out.weight.grad is None or hyper[0].proj_out.weight.grad.abs().sum() == 0
    assert sum(float(hyper[i].proj_out.weight.grad.abs().sum()) for i in (1, 2, 3) if hyper[i].proj_out.weight.grad is not None) > 0


def test_config_rejects_unknown_language_mask():
    from maskloop.config import ConfigError

    cfg = get_preset("sa2va-1b")
    assert cfg.sam2.language_mask == "best_iou"
    cfg.sam2.language_mask = "token0"
    with pytest.raises(ConfigError, match="language_mask"):
        cfg.validate()

"""From-scratch initialisation and the demo preset's decoder switch."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny

from maskloop.model.init import init_from_scratch
from maskloop.model.presets import get_preset, sam2_config


def _std(p: torch.Tensor) -> float:
    return float(p.detach().float().std())


def test_init_from_scratch_is_width_aware_and_keeps_lora_identity():
    model = make_tiny()
    # transformers' init: 0.02 everywhere, zero position tables, two different Fourier matrices in SAM2
    sam = model.sam.sam
    assert _std(sam.mask_decoder.output_hypernetworks_mlps[0].proj_in.weight) < 0.03
    assert not torch.equal(sam.prompt_encoder.shared_embedding.positional_embedding,
                           sam.shared_image_embedding.positional_embedding)
    torch.manual_seed(0)
    init_from_scratch(model)
    w = sam.mask_decoder.output_hypernetworks_mlps[0].proj_in.weight  # (32, 32)
    assert _std(w) == pytest.approx(1 / math.sqrt(w.shape[1]), rel=0.25)
    conv = sam.vision_encoder.backbone.patch_embed.projection.weight  # (16, 3, 7, 7): fan_in 147
    assert _std(conv) == pytest.approx(1 / math.sqrt(147), rel=0.25)
    up = sam.mask_decoder.upscale_conv1.weight  # ConvTranspose2d (32, 8, 2, 2), stride 2: fan_in 32
    assert _std(up) == pytest.approx(1 / math.sqrt(32), rel=0.25)
    assert _std(model.embed_matrix) == pytest.approx(1.0, rel=0.2)
    assert _std(sam.vision_encoder.backbone.pos_embed) > 0.1
    assert _std(model.vision.embeddings.position_embeddings) > 0.1
    assert torch.equal(sam.prompt_encoder.shared_embedding.positional_embedding,
                       sam.shared_image_embedding.positional_embedding)
    assert torch.equal(model.new_embed, model.embed_matrix[model.new_token_ids])
    assert torch.equal(model.new_head, model.head_matrix[model.new_token_ids])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert not p.any(), name  # adapters still start as the identity
        if "lora_A" in name:
            assert p.abs().sum() > 0, name
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name.lower() and name.endswith("weight"):
            assert torch.allclose(p, torch.ones_like(p)), name


def test_build_model_initialises_a_preset_from_scratch_when_asked():
    from maskloop.train.engine import TrainConfig, build_model

    def q_std(model):
        return _std(model.sam.sam.mask_decoder.transformer.layers[0].self_attn.q_proj.weight)  # (32, 32)

    assert q_std(build_model(TrainConfig.from_mapping({"model": "tiny"}))) < 0.03  # transformers' init
    model = build_model(TrainConfig.from_mapping({"model": "tiny", "scratch_init": True}))
    assert q_std(model) == pytest.approx(1 / math.sqrt(32), rel=0.25)


def test_attention_downsample_rate_switch():
    tiny, demo, pub = get_preset("tiny"), get_preset("tiny-demo"), get_preset("sa2va-1b")
    assert tiny.sam2.attention_downsample_rate == 2 and pub.sam2.attention_downsample_rate == 2  # SAM2's
    assert sam2_config(pub).mask_decoder_config.attention_downsample_rate == 2
    assert demo.sam2.attention_downsample_rate == 1 and demo.sam2.prompt_dim == 64
    assert sam2_config(demo).mask_decoder_config.attention_downsample_rate == 1
    m2 = make_tiny()
    cfg = get_preset("tiny")
    cfg.sam2.attention_downsample_rate = 1
    from conftest import WORDS

    from maskloop.model.grounded import GroundedMLLM
    from maskloop.model.prompts import build_word_tokenizer

    m1 = GroundedMLLM(cfg, build_word_tokenizer(WORDS))
    C = cfg.sam2.prompt_dim
    assert m2.sam.sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.q_proj.out_features == C // 2
    assert m1.sam.sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.q_proj.out_features == C


def test_recency_prior_adds_strength_times_cos_distance_to_the_attention_logits():
    """Reference: for a zero input (q, k = their biases), q.k/sqrt(d) after transformers' own RoPE must equal
    strength * cos(theta_j * (m - n)) -- checks the rotary pair layout the prior relies on."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from maskloop.model.init import init_recency_prior

    model = make_tiny()
    with pytest.raises(ValueError, match="rotary pairs"):
        init_recency_prior(model, 30.0, freq_index=99)
    init_recency_prior(model, 30.0, freq_index=2, kv_groups=1)
    cfg = model.cfg.llm
    d = cfg.hidden_size // cfg.num_heads
    theta = cfg.rope_theta ** (-2 * 2 / d)
    L = 12
    pos = torch.arange(L)[None]
    x = torch.zeros(1, L, cfg.hidden_size)
    cos, sin = model.llm.rotary_emb(x, pos)
    dist = (pos[0][:, None] - pos[0][None]).float()
    for layer in model.llm.layers:
        at = layer.self_attn
        with torch.no_grad():
            q = at.q_proj.bias.expand(1, L, -1).view(1, L, -1, d).transpose(1, 2)  # zero input: bias only
            k = at.k_proj.bias.expand(1, L, -1).view(1, L, -1, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        groups = q.shape[1] // k.shape[1]
        for h in range(q.shape[1]):
            logits = q[0, h] @ k[0, h // groups].T / math.sqrt(d)
            want = 30.0 * torch.cos(theta * dist) if h // groups == 0 else torch.zeros(L, L)
            torch.testing.assert_close(logits, want, atol=1e-3, rtol=1e-4)


def test_recency_prior_is_content_free_at_init_unless_asked():
    """content_free (default): the prior's heads score any input by the prior alone -- q.k/sqrt(d) after RoPE
    equals strength * cos(theta_j * (m - n)) for random hidden states; the other group keeps its random
    content logits, and so does every head with content_free=False."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from maskloop.model.init import init_from_scratch, init_recency_prior

    cfg = make_tiny().cfg.llm
    d = cfg.hidden_size // cfg.num_heads
    theta = cfg.rope_theta ** (-2 * 2 / d)
    L = 10
    pos = torch.arange(L)[None]
    dist = (pos[0][:, None] - pos[0][None]).float()
    x = torch.randn(1, L, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    for content_free in (True, False):
        torch.manual_seed(0)
        model = make_tiny()
        init_from_scratch(model)
        init_recency_prior(model, 8.0, kv_groups=1, content_free=content_free)
        cos, sin = model.llm.rotary_emb(x, pos)
        for layer in model.llm.layers:
            at = layer.self_attn
            with torch.no_grad():
                q = at.q_proj(x).view(1, L, -1, d).transpose(1, 2)
                k = at.k_proj(x).view(1, L, -1, d).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
            groups = q.shape[1] // k.shape[1]
            for h in range(q.shape[1]):
                logits = q[0, h] @ k[0, h // groups].T / math.sqrt(d)
                prior_only = torch.allclose(logits, 8.0 * torch.cos(theta * dist), atol=1e-4)
                assert prior_only == (content_free and h // groups == 0), (content_free, h)


def test_train_config_recency_init_needs_scratch_init_and_reaches_the_model():
    from maskloop.config import ConfigError
    from maskloop.train.engine import TrainConfig, build_model

    with pytest.raises(ConfigError, match="scratch_init"):
        TrainConfig.from_mapping({"model": "tiny", "recency_init": 30.0})
    with pytest.raises(ConfigError, match="recency_init"):
        TrainConfig.from_mapping({"model": "tiny", "scratch_init": True, "recency_init": -1.0})
    model = build_model(TrainConfig.from_mapping({"model": "tiny", "scratch_init": True, "recency_init": 8.0}))
    d = model.cfg.llm.hidden_size // model.cfg.llm.num_heads
    for layer in model.llm.layers:
        b = layer.self_attn.q_proj.bias.detach()
        assert b[2] ** 2 / math.sqrt(d) == pytest.approx(8.0)  # scratch init zeroes biases; the prior sets these
        assert b.abs().gt(0).sum() == model.cfg.llm.num_heads  # default: every head


def test_zero_seg_embed_needs_scratch_init_and_zeroes_only_the_seg_row():
    from maskloop.config import ConfigError
    from maskloop.train.engine import TrainConfig, build_model

    with pytest.raises(ConfigError, match="scratch_init"):
        TrainConfig.from_mapping({"model": "tiny", "zero_seg_embed": True})
    ref = build_model(TrainConfig.from_mapping({"model": "tiny", "scratch_init": True}))
    model = build_model(TrainConfig.from_mapping({"model": "tiny", "scratch_init": True, "zero_seg_embed": True}))
    seg = model.builder.seg_id
    ids = model.new_token_ids.tolist()
    assert seg in ids
    for i, tok in enumerate(ids):
        row = model.new_embed.detach()[i]
        assert (row.abs().sum() == 0) == (tok == seg)
    assert ref.new_embed.detach()[ids.index(seg)].abs().sum() > 0  # not zero without the option
    out = model.embed_tokens(torch.tensor([[seg, ids[0] if ids[0] != seg else ids[1]]]))
    assert out[0, 0].abs().sum() == 0 and out[0, 1].abs().sum() > 0
    assert model.new_head.detach()[ids.index(seg)].abs().sum() > 0  # the lm_head row ([SEG]'s logit) is kept

"""Published-checkpoint loading on a synthetic state dict with the real Sa2VA key names (1B key set)."""

import copy

import pytest
import torch
from conftest import WORDS

from maskloop.model import checkpoints as C
from maskloop.model.grounded import GroundedMLLM
from maskloop.model.presets import get_preset
from maskloop.model.prompts import build_word_tokenizer

S = "grounding_encoder.sam2_model."


def sa2va_1b_reduced():
    """The sa2va-1b preset's widths with reduced depth and vocabulary."""
    cfg = get_preset("sa2va-1b")
    cfg.vision.num_layers = 1
    cfg.llm.num_layers = 1
    cfg.llm.vocab_size = 2048
    cfg.sam2.hiera_stages = (1, 1, 2, 1)
    cfg.sam2.hiera_global_attention_blocks = (3,)
    cfg.lora.r, cfg.lora.alpha = 4, 8
    return cfg


def published_state(cfg, seed=0):
    """A state dict written from the released architecture's names and shapes, independent of our key map."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def t(name, *shape):
        sd[name] = torch.randn(*shape, generator=g) * 0.02

    v, lm, s = cfg.vision, cfg.llm, cfg.sam2
    Dv, D, V = v.hidden_size, lm.hidden_size, cfg.llm.vocab_size
    n_patch = (v.image_size // v.patch_size) ** 2
    t("vision_model.embeddings.class_embedding", 1, 1, Dv)
    t("vision_model.embeddings.patch_embedding.weight", Dv, 3, v.patch_size, v.patch_size)
    t("vision_model.embeddings.patch_embedding.bias", Dv)
    t("vision_model.embeddings.position_embedding", 1, n_patch + 1, Dv)
    for i in range(v.num_layers):
        p = f"vision_model.encoder.layers.{i}."
        t(p + "attn.qkv.weight", 3 * Dv, Dv), t(p + "attn.qkv.bias", 3 * Dv)
        t(p + "attn.proj.weight", Dv, Dv), t(p + "attn.proj.bias", Dv)
        t(p + "ls1", Dv), t(p + "ls2", Dv)
        for n in ("norm1", "norm2"):
            t(p + n + ".weight", Dv), t(p + n + ".bias", Dv)
        t(p + "mlp.fc1.weight", v.intermediate_size, Dv), t(p + "mlp.fc1.bias", v.intermediate_size)
        t(p + "mlp.fc2.weight", Dv, v.intermediate_size), t(p + "mlp.fc2.bias", Dv)
    t("mlp1.0.weight", 4 * Dv), t("mlp1.0.bias", 4 * Dv)
    t("mlp1.1.weight", D, 4 * Dv), t("mlp1.1.bias", D)
    t("mlp1.3.weight", D, D), t("mlp1.3.bias", D)
    kv = D // lm.num_heads * lm.num_kv_heads
    t("language_model.model.embed_tokens.weight", V, D)
    for i in range(lm.num_layers):
        p = f"language_model.model.layers.{i}."
        t(p + "self_attn.q_proj.weight", D, D), t(p + "self_attn.q_proj.bias", D)
        t(p + "self_attn.k_proj.weight", kv, D), t(p + "self_attn.k_proj.bias", kv)
        t(p + "self_attn.v_proj.weight", kv, D), t(p + "self_attn.v_proj.bias", kv)
        t(p + "self_attn.o_proj.weight", D, D)
        t(p + "mlp.gate_proj.weight", lm.intermediate_size, D), t(p + "mlp.up_proj.weight", lm.intermediate_size, D)
        t(p + "mlp.down_proj.weight", D, lm.intermediate_size)
        t(p + "input_layernorm.weight", D), t(p + "post_attention_layernorm.weight", D)
    t("language_model.model.norm.weight", D)
    t("language_model.lm_head.weight", V, D)
    C_ = s.prompt_dim
    t("text_hidden_fcs.0.weight", D, D), t("text_hidden_fcs.0.bias", D)
    t("text_hidden_fcs.2.weight", C_, D), t("text_hidden_fcs.2.bias", C_)
    # SAM2 (original module names), Hiera trunk
    e = s.hiera_embed_dim
    t(S + "image_encoder.trunk.patch_embed.proj.weight", e, 3, 7, 7), t(S + "image_encoder.trunk.patch_embed.proj.bias", e)
    t(S + "image_encoder.trunk.pos_embed", 1, e, *s.hiera_window_pos_bkg)
    t(S + "image_encoder.trunk.pos_embed_window", 1, e, s.hiera_window_sizes[0], s.hiera_window_sizes[0])
    blk, dim = 0, e
    for stage, n in enumerate(s.hiera_stages):
        out = e * 2**stage
        for _ in range(n):
            p = f"{S}image_encoder.trunk.blocks.{blk}."
            t(p + "norm1.weight", dim), t(p + "norm1.bias", dim)
            if dim != out:
                t(p + "proj.weight", out, dim), t(p + "proj.bias", out)
            t(p + "attn.qkv.weight", 3 * out, dim), t(p + "attn.qkv.bias", 3 * out)
            t(p + "attn.proj.weight", out, out), t(p + "attn.proj.bias", out)
            t(p + "norm2.weight", out), t(p + "norm2.bias", out)
            t(p + "mlp.layers.0.weight", 4 * out, out), t(p + "mlp.layers.0.bias", 4 * out)
            t(p + "mlp.layers.1.weight", out, 4 * out), t(p + "mlp.layers.1.bias", out)
            blk, dim = blk + 1, out
    for i, ch in enumerate(reversed([e * 2**k for k in range(len(s.hiera_stages))])):
        t(f"{S}image_encoder.neck.convs.{i}.conv.weight", C_, ch, 1, 1), t(f"{S}image_encoder.neck.convs.{i}.conv.bias", C_)
    pe = S + "sam_prompt_encoder."
    t(pe + "pe_layer.positional_encoding_gaussian_matrix", 2, C_ // 2)
    for i in range(4):
        t(pe + f"point_embeddings.{i}.weight", 1, C_)
    t(pe + "not_a_point_embed.weight", 1, C_), t(pe + "no_mask_embed.weight", 1, C_)
    for i, shape in {0: (4, 1, 2, 2), 1: (4,), 3: (16, 4, 2, 2), 4: (16,), 6: (C_, 16, 1, 1)}.items():
        t(pe + f"mask_downscaling.{i}.weight", *shape), t(pe + f"mask_downscaling.{i}.bias", shape[0])
    d = S + "sam_mask_decoder."
    for i in range(s.decoder_layers):
        p = d + f"transformer.layers.{i}."
        for att, inner in (("self_attn", C_), ("cross_attn_token_to_image", C_ // 2), ("cross_attn_image_to_token", C_ // 2)):
            for pr in ("q_proj", "k_proj", "v_proj"):
                t(p + f"{att}.{pr}.weight", inner, C_), t(p + f"{att}.{pr}.bias", inner)
            t(p + f"{att}.out_proj.weight", C_, inner), t(p + f"{att}.out_proj.bias", C_)
        for k in range(1, 5):
            t(p + f"norm{k}.weight", C_), t(p + f"norm{k}.bias", C_)
        t(p + "mlp.layers.0.weight", s.decoder_mlp_dim, C_), t(p + "mlp.layers.0.bias", s.decoder_mlp_dim)
        t(p + "mlp.layers.1.weight", C_, s.decoder_mlp_dim), t(p + "mlp.layers.1.bias", C_)
    for pr in ("q_proj", "k_proj", "v_proj"):
        t(d + f"transformer.final_attn_token_to_image.{pr}.weight", C_ // 2, C_)
        t(d + f"transformer.final_attn_token_to_image.{pr}.bias", C_ // 2)
    t(d + "transformer.final_attn_token_to_image.out_proj.weight", C_, C_ // 2)
    t(d + "transformer.final_attn_token_to_image.out_proj.bias", C_)
    t(d + "transformer.norm_final_attn.weight", C_), t(d + "transformer.norm_final_attn.bias", C_)
    t(d + "iou_token.weight", 1, C_), t(d + "mask_tokens.weight", 4, C_), t(d + "obj_score_token.weight", 1, C_)
    t(d + "output_upscaling.0.weight", C_, C_ // 4, 2, 2), t(d + "output_upscaling.0.bias", C_ // 4)
    t(d + "output_upscaling.1.weight", C_ // 4), t(d + "output_upscaling.1.bias", C_ // 4)
    t(d + "output_upscaling.3.weight", C_ // 4, C_ // 8, 2, 2), t(d + "output_upscaling.3.bias", C_ // 8)
    t(d + "conv_s0.weight", C_ // 8, C_, 1, 1), t(d + "conv_s0.bias", C_ // 8)
    t(d + "conv_s1.weight", C_ // 4, C_, 1, 1), t(d + "conv_s1.bias", C_ // 4)
    for i in range(4):
        for k, (o, n) in enumerate(((C_, C_), (C_, C_), (C_ // 8, C_))):
            t(d + f"output_hypernetworks_mlps.{i}.layers.{k}.weight", o, n), t(d + f"output_hypernetworks_mlps.{i}.layers.{k}.bias", o)
    for head, last in (("iou_prediction_head", 4), ("pred_obj_score_head", 1)):
        for k, o in enumerate((C_, C_, last)):
            t(d + f"{head}.layers.{k}.weight", o, C_), t(d + f"{head}.layers.{k}.bias", o)
    t(S + "no_mem_embed", 1, 1, C_)
    # video-memory modules: unused for images, kept aside and written back
    t(S + "no_mem_pos_enc", 1, 1, C_)
    t(S + "maskmem_tpos_enc", 7, 1, 1, 64)
    t(S + "memory_attention.layers.0.self_attn.q_proj.weight", C_, C_)
    t(S + "obj_ptr_proj.layers.0.weight", C_, C_)
    return sd


@pytest.fixture(scope="module")
def one_b():
    cfg = sa2va_1b_reduced()
    tok = build_word_tokenizer(WORDS)
    torch.manual_seed(0)
    model = GroundedMLLM(copy.deepcopy(cfg), tok)
    return cfg, model, published_state(model.cfg)


def _outputs(model, seed=0):
    model.eval()
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    pv = torch.randn(1, 3, c.vision.image_size, c.vision.image_size, generator=g)
    gp = torch.randint(0, 256, (1, 3, c.sam2.image_size, c.sam2.image_size), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        out = model.segment(pv, model.sam_features(gp), model.builder.expressions(["the red circle"]))
        pm = torch.zeros(1, c.prompt_grid, c.prompt_grid)
        pm[0, 3:6, 4:9] = 1
        cap = model.caption_logits(pv, pm, model.builder.caption_answer(["a small red circle"]))
    return out["mask_logits"], cap["logits"]


def test_published_roundtrip_1b_keyset(one_b, tmp_path):
    cfg, model, sd = one_b
    extra = C.load_published_state(model, sd)
    assert set(extra) == {k for k in sd if k.split(S)[-1].startswith(("no_mem_pos", "maskmem", "memory_att", "obj_ptr"))}
    exported = C.export_state(model)
    assert set(exported) == set(sd)
    for k in sd:
        assert torch.equal(exported[k], sd[k]), k
    # export -> save -> load into a fresh model -> identical outputs
    folder = C.save_published(model, tmp_path / "ckpt", max_shard_bytes=20 << 20)
    assert (folder / "model.safetensors.index.json").exists()
    torch.manual_seed(123)
    fresh = GroundedMLLM(copy.deepcopy(cfg), build_word_tokenizer(WORDS))
    C.load_published_state(fresh, C.read_state_file(folder))
    for a, b in zip(_outputs(model), _outputs(fresh)):
        assert torch.equal(a, b)


def test_training_pth_with_prefix_and_lora_merges(one_b, tmp_path):
    cfg, model, sd = one_b
    g = torch.Generator().manual_seed(1)
    train_sd = {}
    lora_mods = set()
    for k, v in sd.items():
        if k.startswith(("vision_model.", "mlp1.", "language_model.")):
            nk = "mllm.model." + k.replace("language_model.", "language_model.base_model.model.")
            if k.startswith("language_model.model.layers.") and k.endswith("q_proj.weight"):
                mod = nk[: -len(".weight")]
                train_sd[mod + ".base_layer.weight"] = v
                train_sd[mod + ".lora_A.default.weight"] = torch.randn(4, v.shape[1], generator=g)
                train_sd[mod + ".lora_B.default.weight"] = torch.randn(v.shape[0], 4, generator=g)
                lora_mods.add((k, mod))
                continue
            train_sd[nk] = v
        else:
            train_sd[k] = v
    path = tmp_path / "iter_500.pth"
    torch.save({"state_dict": train_sd}, path)
    C.load_published_state(model, C.read_state_file(path), lora_scale=2.0)
    exported = C.export_state(model)
    for k, mod in lora_mods:
        want = sd[k] + 2.0 * train_sd[mod + ".lora_B.default.weight"] @ train_sd[mod + ".lora_A.default.weight"]
        torch.testing.assert_close(exported[k], want)


def test_clear_errors_for_unknown_missing_and_wrong_shape(one_b):
    _, model, sd = one_b
    bad = dict(sd)
    bad["vision_model.encoder.layers.0.attn.mystery.weight"] = torch.zeros(3)
    with pytest.raises(C.CheckpointError, match=r"unknown keys[\s\S]*mystery"):
        C.load_published_state(model, bad)
    bad = dict(sd)
    bad["mlp1.1.weight"] = torch.zeros(7, 7)
    with pytest.raises(C.CheckpointError, match=r"wrong shape[\s\S]*linear_1.weight: checkpoint \(7, 7\)"):
        C.load_published_state(model, bad)
    bad = dict(sd)
    del bad["text_hidden_fcs.2.bias"]
    with pytest.raises(C.CheckpointError, match=r"missing[\s\S]*text_hidden_fcs.2.bias"):
        C.load_published_state(model, bad)
    with pytest.raises(C.CheckpointError, match="not found"):
        C.read_state_file("/nonexistent/ckpt")


def test_load_pretrained_from_exported_folder(tmp_path):
    from conftest import make_tiny

    model = make_tiny(seed=4)
    folder = C.save_published(model, tmp_path / "tiny")
    loaded = C.load_pretrained(folder)
    a = C.export_state(model)
    b = C.export_state(loaded)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

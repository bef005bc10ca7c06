"""Model presets and the translation of our config into transformers' configs.

* ``tiny``      — a few M parameters on 64x64 tiles (8x8 token grid) and 128x128 SAM inputs; tests.
* ``tiny-demo`` — ``tiny`` with 4x4 image tokens, a 64-wide SAM2 mask decoder (cross-attention not
  narrowed) and the phrase-repeating referring answer; the demo.
* ``sa2va-1b``  — InternViT-300M + Qwen2.5-0.5B (InternVL2.5-1B) + SAM2 Hiera-L, the published shapes.
* ``sa2va-4b``  — InternViT-300M + Qwen2.5-3B (InternVL2.5-4B) + SAM2 Hiera-L, the published shapes.
* ``sa2va-8b``  — InternViT-300M + InternLM2.5-7B (InternVL2.5-8B) + SAM2 Hiera-L, on Llama classes.
* ``sa2va-26b`` — InternViT-6B (qk-norm, RMSNorm, no qkv bias) + InternLM2.5-20B (InternVL2.5-26B) + SAM2.

Published presets are shapes only (random init); real weights come from a checkpoint folder.
"""

from __future__ import annotations

import copy

from maskloop.config import ConfigError, LLMConfig, LoRAConfig, ModelConfig, SAM2Config, VisionConfig

_VIT_300M = VisionConfig()  # InternViT-300M-448px: 1024 wide, 24 layers, 16 heads, MLP 4096
_SAM2_HIERA_L = SAM2Config()

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny",
        vision=VisionConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=64, patch_size=4),
        llm=LLMConfig(
            vocab_size=512,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            max_position_embeddings=1024,
            rope_theta=10_000.0,
        ),
        sam2=SAM2Config(
            image_size=128,
            hiera_embed_dim=16,
            hiera_num_heads=1,
            hiera_stages=(1, 1, 2, 1),
            hiera_global_attention_blocks=(3,),
            hiera_window_sizes=(8, 4, 4, 2),
            hiera_window_pos_bkg=(4, 4),
            prompt_dim=32,
            decoder_layers=2,
            decoder_mlp_dim=64,
            decoder_heads=2,
            # trained from scratch: the IoU head gets no gradient, so it cannot rank multimask tokens
            language_mask="single",
            dynamic_multimask=False,
        ),
        lora=LoRAConfig(r=8, alpha=16, dropout=0.0),
    ),
    "sa2va-1b": ModelConfig(
        name="sa2va-1b",
        template="qwen_chat",
        vision=copy.deepcopy(_VIT_300M),
        llm=LLMConfig(
            vocab_size=151_680,
            hidden_size=896,
            num_layers=24,
            num_heads=14,
            num_kv_heads=2,
            intermediate_size=4864,
            tie_word_embeddings=False,
        ),
        sam2=copy.deepcopy(_SAM2_HIERA_L),
    ),
    "sa2va-4b": ModelConfig(
        name="sa2va-4b",
        template="phi3_chat",
        vision=copy.deepcopy(_VIT_300M),
        llm=LLMConfig(
            vocab_size=151_680,
            hidden_size=2048,
            num_layers=36,
            num_heads=16,
            num_kv_heads=2,
            intermediate_size=11008,
            tie_word_embeddings=False,
        ),
        sam2=copy.deepcopy(_SAM2_HIERA_L),
    ),
    "sa2va-8b": ModelConfig(
        name="sa2va-8b",
        template="internlm2_chat",
        vision=copy.deepcopy(_VIT_300M),
        llm=LLMConfig(  # internlm2_5-7b-chat
            architecture="InternLM2ForCausalLM",
            vocab_size=92_553,
            hidden_size=4096,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            intermediate_size=14336,
            rms_norm_eps=1e-5,
            rope_scaling={"type": "dynamic", "factor": 2.0},
        ),
        sam2=copy.deepcopy(_SAM2_HIERA_L),
    ),
    "sa2va-26b": ModelConfig(
        name="sa2va-26b",
        template="internlm2_chat",
        vision=VisionConfig(  # InternViT-6B-448px-V2_5
            hidden_size=3200, num_layers=45, num_heads=25, intermediate_size=12800,
            qkv_bias=False, qk_norm=True, norm_type="rms_norm",
        ),
        llm=LLMConfig(  # internlm2_5-20b-chat
            architecture="InternLM2ForCausalLM",
            vocab_size=92_553,
            hidden_size=6144,
            num_layers=48,
            num_heads=48,
            num_kv_heads=8,
            intermediate_size=16384,
            rms_norm_eps=1e-5,
        ),
        sam2=copy.deepcopy(_SAM2_HIERA_L),
    ),
}
# the embedded demo's model: ``tiny`` with a wider SAM2 mask decoder (64 wide: eight hypernetwork channels
# instead of four) whose cross-attention is not narrowed.  Trained from scratch (maskloop.model.init), the
# 32-wide decoder learns objectness but, within the demo's step budget, not which object the prompt means.
_demo = copy.deepcopy(PRESETS["tiny"])
_demo.name = "tiny-demo"
_demo.sam2.prompt_dim = 64
_demo.sam2.decoder_mlp_dim = 128
_demo.sam2.attention_downsample_rate = 1
# 4x4 image tokens (patch 8): fewer positions for the LLM to route past, 1.6x faster SFT steps than 8x8
_demo.vision.patch_size = 8
# "Sure, <p>{expr}</p> [SEG].": the expression right before [SEG], so that with the recency prior of the
# demo's init (maskloop.model.init.init_recency_prior) SAM2's prompt depends on the expression from step 0
_demo.seg_answer = "phrase"
PRESETS["tiny-demo"] = _demo
# presets small enough to train from scratch on a CPU, with the shapes-world word tokenizer
FROM_SCRATCH_PRESETS = ("tiny", "tiny-demo")


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name]).validate()


# ----------------------------------------------------------------------------------------------
# transformers configs


def internvl_config(cfg: ModelConfig, image_token_id: int):
    """An ``InternVLConfig`` (vision tower + mlp1 projector + the family's text model) for ``cfg``."""
    from transformers import InternVLConfig, InternVLVisionConfig

    from maskloop.model.families import family
    from maskloop.model.families.llama import fix_rope

    v, t = cfg.vision, cfg.llm
    vision = InternVLVisionConfig(
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size,
        attention_bias=v.qkv_bias,
        use_qk_norm=v.qk_norm,
        norm_type=v.norm_type,
        layer_scale_init_value=v.layer_scale_init,
        layer_norm_eps=v.layer_norm_eps,
        image_size=[v.image_size, v.image_size],
        patch_size=[v.patch_size, v.patch_size],
        use_mean_pooling=True,  # no final norm: InternViT's last hidden state goes to mlp1 as is
    )
    # the text model of the checkpoint's LLM family (Qwen2, or Llama for Llama / InternLM2)
    text = fix_rope(family(t.architecture).text_config(t), t)
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        downsample_ratio=v.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    config.tie_word_embeddings = t.tie_word_embeddings
    return config


def sam2_config(cfg: ModelConfig):
    """A ``Sam2Config`` with Hiera sizes, FPN and mask decoder widths from ``cfg.sam2``."""
    from transformers import Sam2Config

    s = cfg.sam2
    n_stages = len(s.hiera_stages)
    dims = [s.hiera_embed_dim * 2**i for i in range(n_stages)]
    heads = [s.hiera_num_heads * 2**i for i in range(n_stages)]
    strides = [4 * 2**i for i in range(n_stages)]
    feature_sizes = [[s.image_size // st, s.image_size // st] for st in strides[:3]]
    backbone = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": s.hiera_embed_dim,
        "num_attention_heads": s.hiera_num_heads,
        "image_size": [s.image_size, s.image_size],
        "blocks_per_stage": list(s.hiera_stages),
        "embed_dim_per_stage": dims,
        "num_attention_heads_per_stage": heads,
        "window_size_per_stage": list(s.hiera_window_sizes),
        "global_attention_blocks": list(s.hiera_global_attention_blocks),
        "window_positional_embedding_background_size": list(s.hiera_window_pos_bkg),
    }
    vision = {
        "backbone_config": backbone,
        "backbone_channel_list": list(reversed(dims)),
        "backbone_feature_sizes": feature_sizes,
        "fpn_hidden_size": s.prompt_dim,
    }
    prompt = {"hidden_size": s.prompt_dim, "image_size": s.image_size, "patch_size": 16}
    decoder = {
        "hidden_size": s.prompt_dim,
        "num_hidden_layers": s.decoder_layers,
        "num_attention_heads": s.decoder_heads,
        "mlp_dim": s.decoder_mlp_dim,
        "iou_head_hidden_dim": s.prompt_dim,
        "attention_downsample_rate": s.attention_downsample_rate,
        "dynamic_multimask_via_stability": s.dynamic_multimask,
    }
    return Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)

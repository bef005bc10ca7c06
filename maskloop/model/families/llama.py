"""Llama: transformers' own class; published names are standard.  Also the rope settings shared by all."""

from __future__ import annotations

ARCHITECTURE = "LlamaForCausalLM"
ROPE_TYPES = ("default", "linear", "dynamic")  # those Sa2VA's LLMs use (InternLM2: linear / dynamic)


def to_standard(sd: dict, llm) -> dict:
    return sd


def from_standard(sd: dict, llm) -> dict:
    return sd


def rope_kwargs(t) -> dict:
    """rope_theta + rope_scaling in both spellings (transformers 5 reads ``rope_parameters``)."""
    params = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope_scaling:
        kind = t.rope_scaling.get("rope_type", t.rope_scaling.get("type"))
        params.update({k: v for k, v in t.rope_scaling.items() if k != "type"})
        params["rope_type"] = kind
    return {"rope_theta": t.rope_theta, "rope_parameters": params}


def fix_rope(config, t):
    """Make sure the built config carries ``rope_parameters`` as asked (older/newer constructors differ)."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict):
        rp.update(rope_kwargs(t)["rope_parameters"])
    return config


def shape_kwargs(t) -> dict:
    """The decoder-shape fields every family's transformers config takes, from our ``LLMConfig``, + rope."""
    return dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                intermediate_size=t.intermediate_size, max_position_embeddings=t.max_position_embeddings,
                rms_norm_eps=t.rms_norm_eps, tie_word_embeddings=t.tie_word_embeddings, **rope_kwargs(t))


def text_config(t, attention_bias: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(**shape_kwargs(t), attention_bias=attention_bias or t.attention_bias, mlp_bias=False,
                       hidden_act="silu")

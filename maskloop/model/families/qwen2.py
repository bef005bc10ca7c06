"""Qwen2 (Sa2VA-1B/4B, InternVL3-based Sa2VA): transformers' own class; published names are standard."""

from __future__ import annotations

ARCHITECTURE = "Qwen2ForCausalLM"


def to_standard(sd: dict, llm) -> dict:
    return sd


def from_standard(sd: dict, llm) -> dict:
    return sd


def text_config(t):
    """A transformers ``Qwen2Config`` from our :class:`~maskloop.config.LLMConfig`."""
    from transformers import Qwen2Config

    from maskloop.model.families.llama import rope_kwargs

    return Qwen2Config(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        tie_word_embeddings=t.tie_word_embeddings,
        use_sliding_window=False,
        **rope_kwargs(t),
    )

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

    from maskloop.model.families.llama import shape_kwargs

    return Qwen2Config(**shape_kwargs(t), use_sliding_window=False)

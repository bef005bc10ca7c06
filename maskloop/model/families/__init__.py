"""LLM families of published Sa2VA checkpoints, chosen by ``llm_config.architectures`` (never guessed).

Each family module maps its published ``language_model.*`` keys onto the transformers-standard names
(``language_model.model.layers.{i}.self_attn.q_proj.weight`` ...) that :mod:`maskloop.model.checkpoints`
maps onto our modules, and back on export, and builds the transformers text config our model runs on:

* ``Qwen2ForCausalLM``  (Sa2VA-1B/4B, the InternVL3-based ones): transformers' Qwen2, names unchanged;
* ``LlamaForCausalLM``  (Sa2VA's config accepts it; no published Sa2VA uses it): transformers' Llama;
* ``InternLM2ForCausalLM`` (Sa2VA-8B/26B): no transformers class of its own -- mapped onto Llama
  (:mod:`maskloop.model.families.internlm2`).
"""

from __future__ import annotations

from types import ModuleType

from maskloop.model.families import internlm2, llama, qwen2

FAMILIES: dict[str, ModuleType] = {m.ARCHITECTURE: m for m in (qwen2, llama, internlm2)}
# what Sa2VA's own config accepts but we do not run, and why
UNSUPPORTED = {
    "Phi3ForCausalLM": "Sa2VA's remote code accepts it but no published Sa2VA checkpoint uses it (Sa2VA-4B names "
    "the phi3_chat template on a Qwen2 LLM)",
}


class UnsupportedArchitecture(ValueError):
    pass


def family(architecture: str | None) -> ModuleType:
    """The family module for an ``llm_config.architectures[0]``; anything else: one error naming it."""
    if architecture in FAMILIES:
        return FAMILIES[architecture]
    why = UNSUPPORTED.get(architecture or "", "")
    raise UnsupportedArchitecture(
        f"LLM architecture {architecture!r} (llm_config.architectures) is not supported"
        + (f" ({why})" if why else "")
        + f"; supported: {', '.join(sorted(FAMILIES))}. Qwen2.5-VL / Qwen3-VL based Sa2VA checkpoints "
        "(a Qwen-VL vision tower instead of InternViT) are not supported either."
    )


__all__ = ["FAMILIES", "UnsupportedArchitecture", "family"]

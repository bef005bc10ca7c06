"""InternLM2 (Sa2VA-8B: InternLM2.5-7B, Sa2VA-26B: InternLM2.5-20B) on transformers' Llama classes.

Published names (InternLM2's remote code, under ``language_model.``) -> Llama names:

    model.tok_embeddings           -> model.embed_tokens
    layers.i.attention_norm        -> layers.i.input_layernorm
    layers.i.ffn_norm              -> layers.i.post_attention_layernorm
    layers.i.attention.wqkv        -> layers.i.self_attn.{q,k,v}_proj  (split, grouped layout below)
    layers.i.attention.wo          -> layers.i.self_attn.o_proj
    layers.i.feed_forward.w1/w3/w2 -> layers.i.mlp.gate_proj / up_proj / down_proj  (w2(silu(w1 x) * w3 x))
    output                         -> lm_head

``wqkv``'s rows are grouped per key/value head: InternLM2 reshapes its output as ``(kv_heads, groups + 2,
head_dim)`` with ``groups = heads / kv_heads``: rows ``[:groups]`` of each group are its query heads, row
``-2`` the key head, row ``-1`` the value head.  Query head ``h * groups + g`` reads key/value head ``h``,
which is Llama's grouped-query order, so the split q/k/v run unchanged in ``LlamaAttention``.  RoPE is the
same rotate-half form with ``rope_theta``; ``rope_scaling`` ``linear`` / ``dynamic`` map to transformers'.
"""

from __future__ import annotations

import re

import torch

ARCHITECTURE = "InternLM2ForCausalLM"

_P = "language_model."
# (InternLM2 published, Llama standard) after "language_model."; {i} is a layer index, {p} weight or bias
_RENAMES = [
    ("model.tok_embeddings.weight", "model.embed_tokens.weight"),
    ("output.weight", "lm_head.weight"),
    ("model.layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("model.layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("model.layers.{i}.attention.wo.{p}", "model.layers.{i}.self_attn.o_proj.{p}"),
    ("model.layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("model.layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("model.layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
]
_WQKV = re.compile(r"model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)")
_QKV = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def _regex(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)"))


_TO_STD = [(_regex(a), b) for a, b in _RENAMES]
_FROM_STD = [(_regex(b), a) for a, b in _RENAMES]


def _rename(key: str, rules) -> str | None:
    for pattern, target in rules:
        m = pattern.fullmatch(key)
        if m:
            return target.format(**m.groupdict())
    return None


def split_wqkv(w: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """wqkv weight ((heads + 2 kv_heads) * d, ...) or bias -> q (heads * d, ...), k, v (kv_heads * d, ...)."""
    groups = heads // kv_heads
    d = w.shape[0] // (heads + 2 * kv_heads)
    rest = w.shape[1:]
    g = w.reshape(kv_heads, groups + 2, d, *rest)  # per kv head: its `groups` query heads, then k, then v
    q = g[:, :groups].reshape(heads * d, *rest)
    k = g[:, -2].reshape(kv_heads * d, *rest)
    v = g[:, -1].reshape(kv_heads * d, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    groups = heads // kv_heads
    d = q.shape[0] // heads
    rest = q.shape[1:]
    parts = [q.reshape(kv_heads, groups, d, *rest), k.reshape(kv_heads, 1, d, *rest), v.reshape(kv_heads, 1, d, *rest)]
    return torch.cat(parts, 1).reshape((heads + 2 * kv_heads) * d, *rest)


def to_standard(sd: dict, llm) -> dict:
    """Published InternLM2 ``language_model.*`` keys -> Llama-standard ones; other keys unchanged."""
    out = {}
    for key, value in sd.items():
        if not key.startswith(_P):
            out[key] = value
            continue
        rest = key[len(_P):]
        m = _WQKV.fullmatch(rest)
        if m:
            for name, part in zip("qkv", split_wqkv(value, llm.num_heads, llm.num_kv_heads)):
                out[f"{_P}model.layers.{m.group(1)}.self_attn.{name}_proj.{m.group(2)}"] = part
            continue
        new = _rename(rest, _TO_STD)
        out[_P + new if new is not None else key] = value  # unknown names stay: reported as unknown later
    return out


def from_standard(sd: dict, llm) -> dict:
    """The inverse of :func:`to_standard` (export in InternLM2's published names)."""
    out, qkv = {}, {}
    for key, value in sd.items():
        if not key.startswith(_P):
            out[key] = value
            continue
        rest = key[len(_P):]
        m = _QKV.fullmatch(rest)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        new = _rename(rest, _FROM_STD)
        out[_P + new if new is not None else key] = value
    for (layer, kind), p in qkv.items():
        out[f"{_P}model.layers.{layer}.attention.wqkv.{kind}"] = fuse_wqkv(p["q"], p["k"], p["v"], llm.num_heads,
                                                                          llm.num_kv_heads)
    return out


def text_config(t):
    from maskloop.model.families.llama import text_config as llama_config

    return llama_config(t)

"""``maskloop train --dry-run``: per-GPU memory of a run before it is launched.

Parameter counts are exact: the model is built on the ``meta`` device (no memory, no weights), and every
parameter is put in its group (frozen base / trained, sharded by FSDP or replicated).  Activations are
an estimate for the LLM, which dominates them: per decoder layer and token, without checkpointing,
``(34 h + 5 a L) * 2`` bytes in bf16 (Korthikanti et al., 2022, for a transformer layer with h the hidden
size, a the heads, L the sequence; the SwiGLU MLP with its intermediate size counted instead of 4h),
with checkpointing only the layer input (``2 h`` bytes per token and layer) plus one layer's full set.
The ViT and SAM2 encoders are frozen and run without gradient in the default recipes; their
activations are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["MemoryPlan", "plan_memory", "format_plan"]

GiB = 1024 ** 3


@dataclass
class MemoryPlan:
    preset: str
    world_size: int
    distributed: str
    checkpointing: bool
    batch_size: int
    seq_len: int
    n_frozen: int
    n_trained: int
    n_frozen_sharded: int
    n_trained_sharded: int
    rows: dict  # name -> bytes per GPU

    @property
    def total(self) -> float:
        return sum(self.rows.values())


def _meta_model(preset: str):
    from maskloop.model.grounded import GroundedMLLM
    from maskloop.model.presets import get_preset
    from maskloop.model.prompts import build_word_tokenizer

    cfg = get_preset(preset)
    with torch.device("meta"):
        model = GroundedMLLM(cfg, build_word_tokenizer(["a"]))
    return model, cfg


def plan_memory(preset: str, *, batch_size: int, world_size: int = 1, distributed: str = "none",
                checkpointing: bool = False, shard_frozen: bool = True, freeze="default", seq_len: int | None = None,
                forwards_with_grad: int = 2, bf16: bool = True) -> MemoryPlan:
    """The memory of one GPU for a Sa2VA-family preset (see the module docstring for what is estimated).

    forwards_with_grad: LLM forward passes whose activations live until the backward (Loop 1: 2)."""
    from maskloop.train.sharding import shard_units

    model, cfg = _meta_model(preset)
    model.set_trainable(freeze)
    sharded_ids: set[int] = set()
    if distributed == "fsdp":
        for unit in shard_units(model):
            for p in unit.parameters():
                if shard_frozen or p.requires_grad:
                    sharded_ids.add(id(p))
    n_frozen = n_trained = n_frozen_sh = n_trained_sh = 0
    for p in model.parameters():
        sh = id(p) in sharded_ids
        if p.requires_grad:
            n_trained += p.numel()
            n_trained_sh += p.numel() if sh else 0
        else:
            n_frozen += p.numel()
            n_frozen_sh += p.numel() if sh else 0
    W = max(1, world_size)

    def per_gpu(n_all: int, n_sh: int) -> float:
        return (n_all - n_sh) + n_sh / W

    frozen_b = 2 if bf16 else 4
    frozen = per_gpu(n_frozen, n_frozen_sh) * frozen_b
    trained = per_gpu(n_trained, n_trained_sh) * 4  # fp32 master weights
    llm = cfg.llm
    h, a, n_layers = llm.hidden_size, llm.num_heads, llm.num_layers
    ffn = getattr(llm, "intermediate_size", 4 * h)
    if seq_len is None:
        n_img = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
        n_img = int(n_img * cfg.vision.downsample_ratio ** 2)
        seq_len = n_img + 64 + 64  # image tokens + prompt + a 64-token caption
    L = seq_len
    per_token_layer = (10 * h + 6 * ffn + 5 * a * L) * 2  # attention 10h + SwiGLU MLP ~6*ffn, + scores
    tokens = batch_size * L * forwards_with_grad
    if checkpointing:
        acts = tokens * n_layers * 2 * h + batch_size * L * per_token_layer
    else:
        acts = tokens * n_layers * per_token_layer
    logits = batch_size * L * llm.vocab_size * 4 * forwards_with_grad  # fp32 logits for the LM loss
    rows = {
        "frozen weights": frozen,
        "trained weights (fp32)": trained,
        "gradients (fp32)": trained,
        "AdamW state (2 x fp32)": 2 * trained,
        "EMA (fp32)": trained,
        "activations (estimate)": float(acts),
        "LM logits (estimate)": float(logits),
    }
    if distributed == "fsdp":  # the largest unsharded block during its all-gather
        biggest = max((sum(p.numel() for p in u.parameters()) for u in shard_units(model)), default=0)
        rows["all-gathered block"] = biggest * frozen_b * (2 if W > 1 else 0)
    return MemoryPlan(preset, W, distributed, checkpointing, batch_size, L, n_frozen, n_trained, n_frozen_sh,
                      n_trained_sh, rows)


def format_plan(p: MemoryPlan) -> str:
    lines = [f"memory per GPU: preset {p.preset}, {p.world_size} GPU(s), distributed={p.distributed}, "
             f"activation checkpointing={'on' if p.checkpointing else 'off'}, batch {p.batch_size}, "
             f"sequence ~{p.seq_len} tokens",
             f"  parameters: {p.n_frozen / 1e9:.2f} B frozen ({p.n_frozen_sharded / max(p.n_frozen, 1):.0%} sharded), "
             f"{p.n_trained / 1e6:.1f} M trained ({p.n_trained_sharded / max(p.n_trained, 1):.0%} sharded)"]
    width = max(len(k) for k in p.rows)
    for k, v in p.rows.items():
        lines.append(f"  {k:<{width}}  {v / GiB:8.2f} GiB")
    lines.append(f"  {'total':<{width}}  {p.total / GiB:8.2f} GiB"
                 + ("" if math.isfinite(p.total) else " (unknown)"))
    return "\n".join(lines)

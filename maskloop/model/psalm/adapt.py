"""Adapt a baseline PSALM checkpoint to the deformable-projector variant.

Works in PSALM's key space (``model.vision_tower.*``, ``model.mm_projector.*``,
``model.embed_tokens.*``, ``model.layers.*``, ``model.final_layernorm.*``, ``lm_head.*``,
``pixel_decoder.*``, ``predictor.*``, ``seg_query``, ``seg_query_projector.*``,
``SEG_token_projector.*``, ``class_name_projector.*``, ``region_projector.*``): every
baseline tensor is copied unchanged and a freshly initialised :class:`DeformableProjector`
is added under ``model.deform_projector.*``. Widths are read from the checkpoint: the LLM
width from ``lm_head.weight`` (or ``model.embed_tokens.weight``), the Swin level dims from
the ``swin_conv`` projector's input channels (res5 = 8 x res2).

:func:`to_maskloop_keys` renames PSALM keys to :class:`PSALMModel`'s where the modules
have the same structure (LLM, ``mm_projector``, the query projectors, the deform module)
and reports the rest (Swin and Mask2Former-Simplify weights need per-architecture maps).

Command line (wired as ``maskloop export psalm-to-deformable``):
    python -m maskloop.model.psalm.adapt baseline.safetensors deformable.safetensors
"""

from __future__ import annotations

import argparse
import json

import torch

from .projector import DeformableProjector

__all__ = ["psalm_to_deformable", "deformable_to_psalm", "to_maskloop_keys", "DEFORM_PREFIX", "main"]

DEFORM_PREFIX = "model.deform_projector."
_CONNECTOR_IN = "model.mm_projector.layer1.0.conv1.weight"

# PSALM prefix -> PSALMModel prefix, for modules whose structure is the same in both
PSALM_TO_MASKLOOP = {
    "model.embed_tokens.": "llm.model.embed_tokens.",
    "model.layers.": "llm.model.layers.",
    "model.final_layernorm.": "llm.model.final_layernorm.",
    "lm_head.": "llm.lm_head.",
    "model.mm_projector.": "mm_projector.",
    DEFORM_PREFIX: "deform_projector.",
    "seg_query_projector.": "seg_query_projector.",
    "SEG_token_projector.": "SEG_token_projector.",
    "class_name_projector.": "class_name_projector.",
    "region_projector.": "region_projector.",
}
_EXACT = {"seg_query": "seg_query"}


def _infer_dims(sd: dict[str, torch.Tensor]) -> tuple[int, tuple[int, ...]]:
    llm_dim = _infer_dims_llm(sd)
    if _CONNECTOR_IN not in sd:
        raise KeyError(f"baseline checkpoint lacks {_CONNECTOR_IN} (the swin_conv projector); "
                       "pass level_dims explicitly")
    res5 = sd[_CONNECTOR_IN].shape[1]
    return llm_dim, tuple(res5 // 8 * 2**i for i in range(4))


def psalm_to_deformable(
    baseline_state_dict: dict[str, torch.Tensor],
    hidden: int = 256,
    n_heads: int = 8,
    n_points: int = 4,
    level_dims: tuple[int, ...] | None = None,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (deformable state dict, report {"copied": [...], "new": [...], "config": {...}})."""
    clash = [k for k in baseline_state_dict if k.startswith(DEFORM_PREFIX)]
    if clash:
        raise ValueError(f"checkpoint already has {len(clash)} {DEFORM_PREFIX}* keys: it is already deformable")
    if level_dims is None:
        llm_dim, level_dims = _infer_dims(baseline_state_dict)
    else:
        llm_dim, level_dims = _infer_dims_llm(baseline_state_dict), tuple(level_dims)
    torch.manual_seed(seed)
    module = DeformableProjector(level_dims, hidden, n_heads, n_points, llm_dim)
    dtype = baseline_state_dict.get("lm_head.weight", next(iter(baseline_state_dict.values()))).dtype
    out = dict(baseline_state_dict)
    new = {DEFORM_PREFIX + k: v.detach().to(dtype if v.is_floating_point() else v.dtype).clone()
           for k, v in module.state_dict().items()}
    out.update(new)
    report = {
        "copied": sorted(baseline_state_dict),
        "new": sorted(new),
        "config": {"level_dims": list(level_dims), "hidden": hidden, "n_heads": n_heads,
                   "n_points": n_points, "llm_dim": llm_dim, "seed": seed},
    }
    return out, report


def _infer_dims_llm(sd):
    for k in ("lm_head.weight", "model.embed_tokens.weight"):
        if k in sd:
            return sd[k].shape[1]
    raise KeyError("baseline checkpoint has neither lm_head.weight nor model.embed_tokens.weight: "
                   "is this a PSALM checkpoint (keys like model.layers.*, lm_head.*)?")


def deformable_to_psalm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the deformable module: the inverse of :func:`psalm_to_deformable`."""
    return {k: v for k, v in state_dict.items() if not k.startswith(DEFORM_PREFIX)}


def to_maskloop_keys(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PSALM key names -> PSALMModel key names; returns (renamed, unmapped PSALM keys)."""
    renamed, unmapped = {}, []
    for k, v in state_dict.items():
        if k in _EXACT:
            renamed[_EXACT[k]] = v
            continue
        for src, dst in PSALM_TO_MASKLOOP.items():
            if k.startswith(src):
                renamed[dst + k[len(src):]] = v
                break
        else:
            unmapped.append(k)
    return renamed, unmapped


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file, save_file

    ap = argparse.ArgumentParser(description="Adapt a baseline PSALM checkpoint to the deformable variant.")
    ap.add_argument("baseline", help="baseline checkpoint (.safetensors)")
    ap.add_argument("out", help="output .safetensors")
    ap.add_argument("--report", help="write the key report as JSON here")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    sd, report = psalm_to_deformable(load_file(a.baseline), seed=a.seed)
    save_file({k: v.contiguous() for k, v in sd.items()}, a.out)
    if a.report:
        with open(a.report, "w") as f:
            json.dump(report, f, indent=1)
    print(f"copied {len(report['copied'])} tensors, added {len(report['new'])} deform tensors -> {a.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

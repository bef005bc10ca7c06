"""Load published Sa2VA checkpoints into our modules, and export back to the same key space.

Three inputs are accepted (docs/checkpoints.md):

1. a Hugging Face folder as published (``config.json``, tokenizer files, ``model.safetensors`` or
   ``model-0000x-of-0000y.safetensors`` + ``model.safetensors.index.json``) with the remote-code key
   names ``vision_model.*``, ``language_model.*``, ``mlp1.*``, ``grounding_encoder.sam2_model.*``,
   ``text_hidden_fcs.*``;
2. a training-time ``.pth`` (a dict with ``state_dict``) with ``mllm.model.`` in front of the MLLM keys;
3. either of the above with peft LoRA names (``base_layer`` / ``lora_A`` / ``lora_B``), merged into the
   base weights with scale alpha / r.

``.gamma`` suffixes are renamed ``.g_weight`` as the published conversion does.  The key map to our
modules (transformers' InternVL vision tower, its projector, Qwen2, Sam2Model) is explicit: InternViT's
fused ``qkv`` is split into q/k/v, SAM2's original module names are renamed to transformers' ones.
SAM2's video-memory modules (unused for images) are kept aside and written back on export.  Unknown,
missing or wrong-shaped keys raise one :class:`CheckpointError` listing them all.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from maskloop import errors

SAM_MEMORY_PREFIXES = (
    "memory_attention.",
    "memory_encoder.",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
    "mask_downsample.",
    "no_obj_embed_spatial",
)


class CheckpointError(errors.CheckpointError):
    """A published checkpoint that cannot be loaded (see :mod:`maskloop.errors`)."""


# ----------------------------------------------------------------------------------------------
# key maps: (published template, native template); SA2VA_* are prefixes of the published (Sa2VA) keys,
# OURS_* of this model's (transformers-layout) keys.  ``{0}``, ``{1}``... match one dotted name
# component each; ``{rest}`` matches the remainder of a key.  The same table is used both ways.

OURS_VIT = "internvl.model.vision_tower."
SA2VA_VIT_LAYER = "vision_model.encoder.layers.{0}."
OURS_VIT_LAYER = OURS_VIT + "encoder.layer.{0}."
_VIT = [
    ("vision_model.embeddings.class_embedding", OURS_VIT + "embeddings.cls_token"),
    ("vision_model.embeddings.position_embedding", OURS_VIT + "embeddings.position_embeddings"),
    ("vision_model.embeddings.patch_embedding.{0}", OURS_VIT + "embeddings.patch_embeddings.projection.{0}"),
    (SA2VA_VIT_LAYER + "attn.proj.{1}", OURS_VIT_LAYER + "attention.projection_layer.{1}"),
    (SA2VA_VIT_LAYER + "attn.q_norm.{1}", OURS_VIT_LAYER + "attention.q_norm.{1}"),
    (SA2VA_VIT_LAYER + "attn.k_norm.{1}", OURS_VIT_LAYER + "attention.k_norm.{1}"),
    (SA2VA_VIT_LAYER + "ls1", OURS_VIT_LAYER + "lambda_1"),
    (SA2VA_VIT_LAYER + "ls2", OURS_VIT_LAYER + "lambda_2"),
    (SA2VA_VIT_LAYER + "norm1.{1}", OURS_VIT_LAYER + "layernorm_before.{1}"),
    (SA2VA_VIT_LAYER + "norm2.{1}", OURS_VIT_LAYER + "layernorm_after.{1}"),
    (SA2VA_VIT_LAYER + "mlp.fc1.{1}", OURS_VIT_LAYER + "mlp.fc1.{1}"),
    (SA2VA_VIT_LAYER + "mlp.fc2.{1}", OURS_VIT_LAYER + "mlp.fc2.{1}"),
]
_QKV = r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)"  # fused: split / concatenated
_QKV_NATIVE = OURS_VIT_LAYER + "attention.{2}_proj.{1}"

OURS_PROJECTOR = "internvl.model.multi_modal_projector."
_MLP1 = [("mlp1.0.{0}", OURS_PROJECTOR + "layer_norm.{0}"), ("mlp1.1.{0}", OURS_PROJECTOR + "linear_1.{0}"), ("mlp1.3.{0}", OURS_PROJECTOR + "linear_2.{0}")]
_LLM = [
    ("language_model.lm_head.weight", "internvl.lm_head.weight"),
    ("language_model.model.{rest}", "internvl.model.language_model.{rest}"),
]
_HEAD = [("text_hidden_fcs.{0}.{1}", "text_hidden_fcs.{0}.{1}")]

SAM_PREFIX = "grounding_encoder.sam2_model."
SA2VA_SAM, OURS_SAM = SAM_PREFIX, "sam.sam."
SA2VA_SAM_TRUNK, OURS_SAM_TRUNK = SA2VA_SAM + "image_encoder.trunk.", OURS_SAM + "vision_encoder.backbone."
SA2VA_SAM_DECODER, OURS_SAM_DECODER = SA2VA_SAM + "sam_mask_decoder.", OURS_SAM + "mask_decoder."
SA2VA_SAM_PROMPT, OURS_SAM_PROMPT = SA2VA_SAM + "sam_prompt_encoder.", OURS_SAM + "prompt_encoder."
_SAM = [
    (SA2VA_SAM_TRUNK + "patch_embed.proj.{0}", OURS_SAM_TRUNK + "patch_embed.projection.{0}"),
    (SA2VA_SAM_TRUNK + "pos_embed", OURS_SAM_TRUNK + "pos_embed"),
    (SA2VA_SAM_TRUNK + "pos_embed_window", OURS_SAM_TRUNK + "pos_embed_window"),
    (SA2VA_SAM_TRUNK + "blocks.{0}.norm1.{1}", OURS_SAM_TRUNK + "blocks.{0}.layer_norm1.{1}"),
    (SA2VA_SAM_TRUNK + "blocks.{0}.norm2.{1}", OURS_SAM_TRUNK + "blocks.{0}.layer_norm2.{1}"),
    (SA2VA_SAM_TRUNK + "blocks.{0}.mlp.layers.0.{1}", OURS_SAM_TRUNK + "blocks.{0}.mlp.proj_in.{1}"),
    (SA2VA_SAM_TRUNK + "blocks.{0}.mlp.layers.1.{1}", OURS_SAM_TRUNK + "blocks.{0}.mlp.proj_out.{1}"),
    (SA2VA_SAM_TRUNK + "blocks.{0}.attn.qkv.{1}", OURS_SAM_TRUNK + "blocks.{0}.attn.qkv.{1}"),
    (SA2VA_SAM_TRUNK + "blocks.{0}.attn.proj.{1}", OURS_SAM_TRUNK + "blocks.{0}.attn.proj.{1}"),
    (SA2VA_SAM_TRUNK + "blocks.{0}.proj.{1}", OURS_SAM_TRUNK + "blocks.{0}.proj.{1}"),
    (SA2VA_SAM + "image_encoder.neck.convs.{0}.conv.{1}", OURS_SAM + "vision_encoder.neck.convs.{0}.{1}"),
    (SA2VA_SAM + "no_mem_embed", OURS_SAM + "no_memory_embedding"),
    (SA2VA_SAM_PROMPT + "pe_layer.positional_encoding_gaussian_matrix", OURS_SAM_PROMPT + "shared_embedding.positional_embedding"),
    (SA2VA_SAM_PROMPT + "not_a_point_embed.weight", OURS_SAM_PROMPT + "not_a_point_embed.weight"),
    (SA2VA_SAM_PROMPT + "no_mask_embed.weight", OURS_SAM_PROMPT + "no_mask_embed.weight"),
    (SA2VA_SAM_PROMPT + "mask_downscaling.0.{0}", OURS_SAM_PROMPT + "mask_embed.conv1.{0}"),
    (SA2VA_SAM_PROMPT + "mask_downscaling.1.{0}", OURS_SAM_PROMPT + "mask_embed.layer_norm1.{0}"),
    (SA2VA_SAM_PROMPT + "mask_downscaling.3.{0}", OURS_SAM_PROMPT + "mask_embed.conv2.{0}"),
    (SA2VA_SAM_PROMPT + "mask_downscaling.4.{0}", OURS_SAM_PROMPT + "mask_embed.layer_norm2.{0}"),
    (SA2VA_SAM_PROMPT + "mask_downscaling.6.{0}", OURS_SAM_PROMPT + "mask_embed.conv3.{0}"),
    (SA2VA_SAM_DECODER + "iou_token.weight", OURS_SAM_DECODER + "iou_token.weight"),
    (SA2VA_SAM_DECODER + "mask_tokens.weight", OURS_SAM_DECODER + "mask_tokens.weight"),
    (SA2VA_SAM_DECODER + "obj_score_token.weight", OURS_SAM_DECODER + "obj_score_token.weight"),
    (SA2VA_SAM_DECODER + "conv_s0.{0}", OURS_SAM_DECODER + "conv_s0.{0}"),
    (SA2VA_SAM_DECODER + "conv_s1.{0}", OURS_SAM_DECODER + "conv_s1.{0}"),
    (SA2VA_SAM_DECODER + "output_upscaling.0.{0}", OURS_SAM_DECODER + "upscale_conv1.{0}"),
    (SA2VA_SAM_DECODER + "output_upscaling.1.{0}", OURS_SAM_DECODER + "upscale_layer_norm.{0}"),
    (SA2VA_SAM_DECODER + "output_upscaling.3.{0}", OURS_SAM_DECODER + "upscale_conv2.{0}"),
    (SA2VA_SAM_DECODER + "transformer.layers.{0}.mlp.layers.0.{1}", OURS_SAM_DECODER + "transformer.layers.{0}.mlp.proj_in.{1}"),
    (SA2VA_SAM_DECODER + "transformer.layers.{0}.mlp.layers.1.{1}", OURS_SAM_DECODER + "transformer.layers.{0}.mlp.proj_out.{1}"),
    (SA2VA_SAM_DECODER + "transformer.final_attn_token_to_image.out_proj.{0}", OURS_SAM_DECODER + "transformer.final_attn_token_to_image.o_proj.{0}"),
    (SA2VA_SAM_DECODER + "transformer.final_attn_token_to_image.{0}.{1}", OURS_SAM_DECODER + "transformer.final_attn_token_to_image.{0}.{1}"),
    (SA2VA_SAM_DECODER + "transformer.norm_final_attn.{0}", OURS_SAM_DECODER + "transformer.layer_norm_final_attn.{0}"),
]
for _i in "1234":
    _SAM.append((SA2VA_SAM_DECODER + f"transformer.layers.{{0}}.norm{_i}.{{1}}", OURS_SAM_DECODER + f"transformer.layers.{{0}}.layer_norm{_i}.{{1}}"))
for _att in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
    _SAM.append((SA2VA_SAM_DECODER + f"transformer.layers.{{0}}.{_att}.out_proj.{{1}}", OURS_SAM_DECODER + f"transformer.layers.{{0}}.{_att}.o_proj.{{1}}"))
    for _pr in ("q_proj", "k_proj", "v_proj"):
        _SAM.append((SA2VA_SAM_DECODER + f"transformer.layers.{{0}}.{_att}.{_pr}.{{1}}", OURS_SAM_DECODER + f"transformer.layers.{{0}}.{_att}.{_pr}.{{1}}"))
for _i, _n in {"0": "proj_in", "1": "layers.0", "2": "proj_out"}.items():  # SAM2's 3-layer MLP heads
    _SAM.append((SA2VA_SAM_DECODER + f"output_hypernetworks_mlps.{{0}}.layers.{_i}.{{1}}", OURS_SAM_DECODER + f"output_hypernetworks_mlps.{{0}}.{_n}.{{1}}"))
    for _h in ("iou_prediction_head", "pred_obj_score_head"):
        _SAM.append((SA2VA_SAM_DECODER + f"{_h}.layers.{_i}.{{0}}", OURS_SAM_DECODER + f"{_h}.{_n}.{{0}}"))
_POINT = re.escape(SA2VA_SAM_PROMPT) + r"point_embeddings\.(\d+)\.weight"  # stacked into point_embed.weight

RULES = _VIT + _MLP1 + _LLM + _HEAD + _SAM
# Native keys with no published counterpart (derived on load): duplicates and the new-token tables.
_DERIVED = {OURS_SAM + "shared_image_embedding.positional_embedding", "new_embed", "new_head"}


def template_regex(template: str) -> re.Pattern:
    """A key template (``{name}`` fields: one dot-free key part each, ``{rest}`` any tail) -> its regex;
    :func:`fill_template` writes a match into another template."""
    out, last = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        name = m.group(1)
        out += re.escape(template[last : m.start()]) + (f"(?P<{name}>.+)" if name == "rest" else f"(?P<g{name}>[^.]+)")
        last = m.end()
    return re.compile(out + re.escape(template[last:]))


_COMPILED = [(template_regex(a), a, template_regex(b), b) for a, b in RULES]


def fill_template(template: str, m: re.Match) -> str:
    fields = {k[1:] if k.startswith("g") else k: v for k, v in m.groupdict().items()}
    return re.sub(r"\{(\w+)\}", lambda f: fields[f.group(1)], template)


def _published_to_native_key(key: str) -> str | None:
    for pub, _, _, nat in _COMPILED:
        m = pub.fullmatch(key)
        if m:
            return fill_template(nat, m)
    return None


def _native_to_published_key(key: str) -> str | None:
    for _, pub, nat, _ in _COMPILED:
        m = nat.fullmatch(key)
        if m:
            return fill_template(pub, m)
    return None


# ----------------------------------------------------------------------------------------------
# normalising the three input forms


def normalise_published(sd: dict[str, torch.Tensor], lora_scale: float | None = None) -> dict[str, torch.Tensor]:
    """Strip training prefixes, rename ``.gamma`` -> ``.g_weight``, merge LoRA into the base weights."""
    out: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        k = key
        if k.startswith("mllm.model."):
            k = k[len("mllm.model.") :]
        elif k.startswith("mllm."):
            k = k[len("mllm.") :]
        k = k.replace("language_model.base_model.model.", "language_model.")
        if k.endswith(".gamma"):
            k = k[: -len(".gamma")] + ".g_weight"
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", k)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        k = k.replace(".base_layer.", ".")
        out[k] = value
    if lora:
        if lora_scale is None:
            raise CheckpointError("the checkpoint holds LoRA weights: pass lora_scale = alpha / r to merge them")
        for mod, ab in lora.items():
            if set(ab) != {"A", "B"} or f"{mod}.weight" not in out:
                raise CheckpointError(f"incomplete LoRA weights for {mod}: have {sorted(ab)}")
            W = out[f"{mod}.weight"]
            out[f"{mod}.weight"] = (W.float() + lora_scale * ab["B"].float() @ ab["A"].float()).to(W.dtype)
    return out


def published_to_native(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Published (normalised) keys -> (native state dict, kept-aside SAM2 memory weights, unknown keys)."""
    native, extra, unknown = {}, {}, []
    points: dict[int, torch.Tensor] = {}
    qkv: dict[tuple[str, str], torch.Tensor] = {}
    for key, value in sd.items():
        nk = _published_to_native_key(key)
        if nk is not None:
            native[nk] = value
            continue
        m = re.fullmatch(_QKV, key)
        if m:
            qkv[(m.group(1), m.group(2))] = value
            continue
        m = re.fullmatch(_POINT, key)
        if m:
            points[int(m.group(1))] = value
            continue
        if key.startswith(SAM_PREFIX) and key[len(SAM_PREFIX) :].startswith(SAM_MEMORY_PREFIXES):
            extra[key] = value
            continue
        unknown.append(key)
    for (layer, kind), value in qkv.items():
        for name, part in zip("qkv", value.chunk(3, dim=0)):
            native[_QKV_NATIVE.format(layer, kind, name)] = part.contiguous()
    if points:
        native["sam.sam.prompt_encoder.point_embed.weight"] = torch.cat([points[i] for i in sorted(points)], 0)
    pe = native.get("sam.sam.prompt_encoder.shared_embedding.positional_embedding")
    if pe is not None:
        native[OURS_SAM + "shared_image_embedding.positional_embedding"] = pe
    return native, extra, unknown


def native_to_published(native: dict[str, torch.Tensor], extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in native.items():
        if key in _DERIVED:
            continue
        m = re.fullmatch(r"internvl\.model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        if key == "sam.sam.prompt_encoder.point_embed.weight":
            for i, row in enumerate(value):
                out[f"{SAM_PREFIX}sam_prompt_encoder.point_embeddings.{i}.weight"] = row[None].clone()
            continue
        pk = _native_to_published_key(key)
        if pk is None:
            raise CheckpointError(f"no published name for native key {key!r}")
        out[pk] = value
    for (layer, kind), parts in qkv.items():
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat([parts[c] for c in "qkv"], 0)
    out.update(extra or {})
    return out


# ----------------------------------------------------------------------------------------------
# model-level load / export


def model_native_state(model) -> dict[str, torch.Tensor]:
    """The model's weights in native names, LoRA merged, new-token rows written into the matrices."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    E, H = model.merged_embed_rows()
    scale = model.cfg.lora.alpha / model.cfg.lora.r if model.cfg.lora is not None else 0.0
    out = {}
    for k, v in sd.items():
        if ".lora_" in k:
            continue
        if ".base_layer." in k:
            mod = k.replace(".base_layer.weight", "").replace(".base_layer.bias", "")
            if k.endswith("weight"):
                A, B = sd[f"{mod}.lora_A.default.weight"], sd[f"{mod}.lora_B.default.weight"]
                v = (v.float() + scale * B.float() @ A.float()).to(v.dtype)
            k = k.replace(".base_layer.", ".")
        out[k] = v
    out["internvl.model.language_model.embed_tokens.weight"] = E
    if "internvl.lm_head.weight" in out:
        out["internvl.lm_head.weight"] = H
    return out


def load_native_into(model, native: dict[str, torch.Tensor]) -> None:
    """Load native (merged) weights: base weights into ``base_layer`` (LoRA stays identity: B = 0)."""
    target = model.state_dict()
    expected = {k.replace(".base_layer.", "."): k for k in target if ".lora_" not in k}
    expected = {k: v for k, v in expected.items() if k not in ("new_embed", "new_head")}
    missing = sorted(set(expected) - set(native))
    unexpected = sorted(set(native) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(native[k].shape)} vs model {tuple(target[expected[k]].shape)}"
        for k in set(native) & set(expected)
        if tuple(native[k].shape) != tuple(target[expected[k]].shape)
    )
    if missing or unexpected or wrong:
        raise CheckpointError(_report(missing=missing, unexpected=unexpected, wrong_shape=wrong))
    with torch.no_grad():
        for k, v in native.items():
            target[expected[k]].copy_(v)
        for lk, p in model.state_dict().items():
            if ".lora_B." in lk:
                p.zero_()
        model.new_embed.copy_(model.embed_matrix[model.new_token_ids])
        model.new_head.copy_(model.head_matrix[model.new_token_ids])


def _report(**lists: list[str]) -> str:
    lines = ["checkpoint does not match the model:"]
    for name, items in lists.items():
        if items:
            lines.append(f"  {name.replace('_', ' ')} ({len(items)}):")
            lines += [f"    {x}" for x in items[:50]] + ([f"    ... and {len(items) - 50} more"] if len(items) > 50 else [])
    lines.append("Check that the model preset / config.json matches the checkpoint (sizes, depth, vocabulary).")
    return "\n".join(lines)


def load_published_state(model, sd: dict[str, torch.Tensor], lora_scale: float | None = None) -> dict[str, torch.Tensor]:
    """Load a published/training state dict into ``model``; returns the kept-aside SAM2 memory weights.

    The LLM's published names are read through its family's key map (``llm.architecture``); with
    ``tie_word_embeddings`` a checkpoint without ``lm_head`` gets the embedding matrix (one with a distinct
    lm_head is an error).  Nothing is copied into the model unless every key matches."""
    from maskloop.model.families import family

    if lora_scale is None and model.cfg.lora is not None:
        lora_scale = model.cfg.lora.alpha / model.cfg.lora.r
    fam = family(model.cfg.llm.architecture)
    std = fam.to_standard(normalise_published(sd, lora_scale), model.cfg.llm)
    native, extra, unknown = published_to_native(std)
    if unknown:
        raise CheckpointError(_report(unknown_keys=sorted(unknown)))
    if model.cfg.llm.tie_word_embeddings:
        emb, head = native.get(_EMBED), native.get(_LM_HEAD)
        if head is not None and emb is not None and not torch.equal(head, emb):
            raise CheckpointError("the config says tie_word_embeddings: true but the checkpoint's lm_head differs from "
                                  "its embedding matrix: set llm_config.tie_word_embeddings (config.json) or "
                                  "llm.tie_word_embeddings (maskloop_config.json) to false for this checkpoint")
        if emb is not None:
            native[_LM_HEAD] = emb
    load_native_into(model, native)
    model.sam_memory_weights = extra
    return extra


_EMBED = "internvl.model.language_model.embed_tokens.weight"
_LM_HEAD = "internvl.lm_head.weight"


def export_state(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model in the published key space (LoRA merged; the LLM in its family's names; no lm_head when
    tied), SAM2 memory weights included if loaded; every tensor in ``dtype`` when given."""
    from maskloop.model.families import family

    native = model_native_state(model)
    if model.cfg.llm.tie_word_embeddings:
        native.pop(_LM_HEAD, None)
    out = native_to_published(native, getattr(model, "sam_memory_weights", None))
    out = family(model.cfg.llm.architecture).from_standard(out, model.cfg.llm)
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------------------------
# files


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file, an HF folder (single file or sharded with index), or a training ``.pth``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for f in files:
                if not (path / f).exists():
                    raise CheckpointError(f"{index} names shard {f}, which is missing")
                sd.update(load_file(str(path / f)))
            return sd
        single = path / "model.safetensors"
        if single.exists():
            return load_file(str(single))
        raise CheckpointError(f"{path} holds neither model.safetensors nor model.safetensors.index.json")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict or a dict with 'state_dict'")
    return obj


_WEIGHT_FILES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def save_published(model, folder: str | Path, max_shard_bytes: int = 4 << 30, base: str | Path | None = None,
                   dtype: str | torch.dtype | None = None) -> Path:
    """Write ``model`` as an HF-style folder: sharded safetensors + index (published key space, one dtype),
    tokenizer, ``maskloop_config.json`` and a ``config.json``.

    ``base``: the published Sa2VA folder the model came from -- its ``config.json``, tokenizer, generation
    config and remote-code files are copied (Sa2VA's ``AutoModel.from_pretrained(..., trust_remote_code=True)``
    then opens the export), and the default dtype is its ``torch_dtype``.  Without it, a complete
    ``config.json`` of our own is written (Sa2VA's loader cannot open that folder: no remote code).
    ``dtype`` (``bf16`` / ``fp16`` / ``fp32``): every floating tensor is written in it (default: ``base``'s
    dtype, else the model's)."""
    import shutil

    from safetensors.torch import save_file

    from maskloop.config import to_dict

    folder = Path(folder)
    base_cfg = None
    if base is not None:
        base = Path(base)
        if not (base / "config.json").is_file():
            raise CheckpointError(f"--base {base}: no config.json there (pass the published Sa2VA folder)")
        base_cfg = json.loads((base / "config.json").read_text())
    dtype = parse_dtype(dtype) or parse_dtype((base_cfg or {}).get("torch_dtype")) or next(model.parameters()).dtype
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in export_state(model, dtype).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        nbytes = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
    (folder / "maskloop_config.json").write_text(json.dumps(to_dict(model.cfg), indent=1))
    dtype_name = str(dtype).replace("torch.", "")
    if base is not None:
        for f in sorted(base.iterdir()):  # config, tokenizer, generation config, remote code: all but weights
            if f.is_file() and not f.name.endswith(_WEIGHT_FILES) and f.name != "model.safetensors.index.json":
                shutil.copy2(f, folder / f.name)
        cfg = dict(base_cfg, torch_dtype=dtype_name)
        cfg["llm_config"] = dict(cfg["llm_config"], vocab_size=model.cfg.llm.vocab_size)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    else:
        model.tokenizer.save_pretrained(str(folder))
        (folder / "config.json").write_text(json.dumps(published_config(model.cfg, dtype_name), indent=2))
    return folder


NO_BASE_NOTE = ("config.json is maskloop's own (no remote code): Sa2VA's loader, AutoModel.from_pretrained(..., "
                "trust_remote_code=True), cannot open this folder; pass --base FOLDER (the published Sa2VA checkpoint "
                "it came from) to copy its remote code, tokenizer and generation config")


def published_config(cfg, dtype_name: str = "float32") -> dict:
    """A complete Sa2VA-style ``config.json`` (Sa2VAChatConfig fields) for ``cfg``; read back by
    :func:`config_from_folder`."""
    v, t = cfg.vision, cfg.llm
    llm = {
        "architectures": [t.architecture], "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
        "intermediate_size": t.intermediate_size, "rope_theta": t.rope_theta, "rope_scaling": t.rope_scaling,
        "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
        "tie_word_embeddings": t.tie_word_embeddings, "hidden_act": "silu",
    }
    if t.architecture == "InternLM2ForCausalLM":
        llm["bias"] = t.attention_bias
    elif t.architecture == "LlamaForCausalLM":
        llm["attention_bias"] = t.attention_bias
    return {
        "architectures": ["Sa2VAChatModel"], "model_type": "sa2va_chat", "torch_dtype": dtype_name,
        "template": cfg.template, "downsample_ratio": v.downsample_ratio, "ps_version": "v2",
        "select_layer": v.select_layer, "force_image_size": v.image_size, "dynamic_image_size": cfg.tiles,
        "use_thumbnail": cfg.use_thumbnail, "min_dynamic_patch": cfg.min_dynamic_patch,
        "max_dynamic_patch": cfg.max_dynamic_patch,
        "vision_config": {
            "architectures": ["InternVisionModel"], "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads, "intermediate_size": v.intermediate_size, "image_size": v.image_size,
            "patch_size": v.patch_size, "qkv_bias": v.qkv_bias, "qk_normalization": v.qk_norm,
            "norm_type": v.norm_type, "layer_norm_eps": v.layer_norm_eps,
        },
        "llm_config": llm,
    }


def config_from_folder(folder: str | Path):
    """A :class:`ModelConfig` from ``maskloop_config.json`` or a published Sa2VA ``config.json``."""
    from maskloop.config import ConfigError, ModelConfig, from_dict

    folder = Path(folder)
    ours = folder / "maskloop_config.json"
    if ours.exists():
        return from_dict(ModelConfig, json.loads(ours.read_text())).validate()
    theirs = folder / "config.json"
    if not theirs.exists():
        raise ConfigError(f"{folder} holds neither maskloop_config.json nor config.json")
    cfg = config_from_published(json.loads(theirs.read_text()), str(theirs))
    cfg.name = folder.name
    return cfg


def config_from_published(c: dict, where: str = "config.json"):
    """A validated :class:`ModelConfig` from a published Sa2VA ``config.json`` (Sa2VAChatConfig) dict.

    Read and honoured: the vision / LLM shapes, ``llm_config.architectures`` (the family), ``template``,
    ``tie_word_embeddings``, ``rope_scaling``, ``select_layer``, ``downsample_ratio``, ``force_image_size``,
    ``min/max_dynamic_patch``, ``use_thumbnail``, ``dynamic_image_size`` (-> ``tiles``).  Rejected with a
    message: ``ps_version`` other than v2 (InternVL 1.x's transposed pixel shuffle), an activation other
    than silu, an unsupported architecture or template."""
    from maskloop.config import ConfigError, LLMConfig, ModelConfig, VisionConfig
    from maskloop.model.families import family
    from maskloop.model.prompts import template_name

    if "llm_config" not in c and "text_config" in c:  # Sa2VAChatConfigQwen: a Qwen2.5-VL / Qwen3-VL model
        raise ConfigError(f"{where}: a Qwen-VL based Sa2VA checkpoint (model_type {c.get('model_type')!r}, a "
                          "Qwen-VL vision tower and text_config): not supported; supported are the InternVL-based "
                          "ones (vision_config + llm_config: Sa2VA-1B/4B/8B/26B, Sa2VA-InternVL3)")
    try:
        v, t = c["vision_config"], c["llm_config"]
    except KeyError as e:
        raise ConfigError(f"{where}: not a Sa2VA/InternVL config (missing {e})") from None
    arch = (t.get("architectures") or [None])[0]
    try:
        family(arch)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if "template" not in c or c["template"] is None:
        raise ConfigError(f"{where} names no chat `template` (Sa2VA's loader needs one)")
    try:
        template = template_name(c["template"])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    ps = c.get("ps_version", "v1")  # Sa2VAChatConfig's default
    if ps != "v2":
        raise ConfigError(f"{where}: ps_version={ps!r} is not supported (only v2, the pixel shuffle of InternVL 2+ "
                          "and every published Sa2VA; v1 leaves the token grid transposed)")
    act = t.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: llm_config.hidden_act={act!r} is not supported (silu only)")
    image_size = c.get("force_image_size") or v.get("image_size", 448)
    vision = VisionConfig(
        hidden_size=v["hidden_size"],
        num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"],
        image_size=image_size,
        patch_size=v.get("patch_size", 14),
        downsample_ratio=c.get("downsample_ratio", 0.5),
        qkv_bias=v.get("qkv_bias", True),
        qk_norm=v.get("qk_normalization", False),
        norm_type=v.get("norm_type", "layer_norm"),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        select_layer=c.get("select_layer", -1),
    )
    bias = t.get("bias", True) if arch == "InternLM2ForCausalLM" else t.get("attention_bias", False)
    llm = LLMConfig(
        architecture=arch,
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        num_layers=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"],
        num_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
        intermediate_size=t["intermediate_size"],
        rope_theta=t.get("rope_theta", 1e6),
        max_position_embeddings=t.get("max_position_embeddings", 32768),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=t.get("tie_word_embeddings", False),
        rope_scaling=t.get("rope_scaling"),
        attention_bias=bool(bias) and arch != "Qwen2ForCausalLM",
    )
    cfg = ModelConfig(
        name="published", vision=vision, llm=llm, template=template,
        tiles=bool(c.get("dynamic_image_size", False)),
        min_dynamic_patch=c.get("min_dynamic_patch", 1),
        max_dynamic_patch=c.get("max_dynamic_patch", 12),
        use_thumbnail=c.get("use_thumbnail", True),
    )
    try:
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def companion_template(pth: str | Path) -> str | None:
    """The ``template = "..."`` of the xtuner config ``.py`` beside a training ``.pth`` (same stem first,
    else the only ``.py`` there), or None when there is none."""
    import ast

    pth = Path(pth)
    cands = [pth.with_suffix(".py")] if pth.with_suffix(".py").is_file() else sorted(pth.parent.glob("*.py"))
    if len(cands) != 1:
        return None
    for node in ast.parse(cands[0].read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "template" for t in node.targets):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                return node.value.value
    return None


def load_tokenizer(folder: str | Path):
    """The folder's tokenizer; a folder without one, or one that needs remote code, is one clear error."""
    import os

    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the "
                              "tokenizer files of the checkpoint it came from into it")
    trust = os.environ.get("MASKLOOP_TRUST_REMOTE_CODE", "") == "1"
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust)
    except Exception as e:  # noqa: BLE001 - transformers raises several types here
        code = sorted(p.name for p in folder.glob("tokenization_*.py"))
        hint = (f" It ships its own tokenizer code ({', '.join(code)}): set MASKLOOP_TRUST_REMOTE_CODE=1 to run it."
                if code and not trust else "")
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {type(e).__name__}: {e}.{hint}") from None


def load_pretrained(folder: str | Path, cfg=None, lora: bool = True, weights: str | Path | None = None):
    """Build the model from a checkpoint folder (tokenizer + config + weights).

    ``weights``: a training ``.pth`` (or safetensors) to load instead of the folder's own weights; the
    template named by the ``.pth``'s companion xtuner config, when there is one, is used.  Config,
    tokenizer and weights are all checked before a model is returned (nothing half-loaded)."""
    from maskloop.model.grounded import GroundedMLLM
    from maskloop.model.prompts import template_name

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    cfg = cfg or config_from_folder(folder)
    if weights is not None and (name := companion_template(weights)) is not None:
        cfg.template = template_name(name)
    if not lora:
        cfg.lora = None
    tok = load_tokenizer(folder)
    sd = read_state_file(weights if weights is not None else folder)
    model = GroundedMLLM(cfg, tok)
    load_published_state(model, sd)
    return model

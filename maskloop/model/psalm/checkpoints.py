"""Load the checkpoints a PSALM user starts from into :class:`PSALMModel`, by explicit key maps.

Three published inputs:

1. **detectron2's Mask2Former ``model_final_*.pkl``** (the Swin-B / Swin-L COCO models of the
   Mask2Former model zoo, PSALM's ``--vision_tower``): a pickled dict, usually
   ``{"model": {name: numpy array}, "__author__": ...}``, in detectron2's names
   ``backbone.*`` (Swin), ``sem_seg_head.pixel_decoder.*`` (MSDeformAttnPixelDecoder),
   ``sem_seg_head.predictor.*`` (MultiScaleMaskedTransformerDecoder). It is read with a
   restricted unpickler that builds numpy arrays and plain containers only
   (:func:`read_detectron2_pkl`); anything else in the pickle is refused.
2. **PSALM's full checkpoints** (``pytorch_model.bin``, ``model.safetensors`` or a sharded
   folder) in PSALM's module names: ``model.vision_tower.*`` (the same Swin names without
   ``backbone.``), ``model.mm_projector.*``, the Phi LLM (``model.layers.*`` ...),
   ``pixel_decoder.*`` (PSALM's ``Mask2Former_Simplify`` decoder: FPN convs as
   ``adapter_1.{0,1}`` / ``layer_1.{0,1}``), ``predictor.*`` and the query projectors.
3. **``mm_projector.bin``** (PSALM's ``--pretrain_mm_mlp_adapter``): ``*mm_projector.*`` keys.

The maps onto transformers' modules are explicit (:func:`mask2former_entries`): Swin's fused
``qkv`` is split into query / key / value, the decoder self-attention's ``in_proj`` likewise,
``norm{i}`` become ``hidden_states_norms.stage{i+1}``, the encoder layers' ``norm1 / linear1 /
linear2 / norm2`` become ``self_attn_layer_norm / fc1 / fc2 / final_layer_norm``, ... Native
names are resolved against the model's own state dict, so the maps follow transformers'
renames (``attention.self.query`` -> ``attention.q_proj`` ...). Keys with no counterpart in
maskloop's model (the derived ``relative_position_index`` buffers, Mask2Former's
``class_embed`` / ``query_feat``, PSALM's unused ``SEG_query_embed`` / ``static_query``) are kept
aside and written back on export. PSALM's classification heads (``predictor.SEG_proj`` /
``CLASS_proj`` / ``REGION_proj``, and ``SEG_norm`` / ``class_name_norm`` / ``seg_proj_after_norm`` /
``class_name_proj_after_norm`` when it was trained with ``SEG_NORM``) load by their own names into
the same modules of :class:`PSALMModel` (``seg_proj`` / ``seg_norm`` in its config); a Mask2Former
``.pkl`` has none, so they keep their initialisation, as in PSALM. Unknown, missing or wrong-shaped keys raise one
:class:`~maskloop.model.checkpoints.CheckpointError` listing them all.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import CheckpointError
from .adapt import PSALM_TO_MASKLOOP

__all__ = [
    "PickleRefused", "read_detectron2_pkl", "write_detectron2_pkl", "mask2former_entries",
    "detectron2_to_native", "native_to_detectron2", "load_detectron2_pkl", "export_detectron2",
    "psalm_to_native", "load_psalm_checkpoint", "load_mm_projector", "read_psalm_state",
    "D2_PREFIXES", "PSALM_PREFIXES", "load_phi", "load_pretrained_parts",
]


class PickleRefused(CheckpointError):
    """A .pkl that holds something other than numpy arrays in plain containers."""


# ----------------------------------------------------------------------------------------------
# the restricted unpickler

# what numpy arrays (any pickle protocol, numpy 1.x or 2.x) and plain containers need, nothing else
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # bytes under protocol 2
    ("collections", "OrderedDict"),
}


class _ArraysOnly(pickle.Unpickler):
    def __init__(self, f, path: str):
        super().__init__(f, encoding="latin1")  # detectron2's model-zoo pickles come from Python 2 too
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise PickleRefused(
            f"{self.path}: refusing to unpickle {module}.{name}: a detectron2 checkpoint .pkl holds only numpy "
            "arrays in plain dicts, and loading this object could run code. Use the model-zoo file as "
            "published (e.g. Mask2Former's model_final_*.pkl), or convert a trusted checkpoint to safetensors.")

    def persistent_load(self, pid):
        raise PickleRefused(f"{self.path}: refusing a pickle with persistent ids (a torch.save file?); "
                            "torch checkpoints are read with load_psalm_checkpoint, .pkl files must hold numpy arrays")


def read_detectron2_pkl(path: str | Path) -> dict[str, torch.Tensor]:
    """A detectron2 ``.pkl`` -> ``{name: tensor}`` (the ``"model"`` entry when wrapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Mask2Former checkpoint not found: {path} (detectron2 model zoo model_final_*.pkl)")
    data = path.read_bytes()
    try:
        obj = _ArraysOnly(io.BytesIO(data), str(path)).load()
    except PickleRefused:
        raise
    except Exception as e:  # truncated / not a pickle
        raise CheckpointError(f"{path}: not a readable pickle ({type(e).__name__}: {e}); is the download complete?") from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of arrays (or {{'model': {{...}}}}), found {type(obj).__name__}")
    out, bad = {}, []
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, (np.ndarray, np.generic)) or v.dtype.kind not in "fiub":
            bad.append(f"{k!r}: {type(v).__name__}")
            continue
        out[k] = torch.from_numpy(np.array(v, copy=True))
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} entr(ies) are not numeric arrays, e.g. {bad[:3]}")
    return out


def write_detectron2_pkl(path: str | Path, state: dict[str, torch.Tensor], author: str = "maskloop") -> Path:
    """Write ``state`` the way detectron2's model zoo does: ``{"model": {name: ndarray}, "__author__"}``."""
    path = Path(path)
    model = {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
             for k, v in state.items()}
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": author, "matching_heuristics": False}, f, protocol=2)
    return path


# ----------------------------------------------------------------------------------------------
# the key map


@dataclass(frozen=True)
class Entry:
    src: str  # published name
    dst: tuple[str, ...]  # native name(s); three for a fused q/k/v split along dim 0
    op: str = "copy"  # copy | split3 | rows (leading rows of a larger table, as PSALM trims 200 -> 100 queries)


# ``heads``: the file carries PSALM's classification heads (predictor.SEG_proj / CLASS_proj / REGION_proj and,
# under SEG_NORM, SEG_norm / class_name_norm / *_proj_after_norm); Mask2Former's own decoder has none.
D2_PREFIXES = {"backbone": "backbone.", "pixel_decoder": "sem_seg_head.pixel_decoder.",
               "predictor": "sem_seg_head.predictor.", "fpn": "detectron2", "heads": False}
PSALM_PREFIXES = {"backbone": "model.vision_tower.", "pixel_decoder": "pixel_decoder.",
                  "predictor": "predictor.", "fpn": "sequential", "heads": True}

# Published keys with no counterpart in PSALMModel: kept aside (export writes them back).
_ASIDE = [
    r".*\.attn\.relative_position_index",  # derived buffer (recomputed from the window size)
    r".*predictor\.(class_embed|query_feat|static_query|new_query_feat|SEG_query_embed)\..*",
    r"criterion\..*", r"pixel_(mean|std)",
]
_ASIDE_RE = re.compile("|".join(f"(?:{p})" for p in _ASIDE))
# Native keys no published file has: left as initialised.
_NATIVE_UNUSED = re.compile(r"vision_tower\.(swin\.)?layernorm\..*")


def _pick(keys: set[str], *candidates: str) -> str:
    for c in candidates:
        if c in keys:
            return c
    raise CheckpointError(f"PSALMModel has none of {candidates}: transformers renamed a module this map "
                          "does not know; update maskloop.model.psalm.checkpoints")


def mask2former_entries(model, prefixes: dict = D2_PREFIXES) -> list[Entry]:
    """Every published key of the Swin / pixel decoder / decoder with its native target(s)."""
    c = model.config
    keys = set(model.state_dict())
    B, PD, PR = prefixes["backbone"], prefixes["pixel_decoder"], prefixes["predictor"]
    out: list[Entry] = []
    S = "vision_tower.swin." if any(k.startswith("vision_tower.swin.") for k in keys) else "vision_tower."

    def e(src, *dst, op="copy"):
        out.append(Entry(src, tuple(dst), op))

    for p in ("weight", "bias"):
        e(f"{B}patch_embed.proj.{p}", f"{S}embeddings.patch_embeddings.projection.{p}")
        e(f"{B}patch_embed.norm.{p}", f"{S}embeddings.norm.{p}")
    for i, depth in enumerate(c.swin_depths):
        for j in range(depth):
            src, nat = f"{B}layers.{i}.blocks.{j}.", f"{S}encoder.layers.{i}.blocks.{j}."
            e(src + "attn.relative_position_bias_table",
              _pick(keys, nat + "attention.relative_position_bias.relative_position_bias_table",
                    nat + "attention.self.relative_position_bias_table"))
            for p in ("weight", "bias"):
                e(src + f"norm1.{p}", nat + f"layernorm_before.{p}")
                e(src + f"norm2.{p}", nat + f"layernorm_after.{p}")
                qkv = [_pick(keys, nat + f"attention.{a}_proj.{p}", nat + f"attention.self.{b}.{p}")
                       for a, b in (("q", "query"), ("k", "key"), ("v", "value"))]
                e(src + f"attn.qkv.{p}", *qkv, op="split3")
                e(src + f"attn.proj.{p}", _pick(keys, nat + f"attention.o_proj.{p}", nat + f"attention.output.dense.{p}"))
                e(src + f"mlp.fc1.{p}", _pick(keys, nat + f"mlp.fc1.{p}", nat + f"intermediate.dense.{p}"))
                e(src + f"mlp.fc2.{p}", _pick(keys, nat + f"mlp.fc2.{p}", nat + f"output.dense.{p}"))
        if i < len(c.swin_depths) - 1:
            e(f"{B}layers.{i}.downsample.reduction.weight", f"{S}encoder.layers.{i}.downsample.reduction.weight")
            for p in ("weight", "bias"):
                e(f"{B}layers.{i}.downsample.norm.{p}", f"{S}encoder.layers.{i}.downsample.norm.{p}")
        for p in ("weight", "bias"):
            e(f"{B}norm{i}.{p}", f"vision_tower.hidden_states_norms.stage{i + 1}.{p}")

    # MSDeformAttnPixelDecoder -> Mask2FormerPixelDecoder
    n_in = sum(1 for k in keys if re.fullmatch(r"pixel_decoder\.input_projections\.\d+\.0\.weight", k))
    for lvl in range(n_in):
        for p in ("weight", "bias"):
            e(f"{PD}input_proj.{lvl}.0.{p}", f"pixel_decoder.input_projections.{lvl}.0.{p}")
            e(f"{PD}input_proj.{lvl}.1.{p}", f"pixel_decoder.input_projections.{lvl}.1.{p}")
    e(f"{PD}transformer.level_embed", "pixel_decoder.level_embed")
    for i in range(c.enc_layers):
        src, nat = f"{PD}transformer.encoder.layers.{i}.", f"pixel_decoder.encoder.layers.{i}."
        for p in ("weight", "bias"):
            for m in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
                e(src + f"self_attn.{m}.{p}", nat + f"self_attn.{m}.{p}")
            for a, b in (("norm1", "self_attn_layer_norm"), ("linear1", "fc1"), ("linear2", "fc2"),
                         ("norm2", "final_layer_norm")):
                e(src + f"{a}.{p}", nat + f"{b}.{p}")
    for p in ("weight", "bias"):
        e(f"{PD}mask_features.{p}", f"pixel_decoder.mask_projection.{p}")
    n_fpn = model.pixel_decoder.num_fpn_levels
    for k in range(1, n_fpn + 1):
        for name in (f"adapter_{k}", f"layer_{k}"):
            nat = f"pixel_decoder.{name}."
            if prefixes["fpn"] == "detectron2":  # detectron2 Conv2d(norm=GN): weight [+ bias], norm.*
                e(f"{PD}{name}.weight", nat + "0.weight")
                for p in ("weight", "bias"):
                    e(f"{PD}{name}.norm.{p}", nat + f"1.{p}")
            else:  # PSALM's nn.Sequential(Conv2d, GroupNorm, ReLU)
                e(f"{PD}{name}.0.weight", nat + "0.weight")
                if nat + "0.bias" in keys:
                    e(f"{PD}{name}.0.bias", nat + "0.bias")
                for p in ("weight", "bias"):
                    e(f"{PD}{name}.1.{p}", nat + f"1.{p}")

    # MultiScaleMaskedTransformerDecoder -> transformers' decoder layers (+ our query_pos)
    M = "predictor.module."
    n_dec = sum(1 for k in keys if re.fullmatch(r"predictor\.module\.decoder\.layers\.\d+\.fc1\.weight", k))
    for i in range(n_dec):
        nat = f"{M}decoder.layers.{i}."
        ca, sa, ff = (f"{PR}transformer_cross_attention_layers.{i}.", f"{PR}transformer_self_attention_layers.{i}.",
                      f"{PR}transformer_ffn_layers.{i}.")
        e(ca + "multihead_attn.in_proj_weight", nat + "cross_attn.in_proj_weight")
        e(ca + "multihead_attn.in_proj_bias", nat + "cross_attn.in_proj_bias")
        e(sa + "self_attn.in_proj_weight", *(nat + f"self_attn.{x}_proj.weight" for x in "qkv"), op="split3")
        e(sa + "self_attn.in_proj_bias", *(nat + f"self_attn.{x}_proj.bias" for x in "qkv"), op="split3")
        for p in ("weight", "bias"):
            e(ca + f"multihead_attn.out_proj.{p}", nat + f"cross_attn.out_proj.{p}")
            e(ca + f"norm.{p}", nat + f"cross_attn_layer_norm.{p}")
            e(sa + f"self_attn.out_proj.{p}", nat + f"self_attn.out_proj.{p}")
            e(sa + f"norm.{p}", nat + f"self_attn_layer_norm.{p}")
            e(ff + f"linear1.{p}", nat + f"fc1.{p}")
            e(ff + f"linear2.{p}", nat + f"fc2.{p}")
            e(ff + f"norm.{p}", nat + f"final_layer_norm.{p}")
    for p in ("weight", "bias"):
        e(f"{PR}decoder_norm.{p}", f"{M}decoder.layernorm.{p}")
        for k in range(3):
            e(f"{PR}mask_embed.layers.{k}.{p}", f"{M}decoder.mask_predictor.mask_embedder.{k}.0.{p}")
    e(f"{PR}level_embed.weight", f"{M}level_embed.weight")
    e(f"{PR}query_embed.weight", "predictor.query_pos.weight", op="rows")
    for k in sorted(x for x in keys if x.startswith(f"{M}input_projections.")):  # only when in != hidden dim
        e(PR + "input_proj." + k[len(f"{M}input_projections."):], k)
    if prefixes.get("heads"):  # PSALM's heads, same module names in both (predictor.<name>.layers.{k} / LayerNorm)
        heads = sorted(k for k in keys if re.match(
            r"predictor\.(SEG_proj|CLASS_proj|REGION_proj|seg_proj_after_norm|class_name_proj_after_norm|SEG_norm"
            r"|class_name_norm)\.", k))
        for k in heads:
            e(PR + k[len("predictor."):], k)
    return out


def _swin_relative_index(window: int) -> torch.Tensor:
    """Swin's relative_position_index buffer (window^2, window^2)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _convert(sd: dict[str, torch.Tensor], entries: list[Entry], own: dict[str, torch.Tensor]):
    """-> (native, missing published keys, wrong shapes, consumed published keys)."""
    native, missing, shapes, used = {}, [], [], set()
    for en in entries:
        if en.src not in sd:
            missing.append(en.src)
            continue
        v = sd[en.src]
        used.add(en.src)
        want = [tuple(own[d].shape) for d in en.dst]
        if en.op == "split3":
            exp = (sum(w[0] for w in want),) + want[0][1:]
            if tuple(v.shape) != exp:
                shapes.append(f"{en.src}: checkpoint {tuple(v.shape)}, model {exp} (fused q/k/v)")
                continue
            for d, part in zip(en.dst, torch.split(v, [w[0] for w in want], dim=0)):
                native[d] = part
        elif en.op == "rows":
            if v.ndim != 2 or v.shape[1] != want[0][1] or v.shape[0] < want[0][0]:
                shapes.append(f"{en.src}: checkpoint {tuple(v.shape)}, model {want[0]} (needs >= that many rows)")
                continue
            native[en.dst[0]] = v[: want[0][0]]
        else:
            if tuple(v.shape) != want[0]:
                shapes.append(f"{en.src}: checkpoint {tuple(v.shape)}, model {want[0]}")
                continue
            native[en.dst[0]] = v
    return native, missing, shapes, used


def _report(what: str, **lists: list[str]) -> str:
    lines = [f"{what} does not match the PSALM model:"]
    for name, items in lists.items():
        if items:
            lines.append(f"  {name.replace('_', ' ')} ({len(items)}):")
            lines += [f"    {x}" for x in items[:40]] + ([f"    ... and {len(items) - 40} more"] if len(items) > 40 else [])
    lines.append("Check the preset (swin_type base/large, depths, enc_layers, dec_layers, fpn_style, seg_proj, "
                 "seg_norm) against the file.")
    return "\n".join(lines)


def detectron2_to_native(model, sd: dict[str, torch.Tensor], prefixes: dict = D2_PREFIXES, strict_unknown: bool = True,
                         what: str = "checkpoint"):
    """Published Swin / pixel decoder / decoder keys -> (native tensors, kept aside, other published keys).

    Raises one :class:`CheckpointError` for missing or wrong-shaped keys (and for unknown keys
    under the three prefixes when ``strict_unknown``)."""
    own = model.state_dict()
    entries = mask2former_entries(model, prefixes)
    native, missing, shapes, used = _convert(sd, entries, own)
    scope = (prefixes["backbone"], prefixes["pixel_decoder"], prefixes["predictor"])
    aside, unknown, rest = {}, [], {}
    for k, v in sd.items():
        if k in used:
            continue
        if _ASIDE_RE.fullmatch(k):
            aside[k] = v
        elif k.startswith(scope):
            unknown.append(k)
        else:
            rest[k] = v
    if not strict_unknown:
        rest.update({k: sd[k] for k in unknown})
        unknown = []
    if missing or shapes or unknown:
        raise CheckpointError(_report(what, unknown_keys=sorted(unknown), missing_keys=missing, wrong_shapes=shapes))
    return native, aside, rest


def _fill_zero_biases(model, native: dict) -> list[str]:
    """PSALM-style FPN convs have biases detectron2's do not: PSALM leaves them at their zero init."""
    filled = []
    for k, v in model.state_dict().items():
        if re.fullmatch(r"pixel_decoder\.(adapter|layer)_\d+\.0\.bias", k) and k not in native:
            native[k] = torch.zeros_like(v)
            filled.append(k)
    return filled


def _load_native(model, native: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    with torch.no_grad():
        for k, v in native.items():
            own[k].copy_(v.to(own[k].dtype))


def load_detectron2_pkl(model, path_or_state, strict: bool = True) -> dict:
    """Load a Mask2Former ``.pkl`` (path or already-read dict) into the Swin tower, the pixel
    decoder and the decoder layers; returns a report ``{"loaded", "aside", "zero_init", "unused"}``.

    ``unused``: published keys outside ``backbone.`` / ``sem_seg_head.`` (none in the model zoo
    files); ``strict`` makes them an error too."""
    sd = read_detectron2_pkl(path_or_state) if isinstance(path_or_state, (str, Path)) else dict(path_or_state)
    what = str(path_or_state) if isinstance(path_or_state, (str, Path)) else "Mask2Former checkpoint"
    native, aside, rest = detectron2_to_native(model, sd, D2_PREFIXES, what=what)
    if strict and rest:
        raise CheckpointError(_report(what, unknown_keys=sorted(rest)))
    zero = _fill_zero_biases(model, native)
    _load_native(model, native)
    model.mask2former_aside = aside
    return {"loaded": sorted(native), "aside": sorted(aside), "zero_init": zero, "unused": sorted(rest)}


def native_to_detectron2(model, aside: dict | None = None, prefixes: dict = D2_PREFIXES) -> dict[str, torch.Tensor]:
    """The Swin / pixel decoder / decoder of ``model`` in the published names (inverse map).

    ``relative_position_index`` buffers are regenerated; ``aside`` keys are written back."""
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for en in mask2former_entries(model, prefixes):
        if en.op == "split3":
            out[en.src] = torch.cat([own[d] for d in en.dst], 0).clone()
        else:
            out[en.src] = own[en.dst[0]].clone()
    if prefixes["fpn"] == "detectron2":
        for k, v in own.items():  # detectron2 has no FPN conv bias: exportable only when it is still zero
            m = re.fullmatch(r"pixel_decoder\.((?:adapter|layer)_\d+)\.0\.bias", k)
            if m and bool(v.abs().sum() > 0):
                raise CheckpointError(f"{k} is non-zero: a PSALM-style FPN conv bias has no place in detectron2's "
                                      "layout; export PSALM's layout (prefixes=PSALM_PREFIXES) instead")
    for i, w in enumerate([model.config.swin_window] * len(model.config.swin_depths)):
        for j in range(model.config.swin_depths[i]):
            out[f"{prefixes['backbone']}layers.{i}.blocks.{j}.attn.relative_position_index"] = _swin_relative_index(w)
    for k, v in (aside or getattr(model, "mask2former_aside", None) or {}).items():
        if not k.endswith("relative_position_index"):
            out.setdefault(k, v)
    return out


def export_detectron2(model, path: str | Path) -> Path:
    """Write the model's Swin + mask head as a detectron2-layout ``.pkl``."""
    return write_detectron2_pkl(path, native_to_detectron2(model))


# ----------------------------------------------------------------------------------------------
# PSALM's own checkpoints


def read_psalm_state(path: str | Path) -> dict[str, torch.Tensor]:
    """``pytorch_model.bin`` / ``*.safetensors`` / a folder (single or sharded, either format)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"PSALM checkpoint not found: {path}")
    if path.is_dir():
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            ip = path / index
            if ip.exists():
                sd = {}
                for f in sorted(set(json.loads(ip.read_text())["weight_map"].values())):
                    if not (path / f).exists():
                        raise CheckpointError(f"{ip} names shard {f}, which is missing")
                    sd.update(read_psalm_state(path / f))
                return sd
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (path / single).exists():
                return read_psalm_state(path / single)
        raise CheckpointError(f"{path} holds no model.safetensors / pytorch_model.bin (or their index)")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix == ".pkl":
        raise CheckpointError(f"{path} is a .pkl: load it with load_detectron2_pkl (the Mask2Former vision tower)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as a torch state dict (weights only): {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return obj


_PSALM_EXACT = {"seg_query": "seg_query"}


def psalm_to_native(model, sd: dict[str, torch.Tensor], what: str = "PSALM checkpoint"):
    """PSALM's module names -> (native, aside). Every key must be accounted for."""
    sd = dict(sd)
    native, aside, rest = detectron2_to_native(model, sd, PSALM_PREFIXES, what=what)
    own = model.state_dict()
    unknown, shapes = [], []
    for k, v in rest.items():
        dst = _PSALM_EXACT.get(k)
        if dst is None:
            for src, d in PSALM_TO_MASKLOOP.items():
                if k.startswith(src):
                    dst = d + k[len(src):]
                    break
        if dst is None or dst not in own:
            unknown.append(k)
        elif tuple(own[dst].shape) != tuple(v.shape):
            shapes.append(f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[dst].shape)}")
        else:
            native[dst] = v
    if unknown or shapes:
        raise CheckpointError(_report(what, unknown_keys=sorted(unknown), wrong_shapes=shapes))
    return native, aside


def load_psalm_checkpoint(model, path_or_state, strict: bool = True) -> dict:
    """Load a full PSALM checkpoint; every model tensor must be covered when ``strict`` (except
    the deformable projector when the file is a baseline one: it keeps its initialisation)."""
    sd = read_psalm_state(path_or_state) if isinstance(path_or_state, (str, Path)) else dict(path_or_state)
    what = str(path_or_state) if isinstance(path_or_state, (str, Path)) else "PSALM checkpoint"
    native, aside = psalm_to_native(model, sd, what)
    zero = _fill_zero_biases(model, native)
    if strict:
        missing = [k for k in model.state_dict() if k not in native and not _NATIVE_UNUSED.fullmatch(k)
                   and not k.startswith("deform_projector.") and not k.endswith("num_batches_tracked")
                   and k != "no_object_embed"]
        if missing:
            raise CheckpointError(_report(what, missing_keys=missing))
    _load_native(model, native)
    model.mask2former_aside = aside
    return {"loaded": sorted(native), "aside": sorted(aside), "zero_init": zero}


def load_mm_projector(model, path_or_state) -> dict:
    """PSALM's ``mm_projector.bin`` (``--pretrain_mm_mlp_adapter``): every ``*mm_projector.*`` key,
    matched by the name after ``mm_projector.`` as PSALM does; other keys are ignored and listed."""
    sd = read_psalm_state(path_or_state) if isinstance(path_or_state, (str, Path)) else dict(path_or_state)
    what = str(path_or_state) if isinstance(path_or_state, (str, Path)) else "mm_projector state"
    own = model.mm_projector.state_dict()
    got, unknown, shapes, other = {}, [], [], []
    for k, v in sd.items():
        if "mm_projector." not in k:
            other.append(k)
            continue
        sub = k.split("mm_projector.", 1)[1]
        if sub not in own:
            unknown.append(k)
        elif tuple(own[sub].shape) != tuple(v.shape):
            shapes.append(f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[sub].shape)}")
        else:
            got[sub] = v
    missing = [k for k in own if k not in got and not k.endswith("num_batches_tracked")]
    if unknown or shapes or missing:
        raise CheckpointError(_report(what, unknown_keys=unknown, missing_keys=missing, wrong_shapes=shapes))
    _load_native(model, {f"mm_projector.{k}": v for k, v in got.items()})
    return {"loaded": sorted(got), "ignored": sorted(other)}


# ----------------------------------------------------------------------------------------------
# Phi-1.5 (the LLM PSALM starts from) and the one-call start


def load_phi(model, path_or_state) -> dict:
    """A Hugging Face Phi folder / state (``model.*``, ``lm_head.*``, transformers' Phi names) into
    ``model.llm``. The checkpoint's vocabulary fills the first rows of the embedding and the LM
    head; the 8 PSALM tokens appended after it start at the mean of those rows (the embedding
    and the head each), so that they begin inside the vocabulary's span."""
    sd = read_psalm_state(path_or_state) if isinstance(path_or_state, (str, Path)) else dict(path_or_state)
    what = str(path_or_state) if isinstance(path_or_state, (str, Path)) else "Phi checkpoint"
    own = model.state_dict()
    native, unknown, shapes, grown = {}, [], [], []
    for k, v in sd.items():
        if not k.startswith(("model.", "lm_head.")):
            unknown.append(k)
            continue
        dst = "llm." + k
        if dst not in own:
            unknown.append(k)
            continue
        want = tuple(own[dst].shape)
        if tuple(v.shape) == want:
            native[dst] = v
        elif k in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias") and v.shape[0] <= want[0] \
                and tuple(v.shape[1:]) == want[1:]:
            full = own[dst].detach().clone().to(v.dtype)
            full[: v.shape[0]] = v
            full[v.shape[0]:] = v.float().mean(0).to(v.dtype)
            native[dst] = full
            grown.append(k)
        else:
            shapes.append(f"{k}: checkpoint {tuple(v.shape)}, model {want}")
    missing = [k for k in own if k.startswith("llm.") and k not in native]
    if unknown or shapes or missing:
        raise CheckpointError(_report(what, unknown_keys=unknown, missing_keys=missing, wrong_shapes=shapes))
    _load_native(model, native)
    return {"loaded": sorted(native), "grown": grown}


def load_pretrained_parts(model, llm=None, vision_tower=None, mm_projector=None, psalm_checkpoint=None) -> dict:
    """PSALM's start in one call, in its order: ``--model_name_or_path`` (Phi), ``--vision_tower``
    (the Mask2Former .pkl: Swin, pixel decoder, decoder layers), ``--pretrain_mm_mlp_adapter``;
    or a full PSALM checkpoint (applied last, over the parts). Returns each loader's report."""
    out = {}
    if llm:
        out["llm"] = load_phi(model, llm)
    if vision_tower:
        out["vision_tower"] = load_detectron2_pkl(model, vision_tower)
    if mm_projector:
        out["mm_projector"] = load_mm_projector(model, mm_projector)
    if psalm_checkpoint:
        out["psalm_checkpoint"] = load_psalm_checkpoint(model, psalm_checkpoint)
    return out

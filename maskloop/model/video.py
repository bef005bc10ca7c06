"""Referring video object segmentation, Sa2VA's protocol, on transformers' SAM2 video classes.

Sa2VA's video inference (``predict_forward`` with ``video=`` in its published HF model and the SAM2
extension it ships):

1. the MLLM sees up to 5 keyframes, each one 448 tile (no dynamic tiling), one image block per frame
   (``<img>`` + image tokens + ``</img>`` and a newline after each block), then the question
   ``"Please segment {expr}."`` (its evaluation's ``"<image>\\nPlease segment {}."``);
2. the hidden state at ``[SEG]`` goes through ``text_hidden_fcs``: that vector is SAM2's prompt on
   *every* keyframe — a sparse prompt of [the empty-point tokens, the language token], no mask prompt,
   no memory (each keyframe is an initial conditioning frame);
3. SAM2's memory (memory encoder, memory attention, object pointers) propagates the objects through
   every frame of the video; keyframe memories are encoded from the binarised keyframe masks (they count
   as user-given frames), tracked frames from their sigmoid masks.

Keyframes are the first 5 frames (Sa2VA: ``frame_idx < 5``) or 5 uniformly spread ones
(:data:`KEYFRAME_MODES`).  Several expressions of one video run as one batch: one LLM pass with a row per
expression, one SAM2 decoder call per keyframe with a prompt per object (SAM2's point-batch dimension),
shared image features per frame, and a batched memory encoder.

SAM2 runs in transformers' ``Sam2VideoModel`` with its ``Sam2VideoInferenceSession``; the image side
(Hiera, FPN, prompt encoder, mask decoder) is copied from our model's ``Sam2Model`` (same parameter
names) and the memory side from the checkpoint's kept-aside SAM2 memory weights through
:func:`memory_key_to_hf`.  Frames are streamed: a frame is added to the session when it is reached and
dropped after it is processed, and tracked outputs older than the memory window are dropped, so a long
video never holds all its frames (or all its per-frame outputs) on the device.

Absent objects: Sa2VA's patched SAM2 keeps the mask logits of a frame whose object score is negative
(its ``_forward_sam_heads`` leaves SAM2's NO_OBJ_SCORE fill commented out; the object pointer is still
replaced by the no-object pointer); transformers fills them with -1024.  We keep them, on keyframes and
tracked frames (``keep_absent_logits``; off: transformers' own behaviour).  Sa2VA's evaluation feeds a
question containing "?" without any image block (its prompt template is only applied when there is no
"?"); we always show the keyframes.

Memory width: SAM2's memory is 64 wide for every published shape; narrower presets (the tiny test and demo
models) get :func:`memory_dim` and a video model class that honours it (:func:`_video_model_class`).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskloop.model.checkpoints import SAM_PREFIX, CheckpointError, fill_template, template_regex
from maskloop.model.prompts import IMG_END, IMG_START, Fixed, Repeat

KEYFRAME_MODES = ("first", "uniform")
NUM_KEYFRAMES = 5
VIDEO_SEG_QUESTION = "Please segment {expr}."
_NO_OBJ_SCORE = -1024.0  # SAM2: the logits of an absent object


def keyframe_indices(num_frames: int, mode: str = "first", k: int = NUM_KEYFRAMES) -> list[int]:
    """The frames the MLLM sees: the first ``k`` (Sa2VA) or ``k`` spread uniformly (first and last kept)."""
    if num_frames < 1:
        raise ValueError("the video has no frames")
    if mode not in KEYFRAME_MODES:
        raise ValueError(f"unknown keyframe mode {mode!r}; choose one of {KEYFRAME_MODES}")
    k = min(k, num_frames)
    if mode == "first":
        return list(range(k))
    return sorted({int(round(x)) for x in np.linspace(0, num_frames - 1, k)})


# ----------------------------------------------------------------------------------------------
# key map: SAM2's original memory-module names (as kept aside by the checkpoint loader, after
# ``grounding_encoder.sam2_model.``) <-> transformers' Sam2VideoModel names.  {i} matches one index.

_MEMORY_RULES = [
    *[(f"memory_attention.layers.{{i}}.{{att}}.{c}_proj.{{p}}", f"memory_attention.layers.{{i}}.{{att}}.{c}_proj.{{p}}")
      for c in "qkv"],
    ("memory_attention.layers.{i}.{att}.out_proj.{p}", "memory_attention.layers.{i}.{att}.o_proj.{p}"),
    ("memory_attention.layers.{i}.linear{n}.{p}", "memory_attention.layers.{i}.linear{n}.{p}"),
    ("memory_attention.layers.{i}.norm{n}.{p}", "memory_attention.layers.{i}.layer_norm{n}.{p}"),
    ("memory_attention.norm.{p}", "memory_attention.layer_norm.{p}"),
    ("memory_encoder.pix_feat_proj.{p}", "memory_encoder.feature_projection.{p}"),
    ("memory_encoder.out_proj.{p}", "memory_encoder.projection.{p}"),
    ("memory_encoder.fuser.layers.{i}.dwconv.{p}", "memory_encoder.memory_fuser.layers.{i}.depthwise_conv.{p}"),
    ("memory_encoder.fuser.layers.{i}.norm.{p}", "memory_encoder.memory_fuser.layers.{i}.layer_norm.{p}"),
    ("memory_encoder.fuser.layers.{i}.pwconv{n}.{p}", "memory_encoder.memory_fuser.layers.{i}.pointwise_conv{n}.{p}"),
    ("memory_encoder.fuser.layers.{i}.gamma", "memory_encoder.memory_fuser.layers.{i}.scale"),
    ("memory_encoder.fuser.layers.{i}.g_weight", "memory_encoder.memory_fuser.layers.{i}.scale"),  # .gamma renamed
    ("maskmem_tpos_enc", "memory_temporal_positional_encoding"),
    ("no_mem_pos_enc", "no_memory_positional_encoding"),
    ("no_obj_ptr", "no_object_pointer"),
    ("obj_ptr_proj.layers.0.{p}", "object_pointer_proj.proj_in.{p}"),
    ("obj_ptr_proj.layers.1.{p}", "object_pointer_proj.layers.0.{p}"),
    ("obj_ptr_proj.layers.2.{p}", "object_pointer_proj.proj_out.{p}"),
    ("obj_ptr_tpos_proj.{p}", "temporal_positional_encoding_projection_layer.{p}"),
    ("mask_downsample.{p}", "mask_downsample.{p}"),
    ("no_obj_embed_spatial", "occlusion_spatial_embedding_parameter"),
]
# the mask downsampler: SAM2's Sequential ``encoder.{3j}`` conv / ``{3j+1}`` LayerNorm2d / ``{3j+2}`` GELU,
# then the final 1x1 conv at index 3 * n_layers
_DOWNSAMPLER = re.compile(r"memory_encoder\.mask_downsampler\.encoder\.(\d+)\.(\w+)")
_HF_DOWNSAMPLER = re.compile(r"memory_encoder\.mask_downsampler\.(?:layers\.(\d+)\.(conv|layer_norm)|final_conv)\.(\w+)")


_COMPILED = [(template_regex(a), a, template_regex(b), b) for a, b in _MEMORY_RULES]


def memory_key_to_hf(key: str, n_down_layers: int) -> str | None:
    """An original SAM2 memory key (no ``grounding_encoder.sam2_model.`` prefix) -> Sam2VideoModel key."""
    m = _DOWNSAMPLER.fullmatch(key)
    if m:
        j, p = int(m.group(1)), m.group(2)
        if j == 3 * n_down_layers:
            return f"memory_encoder.mask_downsampler.final_conv.{p}"
        if j % 3 == 0:
            return f"memory_encoder.mask_downsampler.layers.{j // 3}.conv.{p}"
        if j % 3 == 1:
            return f"memory_encoder.mask_downsampler.layers.{j // 3}.layer_norm.{p}"
        return None
    for rx, _, _, tgt in _COMPILED:
        m = rx.fullmatch(key)
        if m:
            return fill_template(tgt, m)
    return None


def hf_key_to_memory(key: str, n_down_layers: int) -> str | None:
    """The inverse of :func:`memory_key_to_hf` (``.gamma`` spelled as the published ``.g_weight``)."""
    m = _HF_DOWNSAMPLER.fullmatch(key)
    if m:
        j, kind, p = m.groups()
        idx = 3 * n_down_layers if j is None else 3 * int(j) + (0 if kind == "conv" else 1)
        return f"memory_encoder.mask_downsampler.encoder.{idx}.{p}"
    for _, src, rx, _ in _COMPILED:
        if src.endswith(".gamma"):
            continue
        m = rx.fullmatch(key)
        if m:
            return fill_template(src, m)
    return None


def _is_memory_param(name: str) -> bool:
    return not name.startswith(("vision_encoder.", "prompt_encoder.", "mask_decoder.", "shared_image_embedding."))\
        and name != "no_memory_embedding"


# ----------------------------------------------------------------------------------------------
# building the video model


SAM2_MEMORY_DIM = 64  # SAM2's memory width (``mem_dim``; memory encoder output, memory-attention key/value input)


def memory_dim(prompt_dim: int) -> int:
    """SAM2's memory width for a SAM2 of width ``prompt_dim``: 64 (SAM2's) when ``prompt_dim`` is a multiple of
    64, else the largest power of two dividing it (narrow test / demo presets).

    The constraint (SAM2's ``_prepare_memory_conditioned_features`` and transformers' port of it): an object
    pointer (``prompt_dim`` wide) enters the memory attention as ``prompt_dim / mem_dim`` tokens of ``mem_dim``
    channels, so ``mem_dim`` must divide ``prompt_dim``; the memory's sine position encoding takes
    ``mem_dim / 2`` features (even).
    """
    from maskloop.config import ConfigError

    mem = math.gcd(int(prompt_dim), SAM2_MEMORY_DIM)
    if mem < 4:
        raise ConfigError(f"sam2.prompt_dim={prompt_dim} leaves no SAM2 memory width: SAM2's memory needs a width "
                          f"that divides prompt_dim and is a multiple of 4 (prompt_dim a multiple of 4; 256 for "
                          f"the published Hiera-L)")
    return mem


def sam2_video_config(cfg, occlusion_embedding: bool = False, temporal_pointer_encoding: bool = False):
    """A ``Sam2VideoConfig``: our SAM2 image shapes + SAM2's memory shapes (Hiera-L's at 1024).

    Sa2VA's SAM2 is SAM2.0 (``add_tpos_enc_to_obj_ptrs=False``, no ``no_obj_embed_spatial``): both flags
    default off and are switched on when the checkpoint holds the corresponding weights.  The memory width
    is :func:`memory_dim` (64 for every published shape).  A model whose language prompts take SAM2's
    single-mask output (``sam2.language_mask="single"``: decoders trained from scratch, whose IoU head never
    learns to rank the multimask tokens) takes it on tracked frames too (``multimask_output_in_sam`` off).
    """
    from transformers import Sam2VideoConfig

    from maskloop.model.presets import sam2_config

    img = sam2_config(cfg)
    C = cfg.sam2.prompt_dim
    mem = memory_dim(C)
    grid = cfg.sam2.image_size // 16
    small = C < 256
    return Sam2VideoConfig(
        vision_config=img.vision_config.to_dict(),
        prompt_encoder_config=img.prompt_encoder_config.to_dict(),
        mask_decoder_config=img.mask_decoder_config.to_dict(),
        image_size=cfg.sam2.image_size,
        multimask_output_in_sam=cfg.sam2.language_mask == "best_iou",
        enable_occlusion_spatial_embedding=occlusion_embedding,
        enable_temporal_pos_encoding_for_object_pointers=temporal_pointer_encoding,
        memory_attention_hidden_size=C,
        memory_attention_feed_forward_hidden_size=2 * C if small else 2048,
        memory_attention_rope_feat_sizes=[grid, grid],
        memory_encoder_hidden_size=C,
        memory_encoder_output_channels=mem,
        mask_downsampler_embed_dim=C,
        memory_fuser_embed_dim=C,
        memory_fuser_intermediate_dim=4 * C,
    )


def _pick_mask(low_multi: torch.Tensor, iou: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM2's choice of one mask per object from the decoder's output: (B, n, M, g, g) logits and (B, n, M)
    predicted IoUs -> the highest-IoU mask when M > 1 (multimask), else mask 0, at low res (B, n, g, g)
    and bilinearly at ``size`` (B, n, size, size)."""
    if low_multi.shape[2] > 1:
        best = iou.argmax(-1)  # (B, n)
        low = torch.gather(low_multi, 2, best[..., None, None, None].expand(-1, -1, 1, *low_multi.shape[-2:]))[:, :, 0]
    else:
        low = low_multi[:, :, 0]
    high = F.interpolate(low.float(), size=(size, size), mode="bilinear", align_corners=False).to(low.dtype)
    return low, high


@functools.lru_cache(maxsize=None)
def _video_model_class():
    """transformers' ``Sam2VideoModel``, made to honour any memory width (:func:`memory_dim`).

    Two spots in transformers' port assume SAM2's published shapes, where ``mem_dim`` = 64 < ``prompt_dim``
    = 256; elsewhere it follows ``memory_encoder_output_channels``:

    * the memory attention's cross-attention reads keys / values of a hard-coded 64 channels (SAM2's config
      gives ``kv_in_dim: 64`` = ``mem_dim``): rebuilt here with ``mem_dim`` inputs;
    * object pointers (stored as (1, 1, C) per frame) are flattened to (tokens, batch, mem_dim) only on the
      ``mem_dim < C`` branch that splits them; when ``mem_dim == C`` (SAM2 leaves them whole, one token per
      frame) the stacked (n, 1, 1, C) pointers stay 4-D and the concatenation with the memories fails:
      flattened here the way the splitting branch does with one split.

    With ``mem_dim`` = 64 < ``prompt_dim`` (all published shapes) its modules and shapes are transformers' own;
    it also keeps absent objects' logits as Sa2VA does (``keep_absent_logits``, off: transformers' behaviour).
    """
    from transformers import Sam2VideoModel

    class MemoryWidthSam2VideoModel(Sam2VideoModel):
        #: Sa2VA's SAM2 keeps the mask logits of a frame whose object score is <= 0 (its patched
        #: ``_forward_sam_heads`` comments out SAM2's NO_OBJ_SCORE fill; the object pointer is still gated);
        #: transformers fills them with -1024.  True: Sa2VA's (the default); False: transformers' own.
        keep_absent_logits: bool = True

        def __init__(self, config):
            super().__init__(config)
            mem = config.memory_encoder_output_channels
            for layer in self.memory_attention.layers:
                att = layer.cross_attn_image
                if att.kv_in_dim != mem:
                    att.kv_in_dim = mem
                    for name in ("k_proj", "v_proj"):  # transformers' init of a Linear
                        lin = nn.Linear(mem, att.internal_dim)
                        nn.init.normal_(lin.weight, std=config.initializer_range)
                        nn.init.zeros_(lin.bias)
                        setattr(att, name, lin)

        def _process_object_pointers(self, temporal_offsets, pointer_tokens, max_object_pointers_to_use,
                                     batch_size, num_channels, device):
            ptrs, pos = super()._process_object_pointers(temporal_offsets, pointer_tokens,
                                                         max_object_pointers_to_use, batch_size, num_channels,
                                                         device)
            if ptrs is not None and ptrs.dim() != 3:  # mem_dim == C: one token per pointer
                ptrs = ptrs.reshape(-1, batch_size, self.mem_dim)
            return ptrs, pos

        def _single_frame_forward(self, *args, **kwargs):
            if not self.keep_absent_logits:
                return super()._single_frame_forward(*args, **kwargs)
            seen = []
            hook = self.mask_decoder.register_forward_hook(lambda mod, inp, out: seen.append(out))
            try:
                out = super()._single_frame_forward(*args, **kwargs)
            finally:
                hook.remove()
            if len(seen) == 1:  # the decoder ran (not a mask used as the output): its raw logits, same pick
                out.pred_masks, out.high_res_masks = _pick_mask(seen[0][0], seen[0][1], self.image_size)
            return out

    return MemoryWidthSam2VideoModel


def build_sam2_video(model) -> nn.Module:
    """transformers' ``Sam2VideoModel`` holding ``model``'s SAM2: image side copied from ``model.sam.sam``,
    memory side from ``model.sam_memory_weights`` (a loaded checkpoint's) when present.

    A model built from a preset (no checkpoint) has no memory weights: the memory modules then keep
    transformers' random initialisation (tests, benchmarks).  A checkpoint whose memory weights do not
    cover the video model, or have unknown names or wrong shapes, raises :class:`CheckpointError`.
    """
    extra = getattr(model, "sam_memory_weights", None) or {}
    extra = {k[len(SAM_PREFIX):] if k.startswith(SAM_PREFIX) else k: v for k, v in extra.items()}
    vcfg = sam2_video_config(model.cfg, occlusion_embedding="no_obj_embed_spatial" in extra,
                             temporal_pointer_encoding=any(k.startswith("obj_ptr_tpos_proj.") for k in extra))
    vm = _video_model_class()(vcfg)
    target = vm.state_dict()
    image_sd = model.sam.sam.state_dict()
    missing_img = sorted(k for k in target if not _is_memory_param(k) and k not in image_sd)
    if missing_img:
        raise CheckpointError(f"SAM2 image weights missing for the video model: {missing_img[:5]}")
    new = {k: image_sd[k] for k in target if not _is_memory_param(k)}
    if extra:
        n_down = len(vm.memory_encoder.mask_downsampler.layers)
        unknown, wrong = [], []
        for k, v in extra.items():
            hk = memory_key_to_hf(k, n_down)
            if hk is None or hk not in target:
                unknown.append(k)
            elif tuple(target[hk].shape) != tuple(v.shape):
                wrong.append(f"{k}: checkpoint {tuple(v.shape)} vs video model {tuple(target[hk].shape)}")
            else:
                new[hk] = v
        missing = sorted(k for k in target if _is_memory_param(k) and k not in new)
        if unknown or wrong or missing:
            lines = ["SAM2 memory weights do not match the video model:"]
            for name, items in (("unknown", unknown), ("wrong shape", wrong), ("missing", missing)):
                if items:
                    lines.append(f"  {name} ({len(items)}): " + ", ".join(items[:8]))
            raise CheckpointError("\n".join(lines))
    else:
        import warnings

        warnings.warn("the model holds no SAM2 memory weights (it was not loaded from a Sa2VA checkpoint): "
                      "video propagation uses randomly initialised memory modules", stacklevel=2)
    vm.load_state_dict(new, strict=False)
    dev = next(model.sam.parameters()).device
    return vm.to(dev).eval()


# ----------------------------------------------------------------------------------------------
# streamed session


def _session_class():
    from transformers import Sam2VideoInferenceSession

    class StreamedSession(Sam2VideoInferenceSession):
        """A session that knows the video's length up front but holds only the frames being processed.

        ``num_frames`` is the declared length (transformers uses it to cap the object pointers), frames
        are added with :meth:`add_new_frame` when reached, and :meth:`release` drops processed frames and
        tracked outputs older than the memory window.
        """

        def __init__(self, total_frames: int, keep: int, **kw):
            super().__init__(**kw)
            self.total_frames = total_frames
            self.keep = keep

        @property
        def num_frames(self) -> int:
            return self.total_frames

        def get_frame(self, frame_idx: int) -> torch.Tensor:
            if self.processed_frames is None or frame_idx not in self.processed_frames:
                raise RuntimeError(f"frame {frame_idx} was released or never added to the streamed session")
            return super().get_frame(frame_idx)

        def release(self, frame_idx: int) -> None:
            if self.processed_frames is not None:
                self.processed_frames.pop(frame_idx, None)
            old = frame_idx - self.keep
            for out in self.output_dict_per_obj.values():
                for t in [t for t in out["non_cond_frame_outputs"] if t < old]:
                    del out["non_cond_frame_outputs"][t]

    return StreamedSession


@dataclass
class Prompt:
    """SAM2 prompts of every object on one frame: ``language`` (n_obj, C) [SEG] embeddings or ``masks``
    (n_obj, G, G) binary masks at SAM input size, with the frame's ``pixels`` (3, G, G) uint8."""

    pixels: torch.Tensor
    language: torch.Tensor | None = None
    masks: torch.Tensor | None = None


class SAM2Propagator:
    """SAM2 video propagation of a fixed set of objects through a streamed video.

    ``propagate(frames, num_frames, prompts)``: ``prompts`` maps frame index -> :class:`Prompt` (frame 0
    must be one); ``frames`` yields the SAM input (3, G, G) uint8 of frames 0, 1, ... in order.  Yields
    ``(frame_idx, low-res mask logits (n_obj, g, g))``.
    """

    def __init__(self, sam_head, video_model, dtype: torch.dtype = torch.float32):
        self.head = sam_head  # our SAM2Head: its normalisation (mean / std on 0-255)
        self.vm = video_model
        self.dtype = dtype
        c = video_model.config
        self.keep = max(c.num_maskmem, c.max_object_pointers_in_encoder)

    @property
    def device(self) -> torch.device:
        return next(self.vm.parameters()).device

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(3, G, G) uint8 -> (3, G, G) SAM2-normalised float."""
        x = pixels.to(self.device, self.head.mean.dtype)[None]
        return ((x - self.head.mean) / self.head.std)[0].to(self.dtype)

    def new_session(self, num_frames: int, n_obj: int):
        dev = self.device
        s = _session_class()(num_frames, self.keep, inference_device=dev, inference_state_device=dev,
                             video_storage_device=dev, dtype=self.dtype)
        for i in range(n_obj):
            s.obj_id_to_idx(i)
        return s

    def _add_language(self, session, frame_idx: int, lang: torch.Tensor) -> None:
        """Keyframe outputs of every object from its language prompt, stored as conditioning outputs with
        memories encoded from the binarised masks.

        One SAM2 decoder call for all objects (objects on SAM2's point-batch axis; transformers' own
        ``_single_frame_forward`` handles one object per call).  The post-processing is SAM2's per object:
        multimask -> the best predicted IoU (its output token makes the object pointer), pointer of an
        absent object (score <= 0) -> ``no_object_pointer``; the logits of an absent object are kept as
        Sa2VA does (``keep_absent_logits``; transformers' own fill them with NO_OBJ_SCORE).
        """
        vm = self.vm
        n = lang.shape[0]
        feats, _ = vm._prepare_vision_features(session, frame_idx, 1)
        high_res = [x.permute(1, 2, 0).view(x.size(1), x.size(2), *s)
                    for x, s in zip(feats[:-1], vm.backbone_feature_sizes[:-1])]
        h, w = vm.backbone_feature_sizes[-1]
        pix = (feats[-1] + vm.no_memory_embedding).permute(1, 2, 0).view(1, vm.hidden_dim, h, w)  # no memory
        pts = torch.zeros(1, n, 1, 2, dtype=pix.dtype, device=pix.device)
        lbl = -torch.ones(1, n, 1, dtype=torch.int32, device=pix.device)
        sparse, dense = vm.prompt_encoder(input_points=pts, input_labels=lbl, input_boxes=None, input_masks=None)
        sparse = torch.cat([sparse, lang.view(1, n, 1, -1).to(sparse.dtype)], 2)  # (1, n, tokens + 1, C)
        multimask = vm._use_multimask(True, None)
        low_multi, iou, tokens, score = vm.mask_decoder(
            image_embeddings=pix,
            image_positional_embeddings=vm.get_image_wide_positional_embeddings(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            high_resolution_features=high_res,
        )  # (1, n, M, g, g), (1, n, M), (1, n, M, C), (1, n, 1)
        appear = score > 0
        if not getattr(vm, "keep_absent_logits", False):  # transformers' NO_OBJ_SCORE fill
            low_multi = torch.where(appear[..., None, None], low_multi, _NO_OBJ_SCORE)
        low, high = _pick_mask(low_multi, iou, vm.image_size)  # (1, n, g, g), (1, n, S, S)
        token = tokens[:, :, 0]
        if multimask and tokens.shape[2] > 1:
            best = iou.argmax(-1)  # (1, n)
            token = torch.gather(tokens, 2, best[..., None, None].expand(-1, -1, 1, tokens.shape[-1]))[:, :, 0]
        ptr = vm.object_pointer_proj(token)  # (1, n, C)
        lam = appear.to(ptr.dtype)
        ptr = lam * ptr + (1 - lam) * vm.no_object_pointer
        hr_list, sc_list = [], []
        for i in range(n):
            cur = {
                "pred_masks": low[:, i : i + 1],
                "object_pointer": ptr[:, i : i + 1],
                "high_res_masks": high[:, i : i + 1],
                "object_score_logits": score[:, i : i + 1],
            }
            session.store_output(i, frame_idx, output_value=cur, is_conditioning_frame=True)
            hr_list.append(cur["high_res_masks"])
            sc_list.append(cur["object_score_logits"])
        vm._batch_encode_memories(session, frame_idx, list(range(n)), hr_list, sc_list, [True] * n)

    def _add_masks(self, session, frame_idx: int, masks: torch.Tensor) -> None:
        """Mask prompts exactly as transformers' processor adds them, then the frame's conditioning pass."""
        S = self.vm.config.image_size
        for i, m in enumerate(masks):
            m = m.float().to(self.device)[None, None]
            if m.shape[-2:] != (S, S):
                m = (F.interpolate(m, size=(S, S), mode="bilinear", align_corners=False, antialias=True) >= 0.5).float()
            session.add_mask_inputs(i, frame_idx, m)
            session.remove_point_inputs(i, frame_idx)
        session.obj_with_new_inputs = list(range(len(masks)))
        self.vm(session, frame_idx=frame_idx)

    @torch.inference_mode()
    def propagate(self, frames: Iterable[torch.Tensor], num_frames: int,
                  prompts: dict[int, Prompt]) -> Iterator[tuple[int, torch.Tensor]]:
        if 0 not in prompts:
            raise ValueError("frame 0 must hold a prompt (propagation runs forward from it)")
        bad = [k for k in prompts if not 0 <= k < num_frames]
        if bad:
            raise ValueError(f"prompt frames {bad} are outside the video's {num_frames} frames")
        n_obj = {int((p.language if p.language is not None else p.masks).shape[0]) for p in prompts.values()}
        if len(n_obj) != 1:
            raise ValueError(f"every prompted frame must prompt the same objects; got counts {sorted(n_obj)}")
        session = self.new_session(num_frames, n_obj.pop())
        for k in sorted(prompts):
            p = prompts[k]
            session.add_new_frame(self.normalise(p.pixels), k)
            if p.language is not None:
                self._add_language(session, k, p.language.to(self.device))
            else:
                self._add_masks(session, k, p.masks)
            session.processed_frames.pop(k, None)
        n_seen = 0
        for idx, pixels in enumerate(frames):
            if idx >= num_frames:
                raise ValueError(f"the frame source yields more than the declared {num_frames} frames")
            session.add_new_frame(self.normalise(pixels), idx)
            out = self.vm(session, frame_idx=idx)
            session.release(idx)
            n_seen += 1
            yield idx, out.pred_masks[:, 0].float()  # (n_obj, g, g)
        if n_seen != num_frames:
            raise ValueError(f"the frame source yielded {n_seen} frames, {num_frames} were declared")


# ----------------------------------------------------------------------------------------------
# the MLLM side and the whole protocol


def video_seg_parts(builder, num_frames: int, expr, questions=None, with_answer: bool = True):
    """The parts of Sa2VA's video question: ``num_frames`` image blocks, then ``Please segment {expr}.``
    and (``with_answer``) the answer (``builder``'s style: "Sure, [SEG]." or the phrase answer)."""
    ids = builder.ids
    if questions is None:
        pre, suf = (ids(s) for s in VIDEO_SEG_QUESTION.split("{expr}"))
        n = expr.ids.shape[0] if hasattr(expr, "ids") else expr.embeds.shape[0]
        questions = [(pre, suf + builder._suffix_ids, builder.fixed_seg_answer)] * n
    return _frame_blocks(builder, num_frames) + builder.seg_parts(expr, questions, with_answer=with_answer)[3:]


def _frame_blocks(builder, num_frames: int) -> list:
    """The user turn's start and ``num_frames`` image blocks (``<img>`` + image tokens + ``</img>\n`` each)."""
    ids = builder.ids
    blocks = builder.image_parts()
    for _ in range(num_frames - 1):
        blocks += [Fixed(ids(IMG_START)), Repeat(builder.img_ctx_id, builder.n_img), Fixed(ids(IMG_END + "\n"))]
    return blocks


def video_question_parts(builder, num_frames: int, texts: list[str]) -> list:
    """Sa2VA's video prompt for generation (no answer): the image blocks, then each row's
    ``Please segment {expr}.`` + the template's end of the user turn, tokenised as one string (as Sa2VA
    tokenises its whole input text)."""
    from maskloop.model.prompts import Ragged

    rows = [builder.ids(VIDEO_SEG_QUESTION.format(expr=t)) + list(builder._suffix_ids) for t in texts]
    return _frame_blocks(builder, num_frames) + [Ragged.from_lists(rows, builder.pad_id)]


VIDEO_PROTOCOLS = ("generate", "teacher_forced")


@torch.no_grad()
def seg_prompts(model, key_pixel_values: torch.Tensor, texts: list[str], protocol: str = "generate",
                max_new_tokens: int = 32) -> dict:
    """Keyframes (F, 3, S, S) + expressions -> SAM2's language prompt of each expression, one LLM pass.

    ``protocol="generate"`` (Sa2VA's ``predict_forward``): the model answers greedily and the prompt is
    the hidden state at the first ``[SEG]`` of its answer (:func:`maskloop.eval.refer.first_seg_prompts`);
    an answer without ``[SEG]`` gives no prompt (Sa2VA's evaluation then writes empty masks).
    ``"teacher_forced"``: the answer "Sure, [SEG]." (or the model's phrase answer) is given, every
    expression gets a prompt.  Returns ``prompts`` (M, C), ``rows`` (M,) (the expressions prompted, in
    order) and ``answers`` (the generated answers; None when teacher forced)."""
    from maskloop.eval.refer import first_seg_prompts

    if protocol not in VIDEO_PROTOCOLS:
        raise ValueError(f"unknown video protocol {protocol!r}; choose one of {VIDEO_PROTOCOLS}")
    feats = model.image_tokens(key_pixel_values)  # (F, N, D)
    Fk, N, D = feats.shape
    n = len(texts)
    texts = [t.strip() for t in texts]
    image_feats = feats.reshape(1, Fk * N, D).expand(n, -1, -1)
    if protocol == "generate":
        def parts_of(rows):
            return video_question_parts(model.builder, Fk, texts if rows is None else [texts[i] for i in rows.tolist()])

        r = first_seg_prompts(model, parts_of, image_feats, None, max_new_tokens)
        gen = r["gen"]
        answers = [model.tokenizer.decode(gen.ids[i, : int(gen.lengths[i])].tolist(), skip_special_tokens=False)
                   for i in range(n)]
        prompts = r["prompts"] if r["prompts"] is not None else feats.new_zeros(0, model.cfg.sam2.prompt_dim)
        return {"prompts": prompts, "rows": r["rows"], "answers": answers}
    expr = model.builder.expressions(texts)
    parts = video_seg_parts(model.builder, Fk, expr)
    emb, asm = model.build_inputs(parts, image_feats)
    hidden = model.run_llm(emb, asm.attention_mask, asm.position_ids)
    prompts, rows = model.seg_prompt_embeds(hidden, asm.input_ids)  # one [SEG] per expression
    if rows.shape[0] != n:
        raise RuntimeError(f"{rows.shape[0]} [SEG] prompts for {n} expressions")
    return {"prompts": prompts, "rows": rows, "answers": None}


class VideoSegmenter:
    """Sa2VA's referring video segmentation with a :class:`~maskloop.model.grounded.GroundedMLLM`.

    ``segment(frame_at, frames, num_frames, texts)`` with ``frame_at(i) -> PIL image`` (random access, used
    for the keyframes) and ``frames()`` (a sequential iterator over all frames, the stream) yields
    ``(frame_idx, masks (n_texts, H, W) bool)`` at the frames' own size.  ``protocol``: how the [SEG]
    prompt is read (:func:`seg_prompts`; ``generate``, Sa2VA's, by default): an expression whose answer
    holds no ``[SEG]`` gets empty masks on every frame, counted in ``no_seg``; ``answers`` holds the last
    call's generated answers and ``prompted`` whether each expression got a prompt.
    """

    def __init__(self, model, keyframes: str = "first", num_keyframes: int = NUM_KEYFRAMES,
                 dtype: torch.dtype | None = None, protocol: str = "generate", max_new_tokens: int = 32):
        from maskloop.data.transforms import SampleTransform

        if keyframes not in KEYFRAME_MODES:
            raise ValueError(f"unknown keyframe mode {keyframes!r}; choose one of {KEYFRAME_MODES}")
        if protocol not in VIDEO_PROTOCOLS:
            raise ValueError(f"unknown video protocol {protocol!r}; choose one of {VIDEO_PROTOCOLS}")
        self.model = model
        self.keyframes = keyframes
        self.num_keyframes = num_keyframes
        self.protocol = protocol
        self.max_new_tokens = max_new_tokens
        self.no_seg = 0
        self.answers: list[str] | None = None
        self.prompted: list[bool] = []
        c = model.cfg
        self.transform = SampleTransform(image_size=c.vision.image_size, sam_size=c.sam2.image_size,
                                         prompt_grid=c.prompt_grid)
        vm = build_sam2_video(model)
        dtype = dtype or next(model.sam.parameters()).dtype
        self.propagator = SAM2Propagator(model.sam, vm.to(dtype), dtype)

    @torch.no_grad()
    def segment(self, frame_at: Callable[[int], object], frames: Callable[[], Iterable], num_frames: int,
                texts: list[str]) -> Iterator[tuple[int, np.ndarray]]:
        if not texts or any(not t or not t.strip() for t in texts):
            raise ValueError("every --text must be a non-empty expression")
        dev = next(self.model.parameters()).device
        keys = keyframe_indices(num_frames, self.keyframes, self.num_keyframes)
        key_items = {k: self.transform.image(frame_at(k)) for k in keys}
        W, H = frame_at(keys[0]).size
        pv = torch.stack([key_items[k]["pixel_values"] for k in keys]).to(dev)
        r = seg_prompts(self.model, pv, texts, self.protocol, self.max_new_tokens)
        rows = r["rows"].tolist()
        self.answers = r["answers"]
        self.prompted = [i in rows for i in range(len(texts))]
        self.no_seg += len(texts) - len(rows)
        n = len(texts)
        if not rows:  # no expression prompted: empty masks, the frames still read (and counted)
            seen = 0
            for idx, _ in enumerate(frames()):
                seen += 1
                yield idx, np.zeros((n, H, W), bool)
            if seen != num_frames:
                raise ValueError(f"the frame source yielded {seen} frames, {num_frames} were declared")
            return
        prompts = {k: Prompt(key_items[k]["g_pixel_values"], language=r["prompts"]) for k in keys}
        stream = (self.transform.image(img)["g_pixel_values"] for img in frames())
        for idx, low in self.propagator.propagate(stream, num_frames, prompts):
            up = F.interpolate(low[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
            if len(rows) == n:
                yield idx, (up > 0).cpu().numpy()
            else:
                out = np.zeros((n, H, W), bool)
                out[rows] = (up > 0).cpu().numpy()
                yield idx, out


__all__ = [
    "KEYFRAME_MODES",
    "NUM_KEYFRAMES",
    "Prompt",
    "SAM2Propagator",
    "VIDEO_PROTOCOLS",
    "VIDEO_SEG_QUESTION",
    "VideoSegmenter",
    "build_sam2_video",
    "hf_key_to_memory",
    "keyframe_indices",
    "memory_key_to_hf",
    "sam2_video_config",
    "seg_prompts",
    "video_question_parts",
    "video_seg_parts",
]

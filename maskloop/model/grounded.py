"""The Sa2VA-family grounded MLLM: InternVL (vision tower, mlp1, Qwen2) + SAM2 + the [SEG] head.

Data flow (docs/architecture.md)::

    pixel_values (B,3,S,S) -> InternViT (frozen) -> pixel shuffle -> mlp1 -> image tokens (B,N,D)
    prompt parts -> token ids -> embeddings; <IMG_CONTEXT> positions <- image tokens, then region cells
    LLM (frozen base + LoRA) -> hidden (B,L,D)
    hidden at [SEG] -> text_hidden_fcs -> (B,C) sparse prompt -> SAM2 mask decoder -> mask logits
    g_pixel_values (B,3,G,G) uint8 -> SAM2 Hiera (frozen) -> features, computed once per image

Forward paths:
  (a) :meth:`segment` with the expression as tokens;   (b) the same with the expression as embeddings;
  (c) :meth:`caption_logits` teacher-forced region captioning;
  (d) :meth:`generate` batched greedy decoding with a KV cache, fixed-length padded output.

All modules come from transformers (``InternVLForConditionalGeneration``, ``Sam2Model``) and peft
(LoRA).  The new tokens' embedding and lm_head rows live in two small trainable tables
(``new_embed``, ``new_head``) laid over the frozen matrices, so training them needs no optimizer state
for the whole vocabulary.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

from maskloop.checks import check_on_device
from maskloop.config import ModelConfig
from maskloop.errors import ConfigError
from maskloop.model import losses
from maskloop.model.presets import internvl_config, sam2_config
from maskloop.model.prompts import (
    ALL_SPECIAL,
    IMG_CONTEXT,
    NEW_TOKENS,
    Embeds,
    Fixed,
    Part,
    PromptBuilder,
    Ragged,
    Repeat,
    add_special_tokens,
)
from maskloop.model.region import inject_visual_tokens, region_slots
from maskloop.model.sam2_head import SAM2Head, SamFeatures
from maskloop.model.sequence import Assembled, assemble, causal_padding_mask, host_once

TRAINABLE_GROUPS = ("lora", "projector", "text_hidden_fcs", "sam2_decoder", "new_tokens")


@dataclass
class Generated:
    ids: torch.Tensor  # (B, T) generated ids, end token included, pad_id after it
    lengths: torch.Tensor  # (B,) tokens before the end token (the caption length)
    finished: torch.Tensor  # (B,) bool: the end token was produced within T


def _sdpa_without_window(config) -> bool:
    """Attention through SDPA with every layer full and causal (no sliding window): a boolean 4-D mask means
    to it exactly what transformers' own mask creation makes of the padding mask (:func:`causal_padding_mask`)."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return config._attn_implementation == "sdpa" and window is None


def compile_forwards(modules, **kwargs) -> int:
    """``torch.compile`` each module's ``forward`` in place (an instance attribute over its class's method).

    What dynamo compiles is the class's own ``forward``, so the LLM layers, the ViT layers and the SAM2 blocks
    each get their own compiled-code cache and recompilation budget, and the layers of one class share one
    graph (the weights are its inputs).  Compiling the module itself (``Module.compile()``) or transformers'
    checkpointing wrapper of ``forward`` (the newer ``GradientCheckpointingLayer``) would key all three on one
    shared code object: one cache whose guards are searched on every call and whose budget (8 variants by
    default) runs out, after which the remaining modules run eagerly.  A layer with transformers' own
    gradient checkpointing on keeps that wrapper; module hooks (FSDP2's) stay outside the compiled code."""
    from torch._dynamo import config as dynamo_config

    # SAM2's Hiera-L alone needs about ten variants (stage widths, windows, pooling, global blocks)
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    n = 0
    for m in modules:
        m.forward = torch.compile(_own_forward(m).__get__(m), **kwargs)
        n += 1
    return n


def _own_forward(m):
    """The module class's ``forward`` under transformers' pass-through wrappers, whose one code object every
    layer class shares: the checkpointing wrapper (unless that checkpointing is on) and ``deprecate_kwarg``'s
    argument renaming (callers here use the current names)."""
    fwd = type(m).forward
    while getattr(fwd, "__wrapped__", None) is not None:
        where = fwd.__code__.co_filename.replace("\\", "/")
        if where.endswith("transformers/modeling_layers.py") and not getattr(m, "gradient_checkpointing", False):
            fwd = fwd.__wrapped__
        elif where.endswith("transformers/utils/deprecation.py"):
            fwd = fwd.__wrapped__
        else:
            break
    return fwd


class GroundedMLLM(nn.Module):
    #: every assembled prompt's length is padded up to a multiple of this (left padding; the Trainer sets it
    #: from ``pad_length_to``: few distinct shapes for CUDA-graph replays)
    length_multiple: int = 1

    def __init__(self, cfg: ModelConfig, tokenizer):
        super().__init__()
        from transformers import InternVLForConditionalGeneration

        cfg.validate()
        self.cfg = cfg
        self.tokenizer = tokenizer
        add_special_tokens(tokenizer)
        if len(tokenizer) > cfg.llm.vocab_size:
            cfg.llm.vocab_size = len(tokenizer)
        self.internvl = InternVLForConditionalGeneration(
            internvl_config(cfg, tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
        )
        self.sam = SAM2Head(sam2_config(cfg), cfg.sam2.pad_point_tokens, cfg.sam2.language_mask)
        D, C = cfg.llm.hidden_size, cfg.sam2.prompt_dim
        self.text_hidden_fcs = nn.Sequential(nn.Linear(D, D), nn.ReLU(inplace=True), nn.Linear(D, C), nn.Dropout(0.0))

        new_ids = torch.tensor([tokenizer.convert_tokens_to_ids(t) for t in NEW_TOKENS], dtype=torch.long)
        slot = torch.full((cfg.llm.vocab_size,), -1, dtype=torch.long)
        slot[new_ids] = torch.arange(len(new_ids))
        self.register_buffer("new_token_ids", new_ids, persistent=False)
        self.register_buffer("new_token_slot", slot, persistent=False)
        self.new_embed = nn.Parameter(self.embed_matrix.detach()[new_ids].clone())
        if cfg.llm.tie_word_embeddings:  # lm_head is the embedding matrix: so are the new tokens' rows
            self.new_head = self.new_embed
        else:
            self.new_head = nn.Parameter(self.head_matrix.detach()[new_ids].clone())

        if cfg.lora is not None:
            self._inject_lora()
        self.builder = PromptBuilder(tokenizer, cfg.num_image_tokens, cfg.template, cfg.seg_answer)
        self.set_trainable("default")
        self._cache_kw = _cache_kwarg(self.llm)

    # ------------------------------------------------------------------ parts
    @property
    def vision(self) -> nn.Module:
        return self.internvl.model.vision_tower

    @property
    def projector(self) -> nn.Module:  # "mlp1"
        return self.internvl.model.multi_modal_projector

    @property
    def llm(self) -> nn.Module:
        return self.internvl.model.language_model

    @property
    def embed_matrix(self) -> torch.Tensor:
        return self.llm.get_input_embeddings().weight

    @property
    def head_matrix(self) -> torch.Tensor:
        return self.internvl.lm_head.weight

    def _inject_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        lc = self.cfg.lora
        inject_adapter_in_model(
            LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules)),
            self.llm,
        )

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Every parameter in exactly one named group (the trainable groups + 'frozen_base')."""
        groups: dict[str, list] = {g: [] for g in (*TRAINABLE_GROUPS, "vision", "llm_base", "sam2_encoder")}
        for name, p in self.named_parameters():
            if "lora_" in name:
                g = "lora"
            elif name.startswith("internvl.model.multi_modal_projector."):
                g = "projector"
            elif name.startswith("text_hidden_fcs."):
                g = "text_hidden_fcs"
            elif name.startswith("sam.sam.mask_decoder."):
                g = "sam2_decoder"
            elif name in ("new_embed", "new_head"):
                g = "new_tokens"
            elif name.startswith("internvl.model.vision_tower."):
                g = "vision"
            elif name.startswith("sam."):
                g = "sam2_encoder"
            else:
                g = "llm_base"
            groups[g].append((name, p))
        return groups

    def set_trainable(self, policy: str | tuple[str, ...] = "default") -> list[str]:
        """'default' = LoRA, mlp1, text_hidden_fcs, SAM2 mask decoder, new-token rows; 'all' = everything;
        or the group names (a tuple, or one string joined by commas).  Returns the trainable parameter names."""
        groups = self.parameter_groups()
        if isinstance(policy, str) and policy not in ("default", "all"):  # "lora,projector": names, not letters
            policy = tuple(g.strip() for g in policy.split(",") if g.strip())
        if policy == "default":
            chosen = set(TRAINABLE_GROUPS)
        elif policy == "all":
            chosen = set(groups)
        else:
            unknown = set(policy) - set(groups)
            if unknown:
                raise ConfigError(f"freeze: unknown parameter group(s) {sorted(unknown)}; groups are {sorted(groups)}")
            chosen = set(policy)
        if self.cfg.lora is None and policy == "default":
            chosen |= {"llm_base"}
        names = []
        for g, params in groups.items():
            for name, p in params:
                p.requires_grad_(g in chosen)
                if g in chosen:
                    names.append(name)
        return names

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ encoders
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) ImageNet-normalised -> pixel-shuffled ViT features (B, N, 4*Dv).

        The tower is frozen, so these can be computed once and shared by the teacher and the student.
        """
        vt = self.vision
        frozen = not any(p.requires_grad for p in vt.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            x = pixel_values.to(vt.embeddings.patch_embeddings.projection.weight.dtype)
            sel = self.cfg.vision.select_layer
            if sel == -1:
                feats = vt(pixel_values=x).last_hidden_state[:, 1:]  # drop CLS: (B, P*P, Dv)
            else:  # InternVL's select_layer: hidden_states[sel] (0 = the embeddings)
                feats = vt(pixel_values=x, output_hidden_states=True).hidden_states[sel][:, 1:]
        B, _, Dv = feats.shape
        side = self.cfg.patch_grid
        feats = self.internvl.model.pixel_shuffle(feats.reshape(B, side, side, Dv), scale_factor=self.cfg.vision.downsample_ratio)
        return feats.reshape(B, -1, feats.shape[-1])

    def image_tokens(self, pixel_values: torch.Tensor | None = None, vit_feats: torch.Tensor | None = None) -> torch.Tensor:
        """Projected image tokens (B, N, D) from pixels, or from precomputed :meth:`vision_features`."""
        if vit_feats is None:
            vit_feats = self.vision_features(pixel_values)
        w = self.projector.linear_1.weight
        return self.projector(vit_feats.to(w.dtype) if not torch.is_autocast_enabled() else vit_feats)

    def to_training_dtype(self, dtype: torch.dtype) -> GroundedMLLM:
        """Frozen weights in ``dtype`` (e.g. bf16), trained weights kept in fp32 for the optimizer.

        With a low-precision ``dtype`` the model is meant to run under ``torch.autocast`` (as the trainer
        does): the LoRA layers then stop casting their bf16 input to the fp32 adapter weight's dtype —
        autocast would cast it straight back for the matmul, so the round trip (two full-activation copies
        per adapted projection) changes no value and only costs bandwidth.
        """
        for p in self.parameters():
            p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
        self.set_lora_input_cast(dtype == torch.float32)
        return self

    def set_lora_input_cast(self, enabled: bool) -> int:
        """Switch peft's per-layer input cast to the adapter dtype; returns the number of LoRA layers."""
        n = 0
        for m in self.llm.modules():
            if hasattr(m, "cast_input_dtype_enabled") and hasattr(m, "lora_A"):
                m.cast_input_dtype_enabled = enabled
                n += 1
        return n

    def compile_llm_layers(self, **kwargs) -> int:
        """``torch.compile`` every LLM decoder layer in place (regional compilation: one graph per layer,
        shared by all layers; fuses the LoRA, norm and rotary elementwise ops).  Returns the layer count.
        ``kwargs`` go to ``torch.compile`` (``mode="reduce-overhead"``: replayed as CUDA graphs)."""
        return compile_forwards(self.llm.layers, **kwargs)

    def compile_encoders(self, **kwargs) -> int:
        """``torch.compile`` every InternViT encoder layer and every SAM2 Hiera block in place (regional
        compilation, as :meth:`compile_llm_layers`).  Returns the number of modules compiled."""
        return compile_forwards(list(self.vision.encoder.layer) + list(self.sam.sam.vision_encoder.backbone.blocks),
                                **kwargs)

    def uncompile(self) -> None:
        """Undo :meth:`compile_llm_layers` / :meth:`compile_encoders` (the modules run eagerly again)."""
        for m in list(self.llm.layers) + list(self.vision.encoder.layer) + list(self.sam.sam.vision_encoder.backbone.blocks):
            m.__dict__.pop("forward", None)
            m._compiled_call_impl = None

    def sam_features(self, g_pixel_values: torch.Tensor | None = None, maps: list[torch.Tensor] | None = None) -> SamFeatures:
        """SAM2 features of images (B, 3, G, G), or of :meth:`sam_backbone`'s maps computed ahead."""
        return self.sam.features(maps if maps is not None else self.sam_backbone(g_pixel_values))

    def sam_backbone(self, g_pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """SAM2's image encoder + neck (frozen by default): its FPN maps, the input of :meth:`sam_features`."""
        return self.sam.backbone(g_pixel_values)

    # ------------------------------------------------------------------ token embedding / head
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...,) -> (..., D) with the new-token rows taken from ``new_embed``."""
        emb = self.llm.get_input_embeddings()(ids)
        slot = self.new_token_slot[ids]
        is_new = slot >= 0
        return torch.where(is_new[..., None], self.new_embed[slot.clamp(min=0)].to(emb.dtype), emb)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) -> logits (..., V) with the new-token columns from ``new_head``."""
        logits = self.internvl.lm_head(hidden)
        new = hidden @ self.new_head.to(hidden.dtype).t()  # (..., n_new)
        return _index_copy_last(logits, self.new_token_ids, new)

    def merged_embed_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full embedding and lm_head matrices with the new rows written in (for export)."""
        E = self.embed_matrix.detach().clone()
        H = self.head_matrix.detach().clone()
        E[self.new_token_ids] = self.new_embed.detach().to(E.dtype)
        H[self.new_token_ids] = self.new_head.detach().to(H.dtype)
        return E, H

    # ------------------------------------------------------------------ sequence building
    def build_inputs(
        self, parts: list[Part], image_feats: torch.Tensor, prompt_masks: torch.Tensor | None = None,
        n_image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Assembled]:
        """Assemble parts for a batch; returns inputs_embeds (B, L, D) and the layout.

        image_feats (B, N, D) (row b's first ``n_image[b]`` when tiled, :meth:`pack_tiles`); prompt_masks
        (B, g, g) or (B, R, g, g) region slots (see :func:`~maskloop.model.region.inject_visual_tokens`)."""
        B = image_feats.shape[0]
        asm = assemble(parts, B, self.builder.pad_id, image_feats.device, length_multiple=self.length_multiple)
        emb = self.embed_tokens(asm.input_ids)
        L, D = emb.shape[1:]
        for i, part in asm.embeds:
            # scattered into a spare last column for a row's unused slots (no boolean selection: no host sync)
            pos, valid = asm.positions[i]
            at = torch.where(valid, pos, L)
            placed = emb.new_zeros(B, L + 1, D).scatter(1, at[..., None].expand(-1, -1, D), part.embeds.to(emb.dtype))
            hit = torch.zeros(B, L + 1, dtype=torch.bool, device=emb.device).scatter(1, at, valid)
            emb = torch.where(hit[:, :L, None], placed[:, :L], emb)
        emb = inject_visual_tokens(emb, asm.input_ids, self.builder.img_ctx_id, image_feats, prompt_masks, n_image)
        return emb, asm

    # ------------------------------------------------------------------ tiles (InternVL dynamic tiling)
    @staticmethod
    def pack_tiles(tile_feats: torch.Tensor, num_tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tile image tokens (T, N, D), tiles of a batch flat (sample-major, :mod:`maskloop.data.tiles`),
        num_tiles (B,) -> per-row tokens (B, max n * N, D) (zero padded after a row's own) and their counts
        n_image (B,) = num_tiles * N."""
        T, N, D = tile_feats.shape
        num_tiles = num_tiles.to(tile_feats.device).long()
        if int(num_tiles.sum()) != T:
            raise ValueError(f"num_tiles {num_tiles.tolist()} sum to {int(num_tiles.sum())} but {T} tiles were given")
        B, most = num_tiles.shape[0], int(num_tiles.max())
        rows = torch.repeat_interleave(torch.arange(B, device=tile_feats.device), num_tiles)
        slot = torch.arange(T, device=tile_feats.device) - (torch.cumsum(num_tiles, 0) - num_tiles)[rows]
        out = tile_feats.new_zeros(B, most, N, D).index_put((rows, slot), tile_feats)
        return out.reshape(B, most * N, D), num_tiles * N

    def image_inputs(self, pixel_values, image_feats=None, num_tiles=None):
        """(image_feats (B, N', D), n_image (B,) or None) for the prompt builders and :meth:`build_inputs`.

        Without ``num_tiles``: one tile a row, pixel_values (B, 3, S, S) / image_feats (B, N, D).  With it:
        pixel_values (T, 3, S, S) / image_feats (T, N, D) are the batch's tiles, packed per row."""
        if image_feats is None:
            image_feats = self.image_tokens(pixel_values)
        if num_tiles is None:
            return image_feats, None
        return self.pack_tiles(image_feats, num_tiles)

    def run_llm(self, inputs_embeds, attention_mask, position_ids, cache=None) -> torch.Tensor:
        kwargs = {self._cache_kw: cache, "use_cache": cache is not None}
        if cache is None and attention_mask is not None and attention_mask.ndim == 2 and _sdpa_without_window(self.llm.config):
            attention_mask = causal_padding_mask(attention_mask)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return out.last_hidden_state

    def _lm_loss(self, hidden: torch.Tensor, asm: Assembled) -> torch.Tensor:
        """Mean CE over the target tokens: logits only at the positions predicting them (``asm.targets``)."""
        pos, used, ids = asm.targets
        h = torch.gather(hidden, 1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
        return losses.masked_lm_loss(self.lm_logits(h), ids, used)

    def _one_seg_each(self, parts: list[Part], batch: int) -> bool:
        """Whether the host can tell, without reading the device, that every row of ``parts`` holds exactly one
        [SEG] (every part with token ids is fixed or held on the CPU; embeddings hold none)."""
        seg, count = self.builder.seg_id, torch.zeros(batch, dtype=torch.long)
        for p in parts:
            if isinstance(p, Fixed):
                count += p.ids.count(seg)
            elif isinstance(p, Repeat):
                if p.token_id == seg:
                    return False
            elif isinstance(p, Ragged):
                if p.ids.device.type != "cpu" or p.lengths.device.type != "cpu":
                    return False
                real = torch.arange(p.ids.shape[1])[None] < p.lengths[:, None]
                count += ((p.ids == seg) & real).sum(1)
        return bool((count == 1).all())

    # ------------------------------------------------------------------ (a)/(b) referring segmentation
    def seg_prompt_embeds(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                          allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden state at every [SEG] -> text_hidden_fcs: prompts (M, C) and their rows (M,), in order
        (row-major, then position).  A row may hold any number of [SEG], 0 included.  ``allowed`` (B, L)
        bool restricts the positions searched (e.g. to a generated answer)."""
        is_seg = input_ids == self.builder.seg_id
        if allowed is not None:
            is_seg = is_seg & allowed
        rows = is_seg.nonzero()[:, 0]
        return self.text_hidden_fcs(hidden[is_seg]), rows

    def decode_seg(self, hidden: torch.Tensor, input_ids: torch.Tensor, sam_feats: SamFeatures,
                   gt_masks: torch.Tensor | None = None, allowed: torch.Tensor | None = None,
                   one_each: bool = False) -> dict[str, torch.Tensor]:
        """One mask per [SEG] of the batch: ``mask_logits`` (M, G, G), ``low_res``, ``seg_rows`` (M,) (the
        row of each), ``seg_counts`` (B,); given ``gt_masks`` (M, G, G) — the targets of the [SEG]s in the
        same order — the mask losses (mean over the M masks; 0 with a graph when M = 0).  ``one_each``: the
        caller knows that every row holds exactly one [SEG] (:meth:`_one_seg_each`; checked on the device)."""
        B = input_ids.shape[0]
        if one_each and allowed is None:  # the host knows every row holds one [SEG]: no host sync to find them
            is_seg = input_ids == self.builder.seg_id
            check_on_device((is_seg.sum(1) == 1).all(), "expected exactly one [SEG] in every row")
            rows = torch.arange(B, device=input_ids.device)
            prompt = self.text_hidden_fcs(hidden[rows, is_seg.int().argmax(1)])
            M, counts = B, torch.ones(B, dtype=torch.long, device=input_ids.device)
        else:
            prompt, rows = self.seg_prompt_embeds(hidden, input_ids, allowed)  # (M, C), (M,)
            M = rows.shape[0]
            counts = torch.bincount(rows, minlength=B)
            one_each = M == B and bool((counts == 1).all())
        feats = sam_feats if one_each else sam_feats.index(rows)
        if M:
            low = self.sam.decode(feats, prompt[:, None])
        else:
            side = sam_feats.embed.shape[-1] * 4
            low = prompt.new_zeros(0, side, side) + 0.0 * prompt.sum()
        out = {"low_res": low, "mask_logits": self.sam.upsample(low), "seg_rows": rows, "seg_counts": counts}
        if gt_masks is not None:
            if gt_masks.shape[0] != M:
                raise ValueError(
                    f"{gt_masks.shape[0]} target masks for {M} [SEG] tokens (per row: {counts.tolist()}): give one "
                    "target mask per [SEG], in order (several masks of a sample: flat, with num_masks)"
                )
            c = self.cfg
            if M == 0:
                zero = low.sum() * 0.0 + sum(p.sum() * 0.0 for p in self.text_hidden_fcs.parameters())
                out.update({"loss_bce": zero, "loss_dice": zero, "loss_mask": zero})
            else:
                out.update(
                    losses.mask_losses(
                        low,
                        gt_masks,
                        c.bce_weight,
                        c.dice_weight,
                        num_points=c.num_points if c.point_sample_loss else None,
                        oversample_ratio=c.oversample_ratio,
                        importance_ratio=c.importance_sample_ratio,
                    )
                )
        return out

    @staticmethod
    def first_mask_per_row(mask_logits: torch.Tensor, seg_rows: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask of each row's first [SEG] (Sa2VA's referring evaluation keeps ``prediction_masks[0]``):
        (logits (B, G, G), -inf for a row without [SEG] — an empty prediction —, present (B,) bool)."""
        M, dev = seg_rows.shape[0], mask_logits.device
        first = torch.full((batch,), M, dtype=torch.long, device=dev)
        first = first.scatter_reduce(0, seg_rows.to(dev), torch.arange(M, device=dev), "amin")
        present = first < M
        side = mask_logits.shape[-2:]
        if M == 0:
            return mask_logits.new_full((batch, *side), float("-inf")), present
        picked = mask_logits[first.clamp(max=M - 1)]
        return torch.where(present[:, None, None], picked, torch.full_like(picked, float("-inf"))), present

    def segment(
        self,
        pixel_values: torch.Tensor,
        sam_feats: SamFeatures,
        expr: Part,
        questions: list | None = None,
        gt_masks: torch.Tensor | None = None,
        image_feats: torch.Tensor | None = None,
        lm_loss: bool = True,
        num_tiles: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Referring segmentation; ``expr`` is :class:`Ragged` token ids (path a) or :class:`Embeds` (path b).

        ``questions`` are per-row (prefix, suffix, answer) ids (default: the fixed "Sure, [SEG]." prompt);
        an answer may hold any number of [SEG] (0 included): one mask each, see :meth:`decode_seg`.
        ``num_tiles`` (B,): pixel_values / image_feats are the batch's tiles (:meth:`image_inputs`).
        Returns ``mask_logits`` (M, G, G) at SAM input size (M = B with one [SEG] a row), ``low_res``
        logits, ``seg_rows``/``seg_counts`` and, given ``gt_masks`` (M, G, G), ``loss_mask``/``loss_bce``/
        ``loss_dice``; ``loss_lm`` on the answer tokens.
        """
        B = sam_feats.embed.shape[0]
        image_feats, n_image = self.image_inputs(pixel_values, image_feats, num_tiles)
        questions = questions or self.builder.seg_question(B, fixed=True)
        parts = self.builder.seg_parts(expr, questions, n_image=n_image)
        emb, asm = self.build_inputs(parts, image_feats, n_image=n_image)
        hidden = self.run_llm(emb, asm.attention_mask, asm.position_ids)
        out = self.decode_seg(hidden, asm.input_ids, sam_feats, gt_masks, one_each=self._one_seg_each(parts, B))
        if lm_loss:
            out["loss_lm"] = self._lm_loss(hidden, asm)
        return out

    def segment_answer(
        self,
        pixel_values: torch.Tensor,
        sam_feats: SamFeatures,
        questions: list[str],
        answers: Ragged,
        gt_masks: torch.Tensor | None = None,
        image_feats: torch.Tensor | None = None,
        num_tiles: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Teacher-forced image + free question + answer (any number of [SEG] per row, e.g. Sa2VA's grounded
        captions ``<p>a man</p> [SEG] on <p>a horse</p> [SEG]``): one mask per [SEG], the mask losses against
        ``gt_masks`` (M, G, G) (targets flat, sample-major, in [SEG] order) and ``loss_lm`` on the answers
        (``answers``: :meth:`PromptBuilder.answers`)."""
        image_feats, n_image = self.image_inputs(pixel_values, image_feats, num_tiles)
        parts = self.builder.question_parts(questions, answers, n_image)
        emb, asm = self.build_inputs(parts, image_feats, n_image=n_image)
        hidden = self.run_llm(emb, asm.attention_mask, asm.position_ids)
        out = self.decode_seg(hidden, asm.input_ids, sam_feats, gt_masks)
        out["loss_lm"] = self._lm_loss(hidden, asm)
        return out

    @torch.no_grad()
    def generate_segment(
        self,
        pixel_values: torch.Tensor,
        sam_feats: SamFeatures,
        questions: list[str],
        max_new_tokens: int = 64,
        image_feats: torch.Tensor | None = None,
        num_tiles: torch.Tensor | None = None,
        static: bool | None = None,
    ) -> dict:
        """Free generation as Sa2VA's ``predict_forward``: image + question -> a greedy answer, then one mask
        per generated [SEG], in order (0 when the answer holds none).

        The [SEG] prompt is the last hidden state at the [SEG] token's own position, as in Sa2VA (which reads
        it from the hidden states of the generated tokens fed back; the last generated token is never fed
        back, so a [SEG] produced as the final token of an answer cut at ``max_new_tokens`` gets no mask).
        Here the prompt + answer is run once more, teacher forced, to read those hidden states (the same
        values; it works with either decoder of :meth:`generate`).

        Returns ``ids`` (B, T), ``lengths``, ``finished``, ``texts`` (decoded, special tokens kept), and
        :meth:`decode_seg`'s ``mask_logits`` (M, G, G), ``seg_rows`` (M,), ``seg_counts`` (B,).
        """
        image_feats, n_image = self.image_inputs(pixel_values, image_feats, num_tiles)
        parts = self.builder.question_parts(questions, n_image=n_image)
        emb, asm = self.build_inputs(parts, image_feats, n_image=n_image)
        ban = torch.zeros(self.internvl.lm_head.weight.shape[0], dtype=torch.bool, device=emb.device)
        ban[self.builder.img_ctx_id] = True  # an image-context id in an answer has no visual token to take
        gen = self.generate(emb, asm.attention_mask, asm.position_ids, max_new_tokens, static=static, banned=ban)
        fed = gen.lengths - (~gen.finished).long()  # tokens fed back (Sa2VA: all generated but the last)
        answer = Ragged(gen.ids, fed)
        emb2, asm2 = self.build_inputs(parts + [answer], image_feats, n_image=n_image)
        hidden = self.run_llm(emb2, asm2.attention_mask, asm2.position_ids)
        pos, valid = asm2.positions[-1]
        allowed = torch.zeros_like(asm2.input_ids, dtype=torch.bool)
        allowed[torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(pos)[valid], pos[valid]] = True
        out = self.decode_seg(hidden, asm2.input_ids, sam_feats, allowed=allowed)
        texts = [self.tokenizer.decode(r[: int(n)].tolist(), skip_special_tokens=False).strip()
                 for r, n in zip(gen.ids, gen.lengths)]
        out.update({"ids": gen.ids, "lengths": gen.lengths, "finished": gen.finished, "texts": texts})
        return out

    # ------------------------------------------------------------------ (c) region caption, teacher forced
    def region_prompt(self, prompt_masks: torch.Tensor, num_regions: torch.Tensor | None = None):
        """(prompt masks for :meth:`build_inputs`, cells per region for the builder).

        prompt_masks (B, g, g): one region a row -> k (B,); (B, R, g, g) region slots, or flat
        (sum R_b, g, g) with ``num_regions`` (B,) (collated N-region samples) -> k (B, R)."""
        if num_regions is not None:
            if prompt_masks.dim() == 3:
                prompt_masks = region_slots(prompt_masks, num_regions)
            return prompt_masks, prompt_masks.flatten(2).sum(2).long()
        if prompt_masks.dim() == 4:
            return prompt_masks, prompt_masks.flatten(2).sum(2).long()
        return prompt_masks, prompt_masks.flatten(1).sum(1).long()

    @staticmethod
    def _region_width(prompt_masks: torch.Tensor, k: torch.Tensor) -> int | None:
        """The host's ``k.max()`` for one region a row on an accelerator, read once per prompt-mask tensor
        (Loop 1 captions the same regions with the teacher and then teacher-forces them: the second
        assembly then needs no host synchronisation); None on the CPU or for region slots."""
        if k.dim() != 1 or k.device.type == "cpu":
            return None
        return host_once(prompt_masks, lambda: int(k.max()) if k.numel() else 0)

    def caption_logits(
        self,
        pixel_values: torch.Tensor,
        prompt_masks: torch.Tensor,
        answer: Ragged,
        image_feats: torch.Tensor | None = None,
        num_tiles: torch.Tensor | None = None,
        num_regions: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Teacher-forced caption: logits (B, T, V) where logits[:, t] predicts answer token t.

        prompt_masks (B, g, g) must have K >= 1 per row (see :func:`maskloop.model.region.ensure_nonempty`);
        N regions a row: (B, R, g, g) or flat with ``num_regions`` (:meth:`region_prompt`), K >= 1 for each
        region used.  ``num_tiles``: tiled images (:meth:`image_inputs`); regions sit on the last tile.
        Also returns ``loss_lm`` (CE over the answer tokens incl. the end token) and ``valid`` (B, T).
        """
        image_feats, n_image = self.image_inputs(pixel_values, image_feats, num_tiles)
        prompt_masks, k = self.region_prompt(prompt_masks, num_regions)
        parts = self.builder.caption_parts(k, answer, n_image, num_regions, self._region_width(prompt_masks, k))
        emb, asm = self.build_inputs(parts, image_feats, prompt_masks, n_image)
        hidden = self.run_llm(emb, asm.attention_mask, asm.position_ids)
        pos, valid = asm.positions[-1]  # (B, T) positions of the answer tokens
        pred_pos = (pos - 1).clamp(min=0)  # the position predicting each answer token
        h = torch.gather(hidden, 1, pred_pos[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = self.lm_logits(h)  # (B, T, V)
        tgt = answer.ids.to(logits.device)
        loss = losses.masked_lm_loss(logits, tgt, valid)
        return {"logits": logits, "valid": valid, "loss_lm": loss}

    # ------------------------------------------------------------------ (d) batched greedy generation
    @torch.no_grad()
    def generate(
        self, inputs_embeds, attention_mask, position_ids, max_new_tokens: int, static: bool | None = None,
        banned: torch.Tensor | None = None, on_queued=None,
    ) -> Generated:
        """Greedy decoding for a left-padded batch with a KV cache; output padded to ``max_new_tokens``.

        ``banned``: (V,) bool, ids never picked (their logits are -inf before the argmax).
        ``on_queued(prefilled)``: called once the decoding is queued on the device, with a CUDA event where the
        prompt's pass ends (None on the CPU): on the static path once the decode steps are queued up to where the
        host first waits for the device (the early stop's first read of an all-ended flag, or the last step); on
        the plain loop, which waits for every token, after the prompt's pass.
        Loop 1 launches its side-stream encoders there, to start on the device with the memory-bound decoding
        without holding up the host's launches of it.

        ``static`` (default: on CUDA) uses :class:`~maskloop.model.fast_decode.StaticGreedyDecoder`: a static
        cache and one CUDA graph per (batch, bucketed length), replayed without host syncs.  Otherwise a
        plain loop over transformers' dynamic cache.  Both give the same tokens, except that on CUDA the
        decode step is also ``torch.compile``d (``MASKLOOP_COMPILE_DECODE=0`` turns that off): its fused
        bf16 arithmetic rounds differently, which can flip near-tied argmax picks.
        """
        from transformers import DynamicCache

        if static is None:  # the static decoder merges LoRA into whole weight matrices: not with FSDP shards
            static = inputs_embeds.device.type == "cuda" and not getattr(self, "sharded", False)
        rope = self.cfg.llm.rope_scaling or {}
        if rope.get("rope_type", rope.get("type")) == "dynamic":
            static = False  # dynamic NTK rope re-derives its frequencies from the length: no graph capture
        stop_seqs = self.builder.stop_seqs
        if any(len(q) > 1 for q in stop_seqs):
            static = False  # a stop word of several tokens is matched on the plain path
        if static:
            from maskloop.model.fast_decode import StaticGreedyDecoder, compile_decode_enabled

            B, L = attention_mask.shape
            key = (B, StaticGreedyDecoder.bucket(L + max_new_tokens), inputs_embeds.device.type == "cuda")
            decoders = self.__dict__.setdefault("_decoders", {})
            if key not in decoders:
                compile_step = compile_decode_enabled(inputs_embeds.device)
                decoders[key] = StaticGreedyDecoder(self, key[0], key[1], use_graph=key[2], compile=compile_step)
            ids, lengths, done = decoders[key].run(inputs_embeds, attention_mask, position_ids, max_new_tokens,
                                                   banned, on_queued)
            return Generated(ids, lengths, done)

        B = inputs_embeds.shape[0]
        dev = inputs_embeds.device
        pad_id = self.builder.pad_id
        cache = DynamicCache(config=self.llm.config)
        hidden = self.run_llm(inputs_embeds, attention_mask, position_ids, cache)[:, -1]
        if on_queued is not None:
            on_queued(torch.cuda.current_stream().record_event() if dev.type == "cuda" else None)
        ids = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        lengths = torch.zeros(B, dtype=torch.long, device=dev)
        pos = position_ids[:, -1:]
        mask = attention_mask
        for t in range(max_new_tokens):
            logits = self.lm_logits(hidden)
            nxt = (logits if banned is None else logits.masked_fill(banned, float("-inf"))).argmax(-1)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            ids[:, t] = nxt
            hit = _stop_length(ids[:, : t + 1], stop_seqs)  # (B,) length of a stop word ending at t, or 0
            new_stop = ~done & (hit > 0)
            lengths = torch.where(done, lengths, torch.where(new_stop, t + 1 - hit, torch.full_like(lengths, t + 1)))
            done = done | new_stop
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            pos = pos + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            hidden = self.run_llm(self.embed_tokens(nxt[:, None]), mask, pos, cache)[:, -1]
        return Generated(ids, lengths, done)

    @torch.no_grad()
    def describe(
        self, pixel_values: torch.Tensor | None, prompt_masks: torch.Tensor, max_new_tokens: int = 64,
        static: bool | None = None, vit_feats: torch.Tensor | None = None, num_tiles: torch.Tensor | None = None,
        num_regions: torch.Tensor | None = None, on_queued=None,
    ) -> Generated:
        """Region caption by greedy decoding: image + region(s)(prompt_masks) -> caption ids (B, T).

        ``num_tiles`` / ``num_regions``: tiled images and N regions a row, as in :meth:`caption_logits`;
        ``on_queued`` as in :meth:`generate`.
        A caption is words: the image / region / grounding tokens and padding are never generated (an
        undertrained model picks them at times, and a caption is fed back as a prompt by the cycle
        evaluation and Loop 1, where an extra <IMG_CONTEXT> or [SEG] breaks the prompt's layout)."""
        image_feats, n_image = self.image_inputs(pixel_values, self.image_tokens(pixel_values, vit_feats), num_tiles)
        prompt_masks, k = self.region_prompt(prompt_masks, num_regions)
        parts = self.builder.caption_parts(k, None, n_image, num_regions, self._region_width(prompt_masks, k))
        emb, asm = self.build_inputs(parts, image_feats, prompt_masks, n_image)
        return self.generate(emb, asm.attention_mask, asm.position_ids, max_new_tokens, static=static,
                             banned=self.caption_banned(emb.device), on_queued=on_queued)

    def caption_banned(self, device) -> torch.Tensor:
        """(V,) bool: the ids a caption may not contain (image, region and grounding tokens, padding).
        Built once per device (Loop 1 asks at every step)."""
        cache = self.__dict__.setdefault("_caption_banned", {})
        if device not in cache:
            V = self.internvl.lm_head.weight.shape[0]
            ban = torch.zeros(V, dtype=torch.bool)
            ids = [self.tokenizer.convert_tokens_to_ids(t) for t in ALL_SPECIAL] + [self.builder.pad_id]
            ban[sorted({i for i in ids if i is not None and 0 <= i < V})] = True
            ban[self.builder.end_id] = False
            cache[device] = ban.to(device)
        return cache[device]

    def expression_embeds(self, ids: torch.Tensor, lengths: torch.Tensor) -> Embeds:
        """Token ids (B, T) -> an :class:`Embeds` part (the embedding rows, differentiable)."""
        return Embeds(self.embed_tokens(ids), lengths)


def _stop_length(ids: torch.Tensor, stop_seqs: list[list[int]]) -> torch.Tensor:
    """ids (B, t) generated so far -> (B,) the length of the stop sequence they end with (0: none)."""
    out = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    for q in stop_seqs:
        n = len(q)
        if 0 < n <= ids.shape[1]:
            tail = ids[:, -n:] == torch.tensor(q, device=ids.device)
            out = torch.where(tail.all(1) & (out == 0), torch.full_like(out, n), out)
    return out


def _index_copy_last(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    return x.reshape(-1, shape[-1]).index_copy(-1, index, src.reshape(-1, src.shape[-1])).reshape(shape)


def _cache_kwarg(module: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"

"""SAM2 as the grounding encoder: image embeddings once per image, mask decoding from prompts.

Built on transformers' ``Sam2Model`` (Hiera image encoder + FPN neck frozen; prompt encoder frozen;
mask decoder trained).  Input is the image resized directly to the SAM size, uint8 0-255; SAM2's own
normalisation (ImageNet mean/std on the 0-1 scale) is applied here.

Which mask a language ([SEG]) prompt gets (``SAM2Config.language_mask``):

* ``"best_iou"`` (Sa2VA, the default): the decoder's multimask output (tokens 1-3) and, per prompt, the
  one with the highest predicted IoU.  Sa2VA's SAM2 config sets ``multimask_min_pt_num: 0`` and its
  language prompt carries zero points, so ``_use_multimask`` is true and ``_forward_sam_heads`` keeps
  ``argmax(ious)`` -- in training (the loss is on that mask) and in inference alike; token 0 is unused.
* ``"single"``: token 0, SAM2's single-mask output; in eval mode, with ``dynamic_multimask``, SAM2's
  fallback to the best multimask token when token 0 is unstable.  For decoders trained from scratch
  (the tiny presets), whose IoU head receives no gradient and so never learns to rank the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskloop.lru import BytesLRU

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


@dataclass
class SamFeatures:
    """Per-image SAM2 features, reusable across any number of prompts for that image."""

    embed: torch.Tensor  # (B, C, h, w) lowest-resolution level (+ no-memory embedding)
    high_res: tuple[torch.Tensor, torch.Tensor]  # conv_s0 (B, C/8, 4h, 4w), conv_s1 (B, C/4, 2h, 2w)

    def index(self, idx: torch.Tensor) -> SamFeatures:
        """Features of images ``idx`` (M,) — e.g. several prompts on the same image."""
        return SamFeatures(self.embed[idx], (self.high_res[0][idx], self.high_res[1][idx]))


LANGUAGE_MASKS = ("best_iou", "single")  # SAM2Config.language_mask


class BackboneCache(BytesLRU):
    """The frozen image encoder's FPN maps per image, for training that sees the same images again and again
    (the CPU demo: 4000 scenes, ~20 reads each).  Set ``SAM2Head.backbone_cache = BackboneCache()``; while
    the encoder is frozen, :meth:`SAM2Head.backbone` then runs it only on the images of a batch that it has
    not seen (keyed by the image's bytes) and stacks the stored maps.  Any change to the encoder's weights
    (a load, a cast, an optimizer step -- their tensors' version counters) empties the cache; a trained
    encoder bypasses it.  Holds at most ``max_bytes`` of maps, least recently used dropped first.
    The stored maps are those of the images' first batch: the same as a fresh run up to the float rounding
    of batch size (per-image results of a batched convolution need not be bit-identical)."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        super().__init__(max_bytes, lambda maps: sum(t.numel() * t.element_size() for t in maps))
        self._stamp = None
        self.hits = self.misses = 0

    @staticmethod
    def _weights_stamp(head) -> tuple:
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in head.sam.vision_encoder.parameters())

    def maps(self, head, g_pixel_values: torch.Tensor) -> list[torch.Tensor]:
        import hashlib

        stamp = self._weights_stamp(head)
        if stamp != self._stamp:
            self.clear()
            self._stamp = stamp
        imgs = g_pixel_values.detach()
        host = imgs.cpu().contiguous()
        keys = [(str(host.dtype), tuple(host.shape[1:]), hashlib.sha1(host[i].numpy().tobytes()).digest())
                for i in range(host.shape[0])]
        found, todo = {}, []  # this batch's maps per distinct image; the rows of the images not stored yet
        for i, k in enumerate(keys):
            if k not in found:
                found[k] = self.get(k)
                if found[k] is None:
                    todo.append(i)
        if todo:  # an image twice in one batch is computed once
            fresh = head._backbone(imgs[todo], frozen=True)
            for j, i in enumerate(todo):
                found[keys[i]] = [m[j].clone() for m in fresh]
                self.put(keys[i], found[keys[i]])
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        for k in keys:  # most recently used: this batch, in its order
            self.get(k)
        return [torch.stack([found[k][level] for k in keys]) for level in range(len(found[keys[0]]))]


class SAM2Head(nn.Module):
    def __init__(self, sam2_config, pad_point_tokens: bool = True, language_mask: str = "best_iou"):
        super().__init__()
        from transformers import Sam2Model

        if language_mask not in LANGUAGE_MASKS:
            raise ValueError(f"language_mask={language_mask!r}: choose one of {LANGUAGE_MASKS}")
        self.sam = Sam2Model(sam2_config)
        self.image_size = sam2_config.prompt_encoder_config.image_size
        self.pad_point_tokens = pad_point_tokens
        self.language_mask = language_mask
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1) * 255, persistent=False)
        self.backbone_cache: BackboneCache | None = None  # off unless asked (:class:`BackboneCache`)

    @property
    def mask_decoder(self) -> nn.Module:
        return self.sam.mask_decoder

    def encode(self, g_pixel_values: torch.Tensor) -> SamFeatures:
        """g_pixel_values (B, 3, S, S) uint8 (or float 0-255) -> :class:`SamFeatures`.

        The Hiera encoder and neck run without autograd when frozen (the default); the decoder's
        conv_s0/conv_s1 (trained) are applied here with autograd so they receive gradients.
        Two halves: :meth:`backbone` (the encoder's FPN maps) and :meth:`features` (the trained part).
        """
        return self.features(self.backbone(g_pixel_values))

    def backbone(self, g_pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The Hiera encoder + neck: FPN maps, high -> low resolution (B, C, H, W) each (no autograd when
        frozen; independent of every trained weight then, so it can run ahead, e.g. on another stream)."""
        if g_pixel_values.shape[-1] != self.image_size or g_pixel_values.shape[-2] != self.image_size:
            raise ValueError(
                f"SAM2 input must be {self.image_size}x{self.image_size}, got {tuple(g_pixel_values.shape[-2:])}"
            )
        frozen = not any(p.requires_grad for p in self.sam.vision_encoder.parameters())
        if frozen and self.backbone_cache is not None:
            return self.backbone_cache.maps(self, g_pixel_values)
        return self._backbone(g_pixel_values, frozen)

    def _backbone(self, g_pixel_values: torch.Tensor, frozen: bool) -> list[torch.Tensor]:
        enc_dtype = self.sam.vision_encoder.backbone.patch_embed.projection.weight.dtype
        x = (g_pixel_values.to(self.mean.dtype) - self.mean) / self.std
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            out = self.sam.vision_encoder(x.to(enc_dtype), return_dict=True)
            return list(out.fpn_hidden_states)  # high -> low resolution, (B, C, H, W) each

    def features(self, maps: list[torch.Tensor]) -> SamFeatures:
        """:meth:`backbone`'s maps -> :class:`SamFeatures` (the no-memory embedding, the decoder's trained
        conv_s0 / conv_s1 on the high-resolution maps)."""
        dec_dtype = self.sam.mask_decoder.conv_s0.weight.dtype
        if not torch.is_autocast_enabled():
            maps = [m.to(dec_dtype) for m in maps]
        embed = maps[-1] + self.sam.no_memory_embedding.view(1, -1, 1, 1).to(maps[-1].dtype)
        dec = self.sam.mask_decoder
        return SamFeatures(embed, (dec.conv_s0(maps[0]), dec.conv_s1(maps[1])))

    def decode(self, feats: SamFeatures, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """prompt_embeds (B, n, C) language prompt tokens -> low-res mask logits (B, 4h, 4w).

        Sparse prompt = [empty-point tokens (if ``pad_point_tokens``), language tokens]; dense prompt =
        the no-mask embedding.  The mask kept is chosen by ``language_mask`` (module doc): the best
        predicted-IoU multimask token (Sa2VA) or token 0.
        """
        B = prompt_embeds.shape[0]
        sam = self.sam
        dtype = feats.embed.dtype
        if self.pad_point_tokens:
            pts = torch.zeros(B, 1, 1, 2, device=prompt_embeds.device, dtype=dtype)
            lbl = -torch.ones(B, 1, 1, dtype=torch.int32, device=prompt_embeds.device)
            sparse, dense = sam.prompt_encoder(input_points=pts, input_labels=lbl, input_boxes=None, input_masks=None)
            sparse = torch.cat([sparse.to(prompt_embeds.dtype), prompt_embeds[:, None]], 2)  # (B, 1, n+2, C)
        else:
            sparse = prompt_embeds[:, None]
            h, w = feats.embed.shape[-2:]
            dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(B, -1, h, w)
        pos = sam.get_image_wide_positional_embeddings().to(dtype).repeat(B, 1, 1, 1)
        multimask = self.language_mask == "best_iou"
        masks, iou, _, _ = sam.mask_decoder(
            image_embeddings=feats.embed,
            image_positional_embeddings=pos,
            sparse_prompt_embeddings=sparse.to(dtype),
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=multimask,
            high_resolution_features=list(feats.high_res),
        )  # masks (B, 1, M, 4h, 4w), iou (B, 1, M); M = 3 (tokens 1-3) or 1
        if not multimask:
            return masks[:, 0, 0]  # (B, 4h, 4w)
        best = iou[:, 0].argmax(-1)  # (B,)
        return masks[torch.arange(B, device=masks.device), 0, best]  # (B, 4h, 4w)

    def upsample(self, low_res: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """(B, h, w) -> (B, S, S) bilinear, the SAM input size by default."""
        size = size or self.image_size
        return F.interpolate(low_res[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]

"""Width-aware initialisation for a model trained from random init (the ``tiny`` preset in the demo).

transformers initialises every Linear / Conv / Embedding with N(0, 0.02) and several tables (ViT and
Hiera position embeddings, SAM2's no-memory embedding) with zeros.  That is sized for layers about
1000 wide that are then loaded from a checkpoint; at the tiny preset's widths (16 to 64) a 0.02 weight
shrinks every activation by ``0.02 * sqrt(fan_in)`` ~ 0.1 per layer, and SAM2's mask decoder, whose
mask is a product of several such paths (hypernetwork MLP . upscaled image features), starts at a
saddle it barely leaves.  :func:`init_from_scratch` re-initialises with variance-preserving weights:

* Linear / Conv / ConvTranspose weights ~ N(0, 1/fan_in), biases 0 (fan_in = inputs per output unit);
* embedding tables (token, SAM2 prompt / output tokens) ~ N(0, 1);
* position-embedding tables that transformers zeroes (InternViT, Hiera window / background) ~ N(0, pos_std^2);
* SAM2's prompt-encoder Fourier features are tied to the image-wide ones (as in SAM2; transformers draws
  two independent random matrices, which only a checkpoint makes equal);
* LoRA keeps PEFT's own init (B = 0, so the adapters start as the identity), norms keep 1 / 0,
  layer-scale and fixed buffers (SAM2's random Fourier features) are untouched;
* the trainable new-token rows are re-read from the re-initialised embedding / lm_head matrices.

Only for models that will be trained from scratch: never call it on a model whose weights come from a
checkpoint (``build_model`` applies it to a preset built without one when the train config asks).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

_POSITION_TABLES = (
    "internvl.model.vision_tower.embeddings.position_embeddings",
    "internvl.model.vision_tower.embeddings.cls_token",
    "sam.sam.vision_encoder.backbone.pos_embed",
    "sam.sam.vision_encoder.backbone.pos_embed_window",
)


def _fan_in(m: nn.Module) -> int:
    w = m.weight
    if isinstance(m, nn.Linear):
        return w.shape[1]
    if isinstance(m, nn.ConvTranspose2d):  # weight (in, out/groups, k, k): each output sees in * (k/stride)^2 inputs
        k = w.shape[2] * w.shape[3]
        s = m.stride[0] * m.stride[1]
        return max(1, w.shape[0] * k // s)
    return w[0].numel()  # Conv: (out, in/groups, k, k)


@torch.no_grad()
def init_from_scratch(model, pos_std: float = 0.5) -> None:
    """Re-initialise ``model`` (a :class:`~maskloop.model.grounded.GroundedMLLM`) in place; see the module doc."""
    for name, m in model.named_modules():
        if "lora_" in name:
            continue
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
            m.weight.normal_(0.0, 1.0 / math.sqrt(_fan_in(m)))
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, 1.0)
    params = dict(model.named_parameters())
    for name in _POSITION_TABLES:
        if name in params:
            params[name].normal_(0.0, pos_std)
    sam = model.sam.sam  # SAM ties the point prompts' Fourier features to the image's; transformers draws two
    sam.prompt_encoder.shared_embedding.positional_embedding.copy_(sam.shared_image_embedding.positional_embedding)
    model.new_embed.copy_(model.embed_matrix[model.new_token_ids])
    model.new_head.copy_(model.head_matrix[model.new_token_ids])


__all__ = ["init_from_scratch"]

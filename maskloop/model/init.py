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


def init_recency_prior(model, strength: float, freq_index: int = 2, kv_groups: int | None = None,
                       content_free: bool = True) -> None:
    """Give the LLM's attention a recency prior at init through its q/k biases (Qwen2 has them).

    In each chosen key/value group of every layer, the q and k biases get the same constant ``a`` in
    the first dimension of rotary pair ``freq_index`` (frequency ``theta_j = rope_theta^(-2j/head_dim)``).
    RoPE turns that into ``a^2 cos(theta_j (m - n))`` in the score of query m on key n, so after the
    1/sqrt(head_dim) scaling the logits gain ``strength * cos(theta_j * distance)``: at init a head looks
    mostly at the last few tokens (j = 2 with theta 1e4 gives theta_j = 0.1; at the demo's strength 4 the
    weights of distances 0, 2, 4, 6, 10 relative to the current token are 1, 0.92, 0.73, 0.50, 0.16; at 8,
    1, 0.85, 0.53, 0.24, 0.03; at 30, 1, 0.55, 0.09, 0.01, 0).  The biases then train like any other weight.

    Why the demo needs it: a from-scratch LLM averages over every token at init, so the [SEG] state
    (hence SAM2's prompt) barely depends on the expression, and SAM2's decoder settles on segmenting
    every object before the LLM learns to route the expression there.  With the expression right
    before [SEG] (``seg_answer="phrase"``) and this prior, the prompt is a function of the expression
    from step 0.  ``kv_groups``: how many key/value groups per layer get it (default all).  The strength
    trades that against reading far tokens: distance d loses ``strength * (1 - cos(theta_j d))`` logits,
    up to twice the strength; at 30 the region tokens of a caption prompt (~20 tokens before the answer)
    are ~40 logits down, get no gradient, and the demo's captioner learnt one caption for every region;
    at 8 (10-15 logits down at distances 18-26) it still wrote one colour and shape for every region, at 4
    (5-7 down) it names the region's colour (benchmarks/results/demo_seeds.md).

    ``content_free`` (default): the chosen heads' query weights start at zero (as muP initialises query
    projections, Yang et al. 2021, "Tensor Programs V") and so do the key weights of the prior's rotary pair,
    so that at init those heads' logits are the prior exactly, whatever the tokens: no random content term
    (for the tiny LLM, q.k of random projections has a standard deviation of ~1 logit, and the q bias
    times the key's content in the prior's pair another ~1.4 at strength 8) decides which of the last
    few tokens a head reads.  Without it, whether the [SEG] state of the demo's frozen LLM carried the
    expression's colour was a matter of the draw: the colour word explained 54 % of the [SEG] state's
    variance at one seed and 8 % at another (the shape word 70 %), and SAM2's decoder, whose targets
    the colour mostly tells apart, stayed on the "every object" plateau there (benchmarks/results/demo_seeds.md).
    Every weight still trains; zero query weights get their gradient from the (non-zero) keys.
    """
    if strength <= 0:
        raise ValueError(f"recency strength must be > 0, got {strength}")
    for layer in model.llm.layers:
        attn = layer.self_attn
        d = attn.head_dim
        if not 0 <= freq_index < d // 2:
            raise ValueError(f"freq_index={freq_index} outside the {d // 2} rotary pairs of head_dim {d}")
        n_q, n_kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
        if attn.q_proj.bias is None or attn.k_proj.bias is None:
            raise ValueError("the recency prior needs q/k projection biases (Qwen2 attention has them)")
        a = math.sqrt(strength * math.sqrt(d))
        with torch.no_grad():
            for g in range(n_kv if kv_groups is None else min(kv_groups, n_kv)):
                attn.k_proj.bias[g * d + freq_index] = a
                if content_free:  # HF's rotate_half pairs dimension i with i + d/2
                    attn.k_proj.weight[[g * d + freq_index, g * d + freq_index + d // 2]] = 0.0
                for h in range(g * n_q // n_kv, (g + 1) * n_q // n_kv):  # the query heads reading group g
                    attn.q_proj.bias[h * d + freq_index] = a
                    if content_free:
                        attn.q_proj.weight[h * d:(h + 1) * d] = 0.0


@torch.no_grad()
def init_seg_embedding_zero(model) -> None:
    """Start the [SEG] token's input embedding (its ``new_embed`` row) at zero.

    A from-scratch [SEG] row is a random N(0, 1) vector as long as the residual stream itself, and it stays
    in the residual stream at the [SEG] position: in the demo's 2-layer LLM it made 92-94 % of the [SEG]
    state's second moment the same vector for every sample, leaving the expression ~2 % (the colour) of
    what text_hidden_fcs reads.  From zero, the [SEG] state is what the layers read from its context (the
    expression right before it): 48-71 % of it varies between samples, 18-22 % with the target's colour
    (benchmarks/results/demo_seeds.md).  RMSNorm of the zero vector is zero (its eps), so the [SEG]
    position's own value is the (zero) value bias; the row trains like the other new-token rows.
    """
    row = (model.new_token_ids == model.builder.seg_id).nonzero()[:, 0]
    model.new_embed[row] = 0.0


__all__ = ["init_from_scratch", "init_recency_prior", "init_seg_embedding_zero"]

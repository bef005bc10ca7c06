"""Straight-through Gumbel-softmax over the top-k logits, mixed into embeddings (docs/recipes.md, "Loop 1" step 4).

The captioner's logits at the T caption positions become text embeddings for the segmenter:

    ids, vals = topk(logits, k)                     (B, T, k)
    y = softmax((vals + gumbel) / tau)              (B, T, k)   soft weights
    hard = one_hot(argmax y)                        (B, T, k)
    w = hard - y.detach() + y                       forward == hard, backward == d/dy
    E = sum_j w_j * W[ids_j]                        (B, T, D)

The naive form gathers ``W[ids]`` as a (B, T, k, D) tensor (for B=2, T=64, k=512, D=4096 in
fp32 that is 1 GiB, plus the same again for its gradient).  :class:`TopkMixEmbedding` never
builds it:

* forward (hard): ``E = F.embedding(hard_ids, W)``; the result is *exactly* the hard row.
  forward (soft, ``hard=False``): chunked ``bmm(w, W[ids])``.
* backward, soft weights: ``dw[b,t,j] = <dE[b,t], W[ids[b,t,j]]>``, computed chunk by chunk
  over tokens with one gather + one ``bmm`` per chunk.  A chunk holds at most ``chunk`` gathered
  rows, so the extra peak memory is ``max(chunk, k) * D`` elements whatever B, T and k are.
* backward, embedding matrix: the dense formula ``dW = w_fullᵀ @ dE`` where ``w_full`` is ``w``
  scattered into V.  In hard mode the off-argmax entries of ``w`` are exactly zero in IEEE
  arithmetic (``0 - y + y == 0``), so this is one ``index_add_`` of ``w_hard * dE`` into the hard
  rows: O(B·T·D).  In soft mode it is a chunked ``index_add_`` of ``w_j * dE`` into rows ``ids``.

Trade-off: a single ``(dE @ Wᵀ)`` followed by a gather over the k ids would avoid Python chunking
but costs O(B·T·V·D) FLOPs and a (B, T, V) buffer; the gather form costs O(B·T·k·D) FLOPs and is
memory-bound.  With the default ``chunk=4096`` rows and the k=128 default a (2, 64) batch is
two chunks; k=512 is eight.  Softmax / Gumbel arithmetic runs in at least float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from maskloop.checks import check_on_device

__all__ = ["gumbel_topk_embed", "gumbel_topk_weights", "mix_topk_embeddings", "sample_gumbel"]


def sample_gumbel(shape, *, device=None, dtype=torch.float32, generator=None, eps: float = 1e-20):
    """Standard Gumbel noise ``-log(-log U)``, U ~ Uniform(0, 1), clamped away from 0 and 1."""
    u = torch.rand(shape, device=device, dtype=dtype, generator=generator)
    return -torch.log(-torch.log(u.clamp(eps, 1.0 - 1e-7)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def gumbel_topk_weights(
    logits: torch.Tensor,
    k: int = 128,
    tau: float = 0.7,
    hard: bool = True,
    generator: torch.Generator | None = None,
    valid_ids_mask: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
):
    """Straight-through Gumbel-softmax weights over the top-k vocabulary entries.

    logits (B, T, V); valid_ids_mask (V,) bool, False = never selectable; noise (B, T, k) optional
    explicit Gumbel noise (else drawn with ``generator``).

    Returns ``(w, topk_ids, hard_pos, y)``: w (B, T, k) the straight-through weights (forward value
    one-hot if ``hard`` else ``y``), topk_ids (B, T, k) int64, hard_pos (B, T) index into k of the
    argmax, y (B, T, k) the soft weights.  Gradients flow from w to ``logits`` through y.
    """
    # (B, T, V) -> (B, T, k)
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    V = logits.shape[-1]
    if valid_ids_mask is not None:
        if valid_ids_mask.shape != (V,) or valid_ids_mask.dtype != torch.bool:
            raise ValueError(
                f"valid_ids_mask must be a bool tensor of shape ({V},), got "
                f"{valid_ids_mask.dtype} {tuple(valid_ids_mask.shape)}"
            )
        n_valid = valid_ids_mask.sum()
        check_on_device(n_valid >= k, f"k={k} exceeds the selectable ids left by valid_ids_mask",
                        lambda: f"k={k} exceeds the {int(n_valid)} selectable ids left by valid_ids_mask")
        logits = logits.masked_fill(~valid_ids_mask.to(logits.device), float("-inf"))
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V={V}], got {k}")

    cdt = _compute_dtype(logits.dtype)
    vals, ids = logits.topk(k, dim=-1)  # (B, T, k); grad scatters back into (B, T, V)
    if noise is None:
        noise = sample_gumbel(vals.shape, device=vals.device, dtype=cdt, generator=generator)
    elif noise.shape != vals.shape:
        raise ValueError(f"noise must have shape {tuple(vals.shape)}, got {tuple(noise.shape)}")
    y = torch.softmax((vals.to(cdt) + noise.to(cdt)) / tau, dim=-1)  # (B, T, k)
    hard_pos = y.argmax(dim=-1)  # (B, T)
    if hard:
        one_hot = torch.zeros_like(y).scatter_(-1, hard_pos.unsqueeze(-1), 1.0)
        w = one_hot - y.detach() + y
    else:
        w = y
    return w, ids, hard_pos, y


class TopkMixEmbedding(torch.autograd.Function):
    """E[b,t] = sum_j w[b,t,j] * W[ids[b,t,j]] without a (B, T, k, D) tensor (see module doc)."""

    @staticmethod
    def forward(ctx, w, ids, weight, hard_pos, chunk):
        # w (B, T, k), ids (B, T, k) int64, weight (V, D), hard_pos (B, T) int64 or None
        B, T, k = w.shape
        D = weight.shape[1]
        if hard_pos is not None:
            hard_ids = ids.gather(-1, hard_pos.unsqueeze(-1)).squeeze(-1)  # (B, T)
            out = F.embedding(hard_ids, weight)  # exactly the hard row
        else:
            wf = w.reshape(B * T, 1, k)
            idf = ids.reshape(B * T, k)
            out = weight.new_empty(B * T, D)
            n = max(1, chunk // k)  # tokens per chunk; <= max(chunk, k) gathered rows
            for s in range(0, B * T, n):
                rows = weight[idf[s : s + n]]  # (n, k, D)
                out[s : s + n] = torch.bmm(wf[s : s + n].to(rows.dtype), rows).squeeze(1)
            out = out.reshape(B, T, D)
        ctx.save_for_backward(w, ids, weight, hard_pos if hard_pos is not None else torch.empty(0))
        ctx.hard = hard_pos is not None
        ctx.chunk = chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dE):
        # dE (B, T, D)
        w, ids, weight, hard_pos = ctx.saved_tensors
        B, T, k = w.shape
        D = weight.shape[1]
        N = B * T
        n = max(1, ctx.chunk // k)
        cdt = w.dtype
        dEf = dE.reshape(N, D)
        idf = ids.reshape(N, k)
        grad_w = grad_weight = None
        if ctx.needs_input_grad[0]:
            # dw[i, j] = <dE[i], W[ids[i, j]]>: one gather + one bmm per chunk of tokens
            grad_w = w.new_empty(N, k)
            for s in range(0, N, n):
                rows = weight[idf[s : s + n]].to(cdt)  # (n, k, D)
                grad_w[s : s + n] = torch.bmm(rows, dEf[s : s + n].to(cdt).unsqueeze(-1)).squeeze(-1)
            grad_w = grad_w.reshape(B, T, k)
        if ctx.needs_input_grad[2]:
            grad_weight = torch.zeros_like(weight)  # (V, D) dense, like nn.Embedding's gradient
            wf = w.reshape(N, k)
            if ctx.hard:
                # off-argmax weights are exactly 0, so only the hard rows receive w_hard * dE
                hp = hard_pos.reshape(N, 1)
                w_hard = wf.gather(-1, hp)  # (N, 1), == 1 up to rounding of 1 - y + y
                hard_ids = idf.gather(-1, hp).squeeze(-1)  # (N,)
                grad_weight.index_add_(0, hard_ids, (w_hard * dEf.to(cdt)).to(grad_weight.dtype))
            else:
                for s in range(0, N, n):
                    src = wf[s : s + n].unsqueeze(-1) * dEf[s : s + n].to(cdt).unsqueeze(1)  # (n, k, D)
                    grad_weight.index_add_(
                        0, idf[s : s + n].reshape(-1), src.reshape(-1, D).to(grad_weight.dtype)
                    )
        return grad_w, None, grad_weight, None, None


def mix_topk_embeddings(
    w: torch.Tensor,
    ids: torch.Tensor,
    embedding_weight: torch.Tensor,
    hard_pos: torch.Tensor | None = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """Embeddings (B, T, D) = sum_j w[..., j] * embedding_weight[ids[..., j]], memory-bounded.

    w (B, T, k), ids (B, T, k), embedding_weight (V, D).  With ``hard_pos`` (B, T) the forward value
    is exactly ``embedding_weight[ids[hard_pos]]`` (w must then be one-hot in value at hard_pos,
    as the straight-through weights are).  ``chunk`` bounds the rows gathered at once.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if w.shape != ids.shape:
        raise ValueError(f"w {tuple(w.shape)} and ids {tuple(ids.shape)} must have the same shape")
    return TopkMixEmbedding.apply(w, ids, embedding_weight, hard_pos, int(chunk))


def gumbel_topk_embed(
    logits: torch.Tensor,
    embedding_weight: torch.Tensor,
    k: int = 128,
    tau: float = 0.7,
    hard: bool = True,
    generator: torch.Generator | None = None,
    valid_ids_mask: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through Gumbel top-k embeddings.

    logits (B, T, V), embedding_weight (V, D) -> (embeds (B, T, D), hard_ids (B, T) int64).

    Forward value: ``embedding_weight[hard_ids]`` exactly when ``hard`` (else the soft mixture).
    Backward: soft-weight gradients to ``logits`` (through the top-k values) and the dense
    straight-through gradient to ``embedding_weight`` if it requires grad.  ``valid_ids_mask``
    (V,) bool excludes ids (special / image tokens) from the top-k; ``noise`` (B, T, k) replaces
    the sampled Gumbel noise (tests, reproduction).  Extra memory is bounded by
    ``max(chunk, k) * D`` elements (see the module docstring).
    """
    # (B, T, V) x (V, D) -> (B, T, D)
    if embedding_weight.dim() != 2 or embedding_weight.shape[0] != logits.shape[-1]:
        raise ValueError(
            f"embedding_weight must be (V={logits.shape[-1]}, D), got {tuple(embedding_weight.shape)}"
        )
    w, ids, hard_pos, _ = gumbel_topk_weights(logits, k, tau, hard, generator, valid_ids_mask, noise)
    embeds = mix_topk_embeddings(w, ids, embedding_weight, hard_pos if hard else None, chunk)
    hard_ids = ids.gather(-1, hard_pos.unsqueeze(-1)).squeeze(-1)
    return embeds, hard_ids

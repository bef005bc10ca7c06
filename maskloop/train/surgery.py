"""Gradient surgery for two losses (docs/recipes.md, "Dual").

With g1 = ∇loss1 (Loop 1) and g2 = ∇loss2 (Loop 2) over the same trainable parameters, taken
as one concatenated vector:

    dot = g1·g2,   c = dot / ‖g1‖²   (c = 0 when ‖g1‖ = 0)
    g   = g1 + β (g2 − c g1)          β = 0.5; the β-part is orthogonal to g1

``mode="always"`` projects every step (the research recipe); ``mode="pcgrad"`` projects only when
dot < 0 and otherwise uses g1 + β g2.

Missing gradients (``None``: the parameter took no part in that loss):

* only g2 present -> β g2 (the formula with g1 = 0);
* only g1 present -> ``only_g1="keep"`` (default): g1 unchanged.  ``only_g1="project"`` instead
  treats the missing g2 as zeros, giving (1 − βc) g1 — exactly the flat-vector formula, and then
  the whole β-part is orthogonal to g1.  With "keep", orthogonality holds over the parameters that
  have g2; a parameter whose g2 is a zero tensor (not None) is projected.
* neither -> None.

Distributed:

* ``reduce=True`` averages g1 and g2 over the process group before anything else (DDP semantics;
  use it when the backward passes ran without DDP's own reduction, e.g. under ``no_sync()``).
  A parameter whose gradient is None on some ranks and present on others is treated as zeros on
  the ranks that lack it (the shape comes from the other loss's gradient or from ``params``).
* ``sharded=True``: each rank holds a disjoint shard of the (already reduced) gradients (ZeRO /
  FSDP); the dot product and squared norms are all-reduce-SUMMED, the gradients are not touched.
  ``replicated`` (one flag per entry, with ``sharded``) marks entries every rank holds whole (FSDP's
  ignored parameters): their partial sums are counted once, not once per rank.

Everything stays on device until the stats are read (one host sync, at the end).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["gradient_surgery", "collect_grads", "accumulate_"]

Grads = Sequence["torch.Tensor | None"]


def collect_grads(params: Iterable[torch.nn.Parameter], clone: bool = False) -> list[torch.Tensor | None]:
    """Take each parameter's ``.grad`` (None where it has none) and clear it (``.grad = None``); ``clone``:
    copies, not the tensors themselves."""
    out = []
    for p in params:
        g = p.grad
        out.append(None if g is None else (g.detach().clone() if clone else g.detach()))
        p.grad = None
    return out


def accumulate_(params: Iterable[torch.nn.Parameter], grads: Grads, scale: float = 1.0) -> None:
    """``p.grad += scale * g`` for each (param, grad); None grads are skipped.

    For accumulation over micro-steps pass ``scale = 1 / accumulation_steps``.
    """
    params = list(params)
    if len(params) != len(grads):
        raise ValueError(f"{len(params)} parameters but {len(grads)} gradients")
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                continue
            if g.shape != p.shape:
                raise ValueError(f"gradient shape {tuple(g.shape)} does not match parameter {tuple(p.shape)}")
            g = g.to(device=p.device, dtype=p.dtype)
            if p.grad is None:
                p.grad = g.mul(scale) if scale != 1.0 else g.clone()
            else:
                p.grad.add_(g, alpha=scale)


def _coalesced_mean_(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """All-reduce-average a list of tensors with one collective per (device, dtype) bucket."""
    ws = dist.get_world_size(group)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    buckets: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    for idx in buckets.values():
        flat = _flatten_dense_tensors([tensors[i] for i in idx])  # a fresh buffer: inputs untouched
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(ws)
        for i, t in zip(idx, _unflatten_dense_tensors(flat, [tensors[i] for i in idx])):
            out[i] = t
    return out  # type: ignore[return-value]


def _reduce_mean(g1: Grads, g2: Grads, params, group) -> tuple[list, list]:
    n = len(g1)
    dev = next((t.device for t in (*g1, *g2) if t is not None), torch.device("cpu"))
    if dist.get_backend(group) == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
    present = torch.tensor(
        [[g is not None for g in g1], [g is not None for g in g2]], dtype=torch.int32, device=dev
    )
    dist.all_reduce(present, op=dist.ReduceOp.MAX, group=group)
    present = present.bool().tolist()
    filled: list[list] = [list(g1), list(g2)]
    for which in (0, 1):
        for i in range(n):
            if present[which][i] and filled[which][i] is None:
                ref = filled[1 - which][i]
                if ref is None and params is not None:
                    ref = params[i]
                if ref is None:
                    raise RuntimeError(
                        f"gradient {i} of loss {which + 1} is None on this rank but present on another, "
                        "and neither its other-loss gradient nor `params` gives its shape: pass "
                        "`params=` to gradient_surgery"
                    )
                filled[which][i] = torch.zeros_like(ref, memory_format=torch.contiguous_format)
    flat = [t for lst in filled for t in lst if t is not None]
    reduced = iter(_coalesced_mean_(flat, group))
    return [[None if t is None else next(reduced) for t in lst] for lst in filled]  # type: ignore[return-value]


def _acc_dtype(tensors) -> torch.dtype:
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def _dot(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    cdt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return torch.dot(a.reshape(-1).to(cdt), b.reshape(-1).to(cdt)).to(acc)


def _sq(a: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return _dot(a, a, acc)


def gradient_surgery(
    g1: Grads,
    g2: Grads,
    beta: float = 0.5,
    mode: str = "always",
    *,
    reduce: bool = False,
    sharded: bool = False,
    groups: dict[str, list[int]] | None = None,
    only_g1: str = "keep",
    params: Sequence[torch.Tensor] | None = None,
    process_group=None,
    replicated: Sequence[bool] | None = None,
) -> tuple[list[torch.Tensor | None], dict[str, float]]:
    """Combine two gradient lists: g = g1 + β (g2 − c g1), c = (g1·g2)/‖g1‖² over all entries.

    g1, g2: lists of gradients (or None) aligned with the same trainable parameters.
    groups: name -> parameter indices (e.g. lora / projector / sam2_decoder) for per-group norms.
    Returns ``(combined, stats)``; stats has ``cos, g1_norm, g2_norm, g_norm, dot, c, projected``
    (``c`` is dot/‖g1‖² even when pcgrad did not project; ``projected`` is 1.0 or 0.0)
    and ``{group}/g1_norm, {group}/g2_norm, {group}/g_norm, {group}/cos``.
    See the module docstring for ``mode``, ``only_g1``, ``reduce`` and ``sharded``.
    """
    if len(g1) != len(g2):
        raise ValueError(
            f"g1 has {len(g1)} entries but g2 has {len(g2)}: they must align with the same parameters"
        )
    if mode not in ("always", "pcgrad"):
        raise ValueError(f"mode must be 'always' or 'pcgrad', got {mode!r}")
    if only_g1 not in ("keep", "project"):
        raise ValueError(f"only_g1 must be 'keep' or 'project', got {only_g1!r}")
    if reduce and sharded:
        raise ValueError(
            "reduce=True (replicated grads, averaged) and sharded=True (disjoint shards) exclude each other"
        )
    distributed = dist.is_available() and dist.is_initialized()
    if (reduce or sharded) and not distributed:
        raise RuntimeError(
            "reduce/sharded need an initialised process group (maskloop.train.dist.init_distributed)"
        )
    for i, (a, b) in enumerate(zip(g1, g2)):
        if a is not None and b is not None and a.shape != b.shape:
            raise ValueError(f"gradient {i}: g1 shape {tuple(a.shape)} != g2 shape {tuple(b.shape)}")
    groups = dict(groups or {})
    n = len(g1)
    if replicated is not None and (not sharded or len(replicated) != n):
        raise ValueError(f"replicated needs sharded=True and one flag per gradient ({n}), got {len(replicated)}")
    for name, idx in groups.items():
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"group {name!r} has indices {bad[:5]} outside [0, {n})")

    if reduce:
        g1, g2 = _reduce_mean(g1, g2, params, process_group)

    acc = _acc_dtype([*g1, *g2])
    dev = next((t.device for t in (*g1, *g2) if t is not None), torch.device("cpu"))
    if sharded and dist.get_backend(process_group) == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
    zero = torch.zeros((), dtype=acc, device=dev)

    # local partial sums per parameter: dot, ‖g1‖², ‖g2‖²  -> (n, 3)
    parts = []
    for a, b in zip(g1, g2):
        d = _dot(a, b, acc).to(dev) if (a is not None and b is not None) else zero
        s1 = _sq(a, acc).to(dev) if a is not None else zero
        s2 = _sq(b, acc).to(dev) if b is not None else zero
        parts.append(torch.stack([d, s1, s2]))
    per = torch.stack(parts) if parts else torch.zeros(0, 3, dtype=acc, device=dev)
    names = list(groups)

    def _group_sums(rows: torch.Tensor, width: int) -> torch.Tensor:
        z = torch.zeros(width, dtype=acc, device=dev)
        return torch.cat([rows.sum(0) if len(rows) else z]
                         + [rows[groups[k]].sum(0) if groups[k] else z for k in names])

    rep = (torch.tensor(list(replicated), dtype=torch.bool, device=dev) if replicated is not None
           else torch.zeros(n, dtype=torch.bool, device=dev))

    def _sum_over_shards(rows: torch.Tensor, width: int) -> torch.Tensor:
        """Per-parameter partial sums -> totals (and per group): sharded rows summed over ranks."""
        if not sharded:
            return _group_sums(rows, width)
        keep = (~rep).to(acc).reshape(-1, *([1] * (rows.dim() - 1)))
        out = _group_sums(rows * keep, width)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=process_group)
        return out + _group_sums(rows * (1 - keep), width)

    sums = _sum_over_shards(per, 3)
    dot, n1sq, n2sq = sums[0], sums[1], sums[2]

    c = torch.where(n1sq > 0, dot / torch.where(n1sq > 0, n1sq, torch.ones_like(n1sq)), zero)
    projected = torch.ones((), dtype=torch.bool, device=dev) if mode == "always" else dot < 0
    c_applied = torch.where(projected, c, zero)
    coef = 1.0 - beta * c_applied  # multiplier of g1 where g2 is present

    # combine in >= float32 (a bf16 coefficient 1 - βc would round the projection away), cast back
    combined: list[torch.Tensor | None] = []
    for a, b in zip(g1, g2):
        if a is None and b is None:
            combined.append(None)
        elif a is None:
            combined.append(b * beta)
        elif b is None and only_g1 == "keep":
            combined.append(a.clone())
        else:
            cdt = torch.promote_types(a.dtype, torch.float32)
            out = a.to(cdt) * coef.to(a.device, cdt)
            if b is not None:
                out.add_(b.to(device=a.device, dtype=cdt), alpha=beta)
            combined.append(out.to(a.dtype))

    # combined squared norms, total and per group (summed over shards)
    gsq = (
        torch.stack([_sq(g, acc).to(dev) if g is not None else zero for g in combined])
        if n
        else torch.zeros(0, dtype=acc, device=dev)
    )
    gsums = _sum_over_shards(gsq.reshape(-1, 1), 1)

    def _cos(d, a2, b2):
        den = (a2 * b2).sqrt()
        return torch.where(den > 0, d / torch.where(den > 0, den, torch.ones_like(den)), zero)

    vals = [_cos(dot, n1sq, n2sq), n1sq.sqrt(), n2sq.sqrt(), gsums[0].sqrt(), dot, c, projected.to(acc)]
    keys = ["cos", "g1_norm", "g2_norm", "g_norm", "dot", "c", "projected"]
    for j, k in enumerate(names):
        d, a2, b2 = sums[3 + 3 * j], sums[4 + 3 * j], sums[5 + 3 * j]
        vals += [a2.sqrt(), b2.sqrt(), gsums[1 + j].sqrt(), _cos(d, a2, b2)]
        keys += [f"{k}/g1_norm", f"{k}/g2_norm", f"{k}/g_norm", f"{k}/cos"]
    stats = dict(zip(keys, torch.stack(vals).tolist()))  # one host sync
    return combined, stats

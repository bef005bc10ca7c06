"""AdamW with decay / no-decay groups, warmup + cosine/constant schedule, non-finite step guard.

Research defaults (docs/recipes.md, "Dual"): AdamW betas (0.9, 0.999), weight decay 0.05, lr 1e-5
(SFT 4e-5), cosine with 5% warmup.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "is_no_decay", "NonFiniteGuard"]

NO_DECAY_KEYS = ("norm", "ln_")  # substrings (lower-case) of norm-layer parameter names


def is_no_decay(name: str, param: torch.Tensor, keys: Sequence[str] = NO_DECAY_KEYS) -> bool:
    """No weight decay for ``*.bias``, names containing a key (norm layers) and any tensor with < 2 dims."""
    if param.ndim < 2:
        return True
    low = name.lower()
    return low.endswith(".bias") or any(k in low for k in keys)


def build_optimizer(
    named_params: Mapping[str, torch.nn.Parameter] | Iterable[tuple[str, torch.nn.Parameter]],
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    no_decay_keys: Sequence[str] = NO_DECAY_KEYS,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over the parameters with ``requires_grad``; two groups named "decay" / "no_decay".

    ``fused=None`` picks the fused CUDA kernel when every parameter is a floating CUDA tensor.
    """
    items = named_params.items() if isinstance(named_params, Mapping) else named_params
    decay, no_decay, seen = [], [], set()
    for name, p in items:
        if not p.requires_grad or id(p) in seen:  # frozen, or tied (listed twice)
            continue
        seen.add(id(p))
        (no_decay if is_no_decay(name, p, no_decay_keys) else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("build_optimizer got no trainable parameters (all have requires_grad=False)")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    all_params = decay + no_decay
    from torch.distributed.tensor import DTensor

    n_sharded = sum(isinstance(p, DTensor) for p in all_params)
    if 0 < n_sharded < len(all_params):  # FSDP shards beside replicated tensors: the per-tensor update
        fused = False                     # (the fused and foreach kernels take one kind per call)
        kwargs = {"foreach": False}
    else:
        if fused is None:
            fused = all(p.is_cuda and p.is_floating_point() for p in all_params)
        kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kwargs)


def lr_factor(
    step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine", min_lr_ratio: float = 0.0
) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based, the step about to be taken).

    Linear warmup (step + 1) / warmup_steps, so no step runs at lr 0 and step warmup_steps - 1 is
    at the full lr; then "constant" (1.0) or "cosine" from 1.0 down to ``min_lr_ratio`` at
    ``total_steps`` (held there afterwards).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Factor:
    """Picklable lr lambda (LambdaLR stores callable objects' __dict__ in its state dict)."""

    def __init__(self, total_steps, warmup_steps, schedule, min_lr_ratio):
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.schedule, self.min_lr_ratio = schedule, min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.warmup_steps, self.schedule, self.min_lr_ratio)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_ratio: float = 0.05,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
    warmup_steps: int | None = None,
) -> LambdaLR:
    """LambdaLR with linear warmup (``warmup_steps`` or ``round(warmup_ratio * total_steps)``)
    followed by "cosine" (to ``min_lr_ratio`` × lr) or "constant".  Call ``step()`` after each
    optimizer step."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if warmup_steps is None:
        warmup_steps = int(round(warmup_ratio * total_steps))
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    return LambdaLR(optimizer, _Factor(total_steps, warmup_steps, schedule, min_lr_ratio))


class NonFiniteGuard:
    """Skip optimizer steps whose loss or gradients are NaN/Inf; fail loudly if it keeps happening.

    ``if guard.check(loss, grads): optimizer.zero_grad(); continue``.  ``check`` returns True
    (skip) for a non-finite step and raises RuntimeError once more than ``max_consecutive`` steps
    in a row were non-finite.  With ``sync=True`` and a process group the decision is all-reduced
    (MAX) so every rank skips together.
    """

    def __init__(self, max_consecutive: int = 10, sync: bool = True):
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.sync = sync
        self.consecutive = 0
        self.total_skipped = 0
        self.total_checked = 0

    def check(
        self,
        loss: torch.Tensor | float | None,
        grads: Iterable[torch.Tensor | None] | None = None,
        names: Sequence[str] | None = None,
    ) -> bool:
        grads = list(grads) if grads is not None else []
        grads = [g.grad if isinstance(g, torch.nn.Parameter) else g for g in grads]
        flags = []  # 1 = non-finite, one entry for the loss then one per gradient
        if isinstance(loss, torch.Tensor):
            flags.append(~torch.isfinite(loss.detach()).all())
        else:
            flags.append(torch.tensor(loss is not None and not math.isfinite(float(loss))))
        present = [i for i, g in enumerate(grads) if g is not None]
        dev = grads[present[0]].device if present else flags[0].device
        bad = torch.zeros(1 + len(grads), dtype=torch.int32, device=dev)
        bad[0] = flags[0].to(dev)
        if present:
            # one multi-tensor launch: a gradient is non-finite iff its L2 norm is (NaN and Inf propagate; a
            # finite gradient beyond ~1e19, whose squares overflow fp32, counts as non-finite too)
            norms = torch._foreach_norm([grads[i].detach() for i in present], 2, dtype=torch.float32)
            idx = torch.tensor(present, device=dev) + 1
            bad[idx] = (~torch.isfinite(torch.stack(norms))).to(torch.int32)
        any_bad = bad.max().reshape(1)
        if self.sync and dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl" and any_bad.device.type != "cuda":
                any_bad = any_bad.cuda()
            dist.all_reduce(any_bad, op=dist.ReduceOp.MAX)
        self.total_checked += 1
        if not bool(any_bad.item()):
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive > self.max_consecutive:
            bad_list = bad.tolist()
            what = []
            if bad_list[0]:
                what.append(f"loss={float(loss) if loss is not None else None}")
            bad_grads = [i for i, b in enumerate(bad_list[1:]) if b]
            if bad_grads:
                label = [names[i] if names is not None else str(i) for i in bad_grads[:5]]
                what.append(f"{len(bad_grads)} gradient(s) non-finite, e.g. {label}")
            if not what:
                what.append("another rank reported a non-finite loss/gradient")
            from maskloop.errors import DivergenceError

            raise DivergenceError(
                f"{self.consecutive} consecutive optimizer steps had a non-finite loss or gradient "
                f"(limit {self.max_consecutive}; {self.total_skipped} skipped of {self.total_checked}); last: "
                f"{'; '.join(what)}. Training has diverged or the data is bad: lower the learning rate, "
                "check the grad clip, use bf16 instead of fp16, or look for empty masks / corrupt samples, "
                "then resume from the last checkpoint."
            )
        return True

    def state_dict(self) -> dict:
        return {
            "consecutive": self.consecutive,
            "total_skipped": self.total_skipped,
            "total_checked": self.total_checked,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.consecutive = int(state["consecutive"])
        self.total_skipped = int(state["total_skipped"])
        self.total_checked = int(state["total_checked"])


def nonfinite_names(tensors, device=None) -> list[str]:
    """Names of the tensors of ``{name: tensor}`` holding a NaN / Inf (their local shards under FSDP); with a
    process group the flags are MAX-reduced, so every rank returns the same names.  One host sync."""
    from maskloop.train.sharding import local

    names = list(tensors)
    if not names:
        return []
    flags = torch.stack([~torch.isfinite(local(tensors[n]).detach()).all() for n in names]).to(torch.int32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and flags.device.type != "cuda":
            flags = flags.cuda()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [n for n, b in zip(names, flags.tolist()) if b]

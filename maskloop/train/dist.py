"""Small torch.distributed helpers for runs launched by ``torchrun`` (or not launched at all).

Every helper is a no-op / trivial answer when no process group is initialised, so single-process
code (tests, the demo, CPU runs) calls them unconditionally.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_initialized",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "all_reduce_mean",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "cleanup",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when running as a single process without a process group


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={value!r} is not an integer (set by torchrun)"
        ) from None


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group from torchrun's environment.

    Reads RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/MASTER_PORT through ``env://``).
    Backend: ``nccl`` when CUDA is available, else ``gloo`` (override with ``backend``).
    Without WORLD_SIZE (or WORLD_SIZE=1) no group is created and a single-process info is
    returned.  Safe to call twice.
    """
    ws = _env_int("WORLD_SIZE", 1)
    rk = _env_int("RANK", 0)
    lr = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        if lr >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={lr} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                "launch with --nproc-per-node <= the number of GPUs"
            )
        torch.cuda.set_device(lr)
        device = torch.device("cuda", lr)
    else:
        device = torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), lr, device, dist.get_backend())
    if ws <= 1:
        return DistInfo(0, 1, lr, device, None)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={ws} but {var} is not set: launch with torchrun, which sets it")
    backend = backend or ("nccl" if use_cuda else "gloo")
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rk,
        world_size=ws,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return DistInfo(rk, ws, lr, device, backend)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over ranks; returns ``tensor`` (unchanged without a process group)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_mean(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place mean over ranks (SUM then divide; gloo has no AVG); returns ``tensor``."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor.div_(dist.get_world_size(group))
    return tensor


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if ``flag`` is true on any rank (a one-element all-reduce; False without a group)."""
    if not is_initialized():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_grads(params) -> None:
    """Average the ``.grad`` of ``params`` over the default group: one flat all-reduce per dtype (DDP's reduction)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if world_size() <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in sorted({g.dtype for g in grads}, key=str):
        bucket = [g for g in grads if g.dtype == dtype]
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        flat /= world_size()
        for g, r in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(r)

"""A Trainer's state in and out of checkpoints: one file set written by rank 0, or DCP shards (FSDP).

What is saved either way: the trained parameters, their EMA shadows, the optimizer and scheduler, every
stream's sampler position, the RNG streams (python / numpy / torch / CUDA and the recipe's own), the
micro-step count, the skip counters and the non-finite guard.  Single-file checkpoints hold rank 0's RNG
streams (the ranks draw the recipe's global-batch noise alike); sharded ones hold every rank's.

``resume`` reads either format into any mode: a sharded checkpoint of N processes resumes in M processes
(FSDP re-cuts the shards) or in one; a single-file checkpoint resumes under FSDP too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from maskloop.config import to_dict
from maskloop.train import dist


def _trainer_state(tr) -> dict:
    ema = tr.ema.state_dict() if tr.ema is not None else {}
    return {"micro": tr.micro, "counters": dict(tr.counters), "guard": tr.guard.state_dict(),
            "ema_state": {k: v for k, v in ema.items() if k != "shadow"}}


def _load_trainer_state(tr, extra: dict) -> None:
    tr.micro = extra["micro"]
    tr.counters.update(extra.get("counters", {}))
    tr.guard.load_state_dict(extra["guard"])


def _tensor_state(tr) -> dict:
    """The DCP tree: trained weights, EMA shadows and the optimizer state, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tree = {"trainable": dict(tr.params), "optimizer": get_optimizer_state_dict(tr.dist.root, tr.optimizer)}
    if tr.ema is not None:
        tree["ema"] = tr.ema.shadow
    return tree


def save_trainer(tr) -> Path | None:
    if tr.dist.mode == "fsdp":
        return _save_sharded(tr)
    from maskloop.train.checkpoint import capture_rng, save_checkpoint

    path = None
    ema = tr.ema.state_dict() if tr.ema is not None else {}
    if dist.is_main():
        path = save_checkpoint(
            tr.run_dir / "checkpoints", tr.step,
            trainable={k: v.detach() for k, v in tr.params.items()},
            ema=ema.get("shadow"),
            optimizer_state=tr.optimizer.state_dict(),
            scheduler_state=tr.scheduler.state_dict(),
            sampler_state={n: s.state_dict() for n, s in tr.streams.items()},
            rng={**capture_rng(), "recipe": tr.recipe.state_dict()},
            extra={**_trainer_state(tr), "config": to_dict(tr.cfg)},
            keep_last=tr.cfg.keep_last,
        )
    dist.barrier()
    return path


def _save_sharded(tr) -> Path:
    from maskloop.train.checkpoint import capture_rng
    from maskloop.train.sharded_checkpoint import save_sharded

    per_rank = {"rng": {**capture_rng(), "recipe": tr.recipe.state_dict()},
                "sampler": {n: s.state_dict() for n, s in tr.streams.items()},
                "scheduler": tr.scheduler.state_dict(), **_trainer_state(tr)}
    return save_sharded(tr.run_dir / "checkpoints", tr.step, tensors=_tensor_state(tr), per_rank=per_rank,
                        shared={"config": to_dict(tr.cfg)}, keep_last=tr.cfg.keep_last)


def resume_trainer(tr, path) -> None:
    from maskloop.train.checkpoint import _resolve
    from maskloop.train.sharded_checkpoint import is_sharded

    path = Path(path)
    resolved = _resolve(path, None)
    if is_sharded(resolved):
        _resume_sharded(tr, resolved)
    else:
        _resume_files(tr, resolved)


def _resume_sharded(tr, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from maskloop.train.checkpoint import restore_rng
    from maskloop.train.sharded_checkpoint import load_sharded

    tree = _tensor_state(tr)
    with torch.no_grad():
        per_rank, shared = load_sharded(path, tensors=tree)
    # strict=False: a parameter that never had a gradient has no AdamW state, as in the saving run
    set_optimizer_state_dict(tr.dist.root, tr.optimizer, tree["optimizer"], options=StateDictOptions(strict=False))
    if tr.ema is not None:
        tr.ema.load_state_dict({**per_rank.get("ema_state", {}), "shadow": tree["ema"]})
    tr.scheduler.load_state_dict(per_rank["scheduler"])
    for n, s in tr.streams.items():
        s.load_state_dict(per_rank["sampler"][n])
    restore_rng(per_rank["rng"])
    tr.recipe.load_state_dict(per_rank["rng"]["recipe"])
    tr.step = int(shared["step"])
    _load_trainer_state(tr, per_rank)


def _resume_files(tr, path: Path) -> None:
    from maskloop.train.checkpoint import CheckpointError, load_checkpoint, restore_rng

    ck = load_checkpoint(path, map_location=tr.device)
    missing = set(tr.params) - set(ck["trainable"])
    if missing:
        raise CheckpointError(f"checkpoint {ck['path']} lacks trained parameters {sorted(missing)[:5]}...; "
                              "was it written by another recipe / freeze policy?")
    with torch.no_grad():
        for k, p in tr.params.items():
            _copy_whole(p, ck["trainable"][k])
    if tr.ema is not None:
        tr.ema.load_state_dict({**ck["extra"].get("ema_state", {}), "shadow": ck["ema"]})
    if tr.dist.mode == "fsdp":  # per-parameter optimizer state cut to this rank's shards
        _load_optimizer_into_shards(tr, ck["optimizer_state"])
    else:
        tr.optimizer.load_state_dict(ck["optimizer_state"])
    tr.scheduler.load_state_dict(ck["scheduler_state"])
    for n, s in tr.streams.items():
        s.load_state_dict(ck["sampler_state"][n])
    restore_rng(ck["rng"])
    tr.recipe.load_state_dict(ck["rng"]["recipe"])
    tr.step = ck["step"]
    _load_trainer_state(tr, ck["extra"])


def _copy_whole(p: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, or into its shard when the parameter is an FSDP DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        p.copy_(distribute_tensor(whole.to(p.device, p.dtype), p.device_mesh, p.placements))
    else:
        p.copy_(whole)


def _load_optimizer_into_shards(tr, state: dict) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = list(tr.params.values())
    tr.optimizer.load_state_dict(state)  # whole tensors first (AdamW keeps them as given) ...
    for p in params:  # ... then each per-parameter tensor cut like its parameter
        st = tr.optimizer.state.get(p, {})
        for k, v in list(st.items()):
            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape and not isinstance(v, DTensor):
                st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)

"""A Trainer's state in and out of checkpoints: one file set written by rank 0, or DCP shards (FSDP).

What is saved either way: the trained parameters, their EMA shadows, the optimizer and scheduler, every
stream's sampler position, the RNG streams (python / numpy / torch / CUDA and the recipe's own), the
micro-step count, the skip counters, each stream's data :class:`~maskloop.data.robust.SkipCounter` (reduced
over ranks) and the non-finite guard.  Before every save the weights are checked for NaN / Inf (a
non-finite model is never written: :class:`~maskloop.errors.DivergenceError`); a full disk is one line.
A resume may change the optimisation and bookkeeping settings, not the run's identity
(:mod:`maskloop.train.resume`).  Single-file checkpoints hold rank 0's RNG
streams (the ranks draw the recipe's global-batch noise alike); sharded ones hold every rank's.

``resume`` reads either format into any mode: a sharded checkpoint of N processes resumes in M processes
(FSDP re-cuts the shards) or in one; a single-file checkpoint resumes under FSDP too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from maskloop.config import to_dict
from maskloop.train import dist


def _trainer_state(tr) -> dict:
    """JSON-able trainer state (the skip counters were reduced by :func:`_save_guarded`, on every rank)."""
    ema = tr.ema.state_dict() if tr.ema is not None else {}
    skips = {n: tr.streams[n].skips.state_dict() for n in sorted(tr.streams) if hasattr(tr.streams[n], "skips")}
    return {"micro": tr.micro, "counters": dict(tr.counters), "guard": tr.guard.state_dict(),
            "ema_state": {k: v for k, v in ema.items() if k != "shadow"}, "data_skips": skips}


def _load_trainer_state(tr, extra: dict) -> None:
    tr.micro = extra["micro"]
    tr.counters.update(extra.get("counters", {}))
    tr.guard.load_state_dict(extra["guard"])
    for n, state in extra.get("data_skips", {}).items():
        if n in tr.streams and hasattr(tr.streams[n], "skips"):
            tr.streams[n].skips.load_state_dict(state)
            tr.streams[n].skips.update(tr.streams[n].dataset)  # this process's index-time skips (deduplicated)


def _after_resume(tr, saved_scheduler: dict, path: Path) -> None:
    """The current config's optimizer settings and lr schedule (re-planned when changed: one log line), and
    metrics.jsonl cut to the checkpoint's step."""
    from maskloop.train.resume import apply_optimizer_settings, replan_schedule, truncate_metrics

    apply_optimizer_settings(tr)
    line = replan_schedule(tr, saved_scheduler)
    dropped = truncate_metrics(tr.run_dir, tr.step)
    if dist.is_main():
        print(f"resume: {path} (step {tr.step})" + (f"; dropped {dropped} metrics.jsonl row(s) after it" if dropped
                                                    else ""), flush=True)
        if line:
            print(line, flush=True)


def _check_finite(tr) -> None:
    """Refuse to checkpoint non-finite weights (or EMA shadows): a :class:`DivergenceError` naming them.
    One fused reduction per tensor list, all ranks agreeing; cheap next to writing the checkpoint."""
    from maskloop.train.optim import nonfinite_names

    bad = nonfinite_names(tr.params, tr.device)
    if tr.ema is not None:
        bad += [f"ema:{n}" for n in nonfinite_names(tr.ema.shadow, tr.device)]
    if bad:
        from maskloop.errors import DivergenceError
        from maskloop.train.checkpoint import latest_checkpoint

        last = latest_checkpoint(tr.run_dir / "checkpoints")
        raise DivergenceError(
            f"training diverged: at step {tr.step} {len(bad)} tensor(s) hold NaN/Inf, e.g. {bad[:5]}; no checkpoint "
            f"written ({f'the last one, {last}, is intact' if last else 'there is no earlier checkpoint'}). "
            f"Lower lr (now {tr.cfg.lr:g}) or check the grad clip / data, then resume from the last checkpoint")


def _save_guarded(tr, write) -> Path | None:
    """``write()`` after the finite check; a full disk becomes one line naming the device, the checkpoint and
    the intact previous one."""
    import errno

    from maskloop.errors import CheckpointError
    from maskloop.train.checkpoint import STEP_PREFIX, latest_checkpoint
    from maskloop.train.streams import sync_skips

    _check_finite(tr)  # collectives first, on every rank: the finite flags, then the skip counters
    for n in sorted(tr.streams):
        if hasattr(tr.streams[n], "skips"):
            sync_skips(tr.streams[n])
    root = tr.run_dir / "checkpoints"
    previous = latest_checkpoint(root)
    try:
        return write()
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = Path(os.path.abspath(root))
        while not os.path.ismount(where) and where != where.parent:
            where = where.parent
        target = root / f"{STEP_PREFIX}{tr.step:08d}"
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "there is no previous checkpoint"
        raise CheckpointError(f"no space left on device {where} while writing checkpoint {target}; {kept} "
                              "(free space or set ckpt_every / keep_last, then resume)") from None


def _tensor_state(tr) -> dict:
    """The DCP tree: trained weights, EMA shadows and the optimizer state, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tree = {"trainable": dict(tr.params), "optimizer": get_optimizer_state_dict(tr.dist.root, tr.optimizer)}
    if tr.ema is not None:
        tree["ema"] = tr.ema.shadow
    return tree


def save_trainer(tr) -> Path | None:
    return _save_guarded(tr, lambda: _save_sharded(tr) if tr.dist.mode == "fsdp" else _save_files(tr))


def _save_files(tr) -> Path | None:
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
    from maskloop.train.resume import resolve_run_dir
    from maskloop.train.sharded_checkpoint import is_sharded

    path = resolve_run_dir(Path(path))
    resolved = _resolve(path, None)
    if is_sharded(resolved):
        _resume_sharded(tr, resolved)
    else:
        _resume_files(tr, resolved)


def _resume_sharded(tr, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from maskloop.train.checkpoint import restore_rng
    from maskloop.train.sharded_checkpoint import load_sharded

    _check_sharded_compatible(tr, path)
    tree = _tensor_state(tr)
    with torch.no_grad():
        per_rank, shared = load_sharded(path, tensors=tree)
    # strict=False: a parameter that never had a gradient has no AdamW state, as in the saving run
    set_optimizer_state_dict(tr.dist.root, tr.optimizer, tree["optimizer"], options=StateDictOptions(strict=False))
    if tr.ema is not None:
        tr.ema.load_state_dict({**per_rank.get("ema_state", {}), "shadow": tree["ema"]})
    for n, s in tr.streams.items():
        s.load_state_dict(per_rank["sampler"][n])
    restore_rng(per_rank["rng"])
    tr.recipe.load_state_dict(per_rank["rng"]["recipe"])
    tr.step = int(shared["step"])
    _load_trainer_state(tr, per_rank)
    _after_resume(tr, per_rank["scheduler"], path)


def _check_sharded_compatible(tr, path: Path) -> None:
    import json

    from torch.distributed.checkpoint import FileSystemReader

    from maskloop.train.resume import check_compatible

    shared = json.loads((path / "state.json").read_text())
    shapes = None
    try:
        meta = FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata
        shapes = {k[len("trainable."):]: tuple(v.size) for k, v in meta.items()
                  if k.startswith("trainable.") and hasattr(v, "size")}
    except (OSError, ValueError, EOFError):
        pass  # load_sharded reports an unreadable checkpoint
    sampler = None
    rank0 = path / "rank_00000.pt"
    if rank0.is_file():
        sampler = list(torch.load(rank0, map_location="cpu", weights_only=True).get("sampler", {}))
    check_compatible(path, shared.get("config"), to_dict(tr.cfg), shapes,
                     {n: tuple(p.shape) for n, p in tr.params.items()}, sampler, list(tr.streams))


def _resume_files(tr, path: Path) -> None:
    from maskloop.train.checkpoint import CheckpointError, load_checkpoint, restore_rng
    from maskloop.train.resume import check_compatible

    ck = load_checkpoint(path, map_location=tr.device)
    check_compatible(ck["path"], ck["extra"].get("config"), to_dict(tr.cfg),
                     {k: tuple(v.shape) for k, v in ck["trainable"].items()},
                     {n: tuple(p.shape) for n, p in tr.params.items()}, list(ck["sampler_state"] or {}),
                     list(tr.streams))
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
    for n, s in tr.streams.items():
        s.load_state_dict(ck["sampler_state"][n])
    restore_rng(ck["rng"])
    tr.recipe.load_state_dict(ck["rng"]["recipe"])
    tr.step = ck["step"]
    _load_trainer_state(tr, ck["extra"])
    _after_resume(tr, ck["scheduler_state"], Path(ck["path"]))


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

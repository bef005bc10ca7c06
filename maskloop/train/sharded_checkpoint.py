"""Sharded training checkpoints through ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shard of the trained parameters, of their EMA shadows and of the optimizer
state; DCP records the global shape of every tensor, so a checkpoint written by N processes loads
into M processes (FSDP shards are re-cut) or into one process without a process group.

Layout (the same step directories, ``latest`` file and keep-last-N as the single-file checkpoints)::

    run_dir/checkpoints/
      latest
      step_00000500/
        dcp/.metadata  dcp/__0_0.distcp  dcp/__1_0.distcp ...   trainable / ema / optimizer tensors
        rank_00000.pt  rank_00001.pt ...   each rank's sampler positions, RNG streams, recipe streams
        state.json                          step, world size, scheduler, counters (written last)

A save goes to ``.tmp-step_XXXXXXXX-<id>`` (the id chosen by rank 0 and sent to all ranks), every rank
writes, a barrier, and rank 0 publishes it with one rename and replaces ``latest``: a crash leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from maskloop.train import dist
from maskloop.train.checkpoint import (
    STEP_PREFIX,
    TMP_PREFIX,
    CheckpointError,
    _fsync_path,
    _prune,
    _remove_stale_tmp,
    _write_latest,
    _write_text_atomic,
)

__all__ = ["FORMAT", "is_sharded", "save_sharded", "load_sharded", "read_sharded_tensors", "check_shards"]

FORMAT = "maskloop-sharded-checkpoint"


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether a step directory holds a sharded (DCP) checkpoint."""
    try:
        return json.loads((Path(path) / "state.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _broadcast_name(name: str | None) -> str:
    if not dist.is_initialized():
        return name  # type: ignore[return-value]
    box = [name]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def save_sharded(directory: str | os.PathLike, step: int, *, tensors: dict, per_rank: dict, shared: dict,
                 keep_last: int = 3) -> Path:
    """Write one sharded checkpoint; call on EVERY rank.

    tensors: a nested dict of tensors / DTensors (``{"trainable": ..., "ema": ..., "optimizer": ...}``);
    per_rank: this rank's picklable state (torch.save, loaded with weights_only=True);
    shared: JSON-able state, taken from rank 0."""
    import torch.distributed.checkpoint as dcp

    root = Path(directory)
    final = root / f"{STEP_PREFIX}{step:08d}"
    name = None
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root)
        name = f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp = root / _broadcast_name(name)
    dist.barrier()
    (tmp / "dcp").mkdir(parents=True, exist_ok=True)
    dcp.save(tensors, checkpoint_id=str(tmp / "dcp"))  # collective: every rank writes its shard
    torch.save(per_rank, tmp / f"rank_{dist.rank():05d}.pt")
    dist.barrier()
    if dist.is_main():
        state = {"format": FORMAT, "step": int(step), "world_size": dist.world_size(), **shared}
        _write_text_atomic(tmp / "state.json", json.dumps(state, indent=1))
        _fsync_path(tmp)
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it
            old = root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
        _fsync_path(root)
        _write_latest(root, final.name)
        _prune(root, keep_last, final)
    dist.barrier()
    return final


def check_shards(path: str | os.PathLike) -> None:
    """Every shard file the DCP metadata names is present (one clear error otherwise)."""
    from torch.distributed.checkpoint import FileSystemReader

    d = Path(path) / "dcp"
    try:
        meta = FileSystemReader(str(d)).read_metadata()
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"sharded checkpoint {path}: its metadata {d / '.metadata'} is unreadable ({e})") from None
    files = sorted({info.relative_path for info in meta.storage_data.values()})
    missing = [f for f in files if not (d / f).is_file()]
    if missing:
        raise CheckpointError(
            f"sharded checkpoint {path} is missing {len(missing)} of its {len(files)} shard file(s): {missing}. "
            "Every process wrote one: copy the whole step directory, or resume from another step")
    ws = json.loads((Path(path) / "state.json").read_text()).get("world_size", 1)
    ranks = [r for r in range(ws) if not (Path(path) / f"rank_{r:05d}.pt").is_file()]
    if ranks:
        raise CheckpointError(f"sharded checkpoint {path} lacks the per-rank state of rank(s) {ranks} "
                              f"(rank_XXXXX.pt; it was written by {ws} processes)")


def load_sharded(path: str | os.PathLike, *, tensors: dict) -> tuple[dict, dict]:
    """Load into ``tensors`` in place (the same nested layout as saved, shaped for THIS world size).

    Returns ``(per_rank, shared)``: this rank's state (rank r of the saving run; with another world
    size rank r's, or rank 0's for ranks the saving run did not have) and state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    check_shards(path)
    shared = json.loads((path / "state.json").read_text())
    saved = set(FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata)
    _drop_unsaved_optimizer_state(tensors, saved)
    dcp.load(tensors, checkpoint_id=str(path / "dcp"))
    r = dist.rank() if dist.rank() < shared["world_size"] else 0
    per_rank = torch.load(path / f"rank_{r:05d}.pt", map_location="cpu", weights_only=True)
    return per_rank, shared


def _drop_unsaved_optimizer_state(tensors: dict, saved: set[str]) -> None:
    """A parameter that never had a gradient has no AdamW state in the checkpoint; the freshly initialised
    state of the loading side (``get_optimizer_state_dict`` creates one for every parameter) is dropped
    for it, so it stays without state, as in an uninterrupted run."""
    state = tensors.get("optimizer", {}).get("state", {})
    for fqn in list(state):
        if not any(f"optimizer.state.{fqn}.{k}" in saved for k in state[fqn]):
            del state[fqn]


def read_sharded_tensors(path: str | os.PathLike, key: str = "trainable") -> dict[str, torch.Tensor]:
    """The whole tensors under ``key`` of a sharded checkpoint, in one process (for export)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    check_shards(path)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(path / "dcp"), str(out))
        full = torch.load(out, map_location="cpu", weights_only=True)
    if key not in full:
        raise CheckpointError(f"sharded checkpoint {path} has no {key!r} tensors (has {sorted(full)})")
    return full[key]

"""Training checkpoints: atomic step directories, keep-last-N, ``latest`` resolution, RNG state.

Layout::

    run_dir/
      latest                      text file: the name of the newest step directory
      step_00000500/
        trainable.safetensors     the trained parameters (LoRA, projectors, SAM2 decoder, ...)
        ema.safetensors           EMA shadows (only when an EMA is kept)
        optimizer.pt              optimizer state (torch.save; loaded with weights_only=True)
        rng.pt                    python / numpy / torch / cuda RNG states (see capture_rng)
        state.json                step, scheduler, sampler, extra, versions, file list

A step is written into ``run_dir/.tmp-step_XXXXXXXX-*`` and published with one directory
rename, then ``latest`` is replaced atomically.  A crash at any point leaves the previous
checkpoint and ``latest`` intact; leftover ``.tmp-*`` directories are ignored by loading and
removed by the next save.  Call ``save_checkpoint`` on one rank only (``dist.is_main()``).
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file, save_file

from maskloop import errors

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "capture_rng",
    "restore_rng",
]

FORMAT = "maskloop-checkpoint"
FORMAT_VERSION = 1
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
LATEST = "latest"


class CheckpointError(errors.CheckpointError):
    """A checkpoint exists but cannot be read (corrupt, truncated, or from an unknown format)."""


# ----------------------------------------------------------------------------- RNG


def capture_rng() -> dict:
    """Snapshot python, numpy, torch (CPU) and CUDA RNG states as plain data + tensors.

    The result survives ``torch.save`` / ``torch.load(weights_only=True)``.  Each rank has its own
    RNG; to resume every rank exactly, save one per rank (e.g. ``extra`` or ``{f"rank{r}": ...}``).
    """
    version, internal, gauss = random.getstate()
    state: dict = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    try:
        import numpy as np

        key, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "key": key,
            "state": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    except ImportError:  # numpy is optional here
        state["numpy"] = None
    return state


def restore_rng(state: Mapping) -> None:
    """Inverse of :func:`capture_rng`.  CUDA states are restored for min(saved, visible) devices."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i].to(torch.uint8), device=i)
    npst = state.get("numpy")
    if npst is not None:
        import numpy as np

        keys = npst["state"].numpy().astype(np.uint32)
        np.random.set_state((npst["key"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))


# ----------------------------------------------------------------------------- listing


def _step_of(name: str) -> int | None:
    if not name.startswith(STEP_PREFIX):
        return None
    digits = name[len(STEP_PREFIX) :]
    return int(digits) if digits.isdigit() else None


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete step directories (those with a state.json) under ``directory``, by step."""
    root = Path(directory)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        step = _step_of(child.name)
        if step is not None and child.is_dir() and (child / "state.json").is_file():
            out.append((step, child))
    return sorted(out)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The step directory named by ``latest``; if that is missing or invalid, the highest step."""
    root = Path(directory)
    marker = root / LATEST
    if marker.is_file():
        name = marker.read_text().strip()
        cand = root / name
        if _step_of(name) is not None and (cand / "state.json").is_file():
            return cand
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------- saving


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _tensors_for_safetensors(tensors: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    out, storages = {}, set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{name!r}] is a {type(t).__name__}, expected a tensor")
        t = t.detach().to("cpu").contiguous()
        key = t.untyped_storage().data_ptr()
        if key in storages:  # tied / shared storage: safetensors refuses aliases
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, step: int, what: str) -> None:
    save_file(
        _tensors_for_safetensors(tensors, what), str(path), metadata={"format": "pt", "step": str(step)}
    )
    _fsync_path(path)


def _save_torch(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_latest(root: Path, name: str) -> None:
    _write_text_atomic(root / LATEST, name + "\n")
    _fsync_path(root)


def _versions() -> dict:
    import maskloop

    v = {
        "maskloop": getattr(maskloop, "__version__", "unknown"),
        "torch": torch.__version__,
        "safetensors": getattr(safetensors, "__version__", "unknown"),
        "python": platform.python_version(),
    }
    try:
        import numpy

        v["numpy"] = numpy.__version__
    except ImportError:
        pass
    return v


def _json(section: str, value):
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"checkpoint {section} state is not JSON-serialisable ({e}); state.json takes plain "
            "dicts/lists/numbers/strings: convert tensors with .tolist() or pass them in `extra` as such"
        ) from None
    return value


def _remove_stale_tmp(root: Path) -> None:
    for child in root.iterdir():
        if child.name.startswith(TMP_PREFIX) or child.name.startswith(".old-"):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def _save_index(path: Path) -> int:
    try:
        return int(json.loads((path / "state.json").read_text()).get("save_index", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    """Keep the ``keep_last`` most recently saved step directories (always ``keep``)."""
    found = sorted(list_checkpoints(root), key=lambda item: (_save_index(item[1]), item[0]))
    survivors = {p for _, p in found[-keep_last:]} | {keep}
    for _, path in found:
        if path not in survivors:
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    trainable: Mapping[str, torch.Tensor],
    ema: Mapping[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
    scheduler_state: dict | None = None,
    sampler_state: dict | None = None,
    rng: dict | None = None,
    extra: dict | None = None,
    keep_last: int | None = 3,
) -> Path:
    """Write ``directory/step_{step:08d}/`` atomically, update ``latest``, prune to ``keep_last``.

    ``keep_last=None`` (or 0) keeps everything.  Pruning keeps the most recently *saved* step
    directories, so a run resumed from an earlier step never deletes its own new checkpoints.
    Returns the step directory.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "scheduler": _json("scheduler", scheduler_state),
        "sampler": _json("sampler", sampler_state),
        "extra": _json("extra", extra or {}),
        "versions": _versions(),
        "saved_at": time.time(),
        # monotonic save counter: pruning order that does not depend on step numbers or mtimes
        "save_index": 1 + max((_save_index(p) for _, p in list_checkpoints(root)), default=0),
        "files": [],
    }
    name = f"{STEP_PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _save_tensors(trainable, tmp / "trainable.safetensors", step, "trainable")
        state["files"].append("trainable.safetensors")
        if ema is not None:
            _save_tensors(ema, tmp / "ema.safetensors", step, "ema")
            state["files"].append("ema.safetensors")
        if optimizer_state is not None:
            _save_torch(optimizer_state, tmp / "optimizer.pt")
            state["files"].append("optimizer.pt")
        if rng is not None:
            _save_torch(rng, tmp / "rng.pt")
            state["files"].append("rng.pt")
        _write_text_atomic(tmp / "state.json", json.dumps(state, indent=1))  # last: marks completeness
        _fsync_path(tmp)
        final = root / name
        old = None
        if final.exists():  # re-saving a step: move the old one aside, then publish
            old = root / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _write_latest(root, name)
    if keep_last:
        _prune(root, int(keep_last), final)
    return final


# ----------------------------------------------------------------------------- loading


def _resolve(path: Path, step: int | None) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint path {path} does not exist: pass a run directory or a step_XXXXXXXX directory"
        )
    if step is not None:
        cand = path / f"{STEP_PREFIX}{step:08d}"
        if not (cand / "state.json").is_file():
            have = [s for s, _ in list_checkpoints(path)]
            raise FileNotFoundError(f"no checkpoint for step {step} in {path}; available steps: {have}")
        return cand
    if (path / "state.json").is_file():
        return path
    if _step_of(path.name) is not None:
        raise CheckpointError(
            f"{path} has no state.json: the save did not finish or the directory was damaged; "
            f"load the run directory {path.parent} instead to pick the latest complete step"
        )
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"no checkpoints in {path}: expected step_XXXXXXXX/ directories with a state.json "
            "(.tmp-* directories are unfinished saves and are ignored)"
        )
    return found


def _corrupt(path: Path, err: Exception) -> CheckpointError:
    root = path.parent.parent
    have = [s for s, _ in list_checkpoints(root)]
    return CheckpointError(
        f"checkpoint file {path} is corrupt or truncated ({type(err).__name__}: {err}). "
        f"Delete {path.parent} or load another step (available in {root}: {have})"
    )


def load_checkpoint(
    path: str | os.PathLike,
    step: int | None = None,
    map_location: str | torch.device = "cpu",
    load_optimizer: bool = True,
) -> dict:
    """Load a checkpoint from a run directory (``latest``, or ``step``) or a step directory.

    Returns a dict with ``step, path, trainable, ema, optimizer_state, scheduler_state,
    sampler_state, rng, extra, versions``.  Missing pieces are None.
    """
    step_dir = _resolve(Path(path), step)
    state_path = step_dir / "state.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as e:
        raise _corrupt(state_path, e) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{state_path} is not a maskloop checkpoint (format={state.get('format')!r})"
            if isinstance(state, dict)
            else f"{state_path} is not a maskloop checkpoint"
        )
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{step_dir} was written by a newer maskloop (format {state['format_version']} > {FORMAT_VERSION}); upgrade maskloop"
        )
    files = state.get("files", [])
    for f in files:
        if not (step_dir / f).is_file():
            raise CheckpointError(
                f"{step_dir} lists {f} in state.json but the file is missing; the directory was damaged"
            )

    def tensors(fname):
        if fname not in files:
            return None
        p = step_dir / fname
        try:
            return load_file(str(p), device=str(map_location))
        except Exception as e:  # safetensors raises SafetensorError / OSError on truncation
            raise _corrupt(p, e) from e

    def pickled(fname, wanted=True, map_to=None):
        if fname not in files or not wanted:
            return None
        p = step_dir / fname
        try:
            return torch.load(p, map_location=map_to or map_location, weights_only=True)
        except Exception as e:
            raise _corrupt(p, e) from e

    return {
        "step": int(state["step"]),
        "path": step_dir,
        "trainable": tensors("trainable.safetensors"),
        "ema": tensors("ema.safetensors"),
        "optimizer_state": pickled("optimizer.pt", load_optimizer),
        "scheduler_state": state.get("scheduler"),
        "sampler_state": state.get("sampler"),
        "rng": pickled("rng.pt", map_to="cpu"),  # RNG states must stay CPU byte tensors
        "extra": state.get("extra", {}),
        "versions": state.get("versions", {}),
    }

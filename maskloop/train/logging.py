"""Run logs: ``metrics.jsonl``, the scalars in TensorBoard (``tb/``) or Weights & Biases (``logging: wandb``),
the in-memory history; scalars of the global batch (losses averaged, counters summed over ranks)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from maskloop.errors import ConfigError
from maskloop.train import dist

LOGGERS = ("tensorboard", "wandb")


class TensorBoardWriter:
    """Scalars and images into ``<run_dir>/tb`` (created at the first write)."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / "tb"
        self._w = None

    def _writer(self):
        if self._w is None:
            from torch.utils.tensorboard import SummaryWriter

            self._w = SummaryWriter(str(self.dir))
        return self._w

    def scalars(self, values: dict, step: int) -> None:
        w = self._writer()
        for k, v in values.items():
            w.add_scalar(k, v, step)

    def image(self, tag: str, image, step: int) -> None:
        self._writer().add_image(tag, _hwc(image), step, dataformats="HWC")

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


class WandbWriter:
    """Scalars and images into one W&B run (files under ``<run_dir>/wandb``); offline with ``offline=True``
    or ``WANDB_MODE=offline``.  The run stays open after training (to take a demo's images) until
    :meth:`close` or the process exits."""

    def __init__(self, run_dir: Path, config: dict, project: str = "maskloop", offline: bool = False):
        try:
            import wandb
        except ImportError:
            raise ConfigError("logging: wandb needs the wandb package: pip install 'maskloop[wandb]' "
                              "(or set logging: tensorboard)") from None
        self._wandb = wandb
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, dir=str(run_dir), name=run_dir.name, config=config,
                              mode="offline" if offline else None, reinit="create_new")

    def scalars(self, values: dict, step: int) -> None:
        self.run.log(dict(values), step=step)

    def image(self, tag: str, image, step: int) -> None:
        self.run.log({tag: self._wandb.Image(_hwc(image))}, step=step)

    def flush(self) -> None:
        pass  # W&B streams its records itself

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _hwc(image):
    """An image path, PIL image or HxWxC / HxW array -> an HxWxC uint8 array."""
    import numpy as np
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            image = im.convert("RGB")
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return a


def make_writer(run_dir: Path, config: dict):
    """The scalar writer a train config's ``logging`` names (``tensorboard`` when it has none)."""
    kind = config.get("logging", "tensorboard")
    if kind == "tensorboard":
        return TensorBoardWriter(run_dir)
    if kind == "wandb":
        return WandbWriter(run_dir, config, project=config.get("wandb_project", "maskloop"),
                           offline=bool(config.get("wandb_offline", False)))
    raise ConfigError(f"logging={kind!r}: choose one of {', '.join(LOGGERS)}")


def reduce_logs(logs: dict, counts: dict) -> tuple[dict, dict]:
    """Average the per-rank scalars (losses, stats) and sum the counters across ranks (log steps only)."""
    import torch.distributed as tdist

    gathered: list = [None] * dist.world_size()
    tdist.all_gather_object(gathered, (logs, counts))
    out_logs, out_counts = dict(logs), {}
    for k, v in logs.items():
        vals = [g[0][k] for g in gathered if isinstance(g[0].get(k), (int, float))]
        if isinstance(v, (int, float)) and k not in ("lr", "grad_norm", "samples_per_s"):
            out_logs[k] = sum(vals) / len(vals)
    for k in set().union(*(g[1] for g in gathered)):
        per_rank = [g[1].get(k, 0) for g in gathered]
        out_counts[k] = max(per_rank) if k == "skipped_steps" else sum(per_rank)  # a skip is a global decision
    return out_logs, out_counts


def skip_logs(streams: dict) -> dict[str, int]:
    """``data_skipped/<stream>`` (distinct bad items) and ``data_skipped/<stream>/<source>/<reason>``: each
    stream's :class:`~maskloop.data.robust.SkipCounter` reduced over ranks (a collective: every rank calls it)."""
    from maskloop.train.streams import sync_skips

    out: dict[str, int] = {}
    for n in sorted(streams):
        if not hasattr(streams[n], "skips"):  # a stream of a caller's own making, without a SkipCounter
            continue
        c = sync_skips(streams[n])
        out[f"data_skipped/{n}"] = sum(c.values())
        out.update({f"data_skipped/{n}/{reason}": v for reason, v in c.items()})
    return out


class RunLogger:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.writer = None
        self.history: list[dict] = []

    def start(self, config: dict) -> None:
        """Writes ``train_config.json`` and opens the scalar writer that ``config['logging']`` names (main rank)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            (self.run_dir / "train_config.json").write_text(json.dumps(config, indent=1))
            if self.writer is None:
                self.writer = make_writer(self.run_dir, config)

    def log(self, step: int, logs: dict, dt: float, streams: dict, counters: dict) -> None:
        """One log row: the step's scalars (tensors become numbers here, once), stream skip counts, counters."""
        logs = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in logs.items()}
        logs["samples_per_s"] = logs.pop("samples") * dist.world_size() / max(dt, 1e-9)
        counts = dict(counters)
        if dist.world_size() > 1:
            logs, counts = reduce_logs(logs, counts)
        logs.update(counts)
        logs.update(skip_logs(streams))  # already global: merged by item across workers and ranks
        logs["step"] = step
        self.history.append(logs)
        if not dist.is_main():
            return
        if self.writer is None:  # logged without start(): TensorBoard
            self.writer = TensorBoardWriter(self.run_dir)
        self.writer.scalars({k: v for k, v in logs.items()
                             if isinstance(v, (int, float)) and math.isfinite(v) and k != "step"}, step)
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({k: v for k, v in logs.items() if isinstance(v, (int, float))}) + "\n")

    def log_image(self, tag: str, image, step: int | None = None) -> None:
        """An image (path, PIL image or array) under ``tag`` at ``step`` (default: the last logged step)."""
        if not dist.is_main():
            return
        if self.writer is None:
            self.writer = TensorBoardWriter(self.run_dir)
        if step is None:
            step = self.history[-1]["step"] if self.history else 0
        self.writer.image(tag, image, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flushes and closes the writer (a W&B run is finished)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

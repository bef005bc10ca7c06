"""Run logs: ``metrics.jsonl``, TensorBoard scalars (``tb/``), the in-memory history; scalars of the global
batch (losses averaged, counters summed over ranks)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from maskloop.train import dist


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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            (self.run_dir / "train_config.json").write_text(json.dumps(config, indent=1))

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
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        for k, v in logs.items():
            if isinstance(v, (int, float)) and math.isfinite(v) and k != "step":
                self.writer.add_scalar(k, v, step)
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({k: v for k, v in logs.items() if isinstance(v, (int, float))}) + "\n")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

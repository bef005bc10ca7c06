"""What a resume may change, and how (docs/checkpoints.md, "Resuming with other settings").

A resume continues the run the checkpoint belongs to.  It may change the optimisation settings — ``lr``,
``steps``, ``schedule``, ``warmup_ratio``, ``weight_decay``, ``betas``, ``grad_clip`` — and the run's
bookkeeping — ``log_every``, ``ckpt_every``, ``keep_last``, ``num_workers``, ``progress`` and the like.  When
the lr, the run length, the schedule or the warmup differ from the checkpoint's, the lr schedule is
re-planned from the current step (:func:`replan_schedule`, one log line); otherwise the saved scheduler state
is loaded as it is (a bit-identical continuation).

It refuses, with one line naming the keys, what would make it another run: the model (preset or checkpoint
folder, and with it every parameter shape), the recipe (and with it the data streams), the trained
parameter set (``freeze``), the data and the seed (the data order).  Start a new ``run_dir`` (optionally with
``init_from``) for those.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from maskloop.errors import CheckpointError
from maskloop.train import dist

__all__ = ["FIXED_KEYS", "check_compatible", "replan_schedule", "truncate_metrics", "resolve_run_dir"]

FIXED_KEYS = ("model", "recipe", "freeze", "data", "seed", "psalm.data")
"""Config keys a resume cannot change (dotted: a recipe section's key)."""


def _get(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _plain(x):
    return json.loads(json.dumps(x))  # tuples -> lists: what a checkpoint's JSON holds


def check_compatible(path, saved_config: dict | None, current_config: dict, saved_shapes: dict | None,
                     current_shapes: dict, saved_streams, current_streams) -> None:
    """Raise one :class:`CheckpointError` line when checkpoint ``path`` belongs to another model / recipe /
    data: the differing keys, the parameters whose shapes differ, the streams that differ."""
    problems = []
    if saved_config:
        changed = [k for k in FIXED_KEYS if _plain(_get(saved_config, k)) != _plain(_get(current_config, k))]
        for k in changed:
            problems.append(f"{k}: {_get(saved_config, k)!r} in the checkpoint, {_get(current_config, k)!r} now")
    if saved_shapes is not None:
        missing = sorted(set(current_shapes) - set(saved_shapes))
        differ = sorted(n for n in set(current_shapes) & set(saved_shapes)
                        if tuple(saved_shapes[n]) != tuple(current_shapes[n]))
        if differ:
            eg = ", ".join(f"{n} {tuple(saved_shapes[n])} vs {tuple(current_shapes[n])}" for n in differ[:3])
            problems.append(f"{len(differ)} parameter shape(s) differ (checkpoint vs now), e.g. {eg}")
        if missing:
            problems.append(f"{len(missing)} trained parameter(s) not in the checkpoint, e.g. {missing[:3]}")
    if saved_streams is not None and sorted(saved_streams) != sorted(current_streams):
        problems.append(f"data streams {sorted(saved_streams)} in the checkpoint, {sorted(current_streams)} now")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} belongs to another run: {'; '.join(problems)}. A resume may change lr / steps / "
            "schedule / logging / checkpoint cadence, not the model, recipe, trained parameters or data order: "
            "start a new run_dir (use init_from to start from these weights)")


def replan_schedule(tr, saved_state: dict) -> str | None:
    """Load the saved scheduler state, or, when the lr / run length / schedule / warmup changed, re-plan the
    schedule from the current step; returns the log line of a re-plan (None otherwise).

    The re-planned schedule is the one the current config describes — linear warmup over
    ``round(warmup_ratio * total_steps)`` steps, then cosine or constant to ``total_steps`` — with the new
    base lr, continued at the current step.  A warmup the checkpoint had finished is not repeated.
    """
    from torch.optim.lr_scheduler import LambdaLR

    from maskloop.train.optim import _Factor

    step = tr.step
    planned = tr.scheduler.state_dict()  # the schedule Trainer.__init__ built from the current config
    new = dict(planned["lr_lambdas"][0] or {})
    old = dict((saved_state.get("lr_lambdas") or [{}])[0] or {})
    new_lr, old_lr = float(tr.cfg.lr), [float(x) for x in saved_state.get("base_lrs", [])]
    if old == new and all(abs(x - new_lr) <= 1e-12 * max(1.0, abs(new_lr)) for x in old_lr):
        tr.scheduler.load_state_dict(saved_state)
        return None
    warmup = new["warmup_steps"]
    if old and step >= old.get("warmup_steps", 0):  # warmup done: not again
        warmup = min(warmup, step)
    for g in tr.optimizer.param_groups:
        g["initial_lr"] = new_lr
    tr.scheduler = LambdaLR(tr.optimizer, _Factor(new["total_steps"], warmup, new["schedule"], new["min_lr_ratio"]),
                            last_epoch=step - 1)  # its step() inside: lr for optimizer step `step`
    lr_now = tr.scheduler.get_last_lr()[0]
    was = (f"was {old.get('schedule')} over {old.get('total_steps')} steps at lr {old_lr[0]:g}" if old and old_lr
           else "was another schedule")
    return (f"resume: lr schedule re-planned from step {step}: {new['schedule']} over {new['total_steps']} steps, "
            f"warmup {warmup}, lr {new_lr:g} (lr at step {step}: {lr_now:.4g}; {was})")


def apply_optimizer_settings(tr) -> None:
    """The current config's weight decay and betas on the loaded optimizer (a resume may change them)."""
    for g in tr.optimizer.param_groups:
        if g.get("name") != "no_decay":
            g["weight_decay"] = tr.cfg.weight_decay
        g["betas"] = tuple(tr.cfg.betas)


def truncate_metrics(run_dir, step: int) -> int:
    """Drop the ``metrics.jsonl`` rows after ``step`` (atomically: a new file renamed over the old one), so a
    resumed run logs every step once; returns the number of rows dropped.  Rank 0 only."""
    path = Path(run_dir) / "metrics.jsonl"
    if not dist.is_main() or not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line).get("step")
        except ValueError:  # a half-written last line of a killed run
            dropped += 1
            continue
        if isinstance(row_step, (int, float)) and row_step > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w") as f:
            f.write("".join(line + "\n" for line in keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


def resolve_run_dir(path: Path) -> Path:
    """``--resume RUN_DIR``: a run directory's checkpoints are in ``RUN_DIR/checkpoints/``."""
    from maskloop.train.checkpoint import list_checkpoints

    path = Path(path)
    if (path / "checkpoints").is_dir() and not (path / "state.json").is_file() and not list_checkpoints(path):
        return path / "checkpoints"
    return path

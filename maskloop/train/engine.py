"""The Trainer: one process or torchrun, precision, accumulation, clipping, checkpoints, logs.

The Trainer runs any :class:`~maskloop.train.recipe.Recipe` (the CLI resolves it from the config and hands it
over; ``Trainer(cfg)`` resolves it by the config's ``module:Class`` path).  Per optimizer step:

    for each of `accumulation` micro-steps:
        batches <- recipe.draw(streams, micro)           (one batch per stream, or the recipe's interleave)
        out <- recipe.step(batches)                       (bf16 autocast on CUDA, fp32 on CPU)
        one objective:  backward(loss / accumulation)
        two objectives: g1, g2 <- two backwards; g <- recipe.combine_grads(g1, g2) / accumulation
    gradients averaged across ranks, non-finite check, clip, AdamW, LR schedule, EMA update; every
    `ckpt_every` steps an atomic checkpoint (weights, EMA, optimizer, scheduler, stream positions, RNG, data
    skip counts), never of non-finite weights; a non-finite step with non-finite weights stops the run.

Distributed: ``torchrun --nproc_per_node N -m maskloop.cli train ...``.  Each rank reads a disjoint shard of
every stream; gradients are averaged with ``torch.distributed.all_reduce`` over flat buckets (DDP's
reduction), explicitly because a recipe may run several forward passes per step and a gradient combination
needs g1 and g2 separately.  The model is built and placed in :meth:`Trainer._place_model`, the one place a
DDP / FSDP2 wrapper goes.  Architecture and data flow: docs/architecture.md.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch

from maskloop.config import ConfigError, TrainConfig, to_dict
from maskloop.train import dist
from maskloop.train.build import build_model, build_source  # noqa: F401  (re-exported)
from maskloop.train.logging import RunLogger
from maskloop.train.recipe import Recipe, resolve_recipe
from maskloop.train.sharding import Distributor, per_rank_batch
from maskloop.train.streams import Stream, to_device  # noqa: F401  (re-exported)

__all__ = ["Trainer", "TrainConfig", "build_model", "Stream"]


def _set_agree(recipe, agree) -> None:
    """The distributed skip decision on the recipe and on the recipes it holds (Dual's Loop 1 and Loop 2)."""
    recipe.agree = agree
    for v in vars(recipe).values():
        if isinstance(v, Recipe) and v is not recipe:
            _set_agree(v, agree)


class Trainer:
    def __init__(self, cfg: TrainConfig, model=None, streams: dict | None = None, recipe: Recipe | None = None):
        from maskloop.train.ema import EMA
        from maskloop.train.optim import NonFiniteGuard, build_optimizer, build_scheduler

        self.cfg = cfg
        self.info = dist.init_distributed()
        self.device = self.info.device
        self.recipe = recipe if recipe is not None else resolve_recipe(cfg)
        if cfg.global_batch:  # samples per optimizer step, the same at any world size
            cfg.batch_size = per_rank_batch(cfg.global_batch, dist.world_size(), cfg.accumulation)
        self.model = self._place_model(model)
        self.dist = Distributor(cfg.distributed, self.device, bf16=self._bf16 and self.device.type == "cuda",
                                shard_frozen=cfg.fsdp_shard_frozen, activation_checkpointing=cfg.activation_checkpointing)
        self.dist.prepare(self.model)  # DDP / FSDP2: before the trained-parameter dict, EMA and optimizer
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.ema = EMA(self.params, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.recipe.setup(self.model, self.ema, seed=cfg.seed + dist.rank())
        _set_agree(self.recipe, self.dist.agree)
        self.optimizer = build_optimizer(list(self.params.items()), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         betas=cfg.betas)
        self.streams = streams if streams is not None else self.recipe.build_streams(self.model)
        self.total_steps = self.recipe.total_steps(self.streams)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, warmup_ratio=cfg.warmup_ratio,
                                         schedule=cfg.schedule)
        self.guard = NonFiniteGuard(max_consecutive=cfg.max_nonfinite)
        self.step = 0
        self.micro = 0  # micro-steps taken (drives a recipe's interleave)
        self.counters: dict[str, float] = defaultdict(float, {"skipped_steps": 0.0})
        for e in self.recipe.skippable:
            self.counters[f"skipped_micro/{e.counter}"] = 0.0
        self.run_dir = Path(cfg.run_dir)
        self.logger = RunLogger(self.run_dir)
        self.history = self.logger.history

    def _place_model(self, model):
        """Build (or take) the model, put it on this rank's device with rank 0's weights, choose what trains,
        set the training precision.  A sharded (DDP / FSDP2) run wraps the model here."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initialisation on every rank ...
        model = (model if model is not None else self.recipe.build_model()).to(self.device)
        if dist.world_size() > 1:  # ... and rank 0's weights everywhere, as DDP does
            for t in list(model.parameters()) + list(model.buffers()):
                torch.distributed.broadcast(t.data, src=0)
        torch.manual_seed(cfg.seed + dist.rank())  # then independent random streams per rank
        self.recipe.set_trainable(model)
        model.train()
        self._bf16 = use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
        if use_bf16 and self.device.type == "cuda" and hasattr(model, "to_training_dtype"):
            model.to_training_dtype(torch.bfloat16)  # frozen base in bf16, trained weights fp32
        self._graphs = cfg.cuda_graphs and self.device.type == "cuda"
        if hasattr(model, "length_multiple"):  # few distinct prompt lengths: few graph recordings
            model.length_multiple = cfg.pad_length_to or (32 if cfg.cuda_graphs else 1)
        for key, method in (("compile_layers", "compile_llm_layers"), ("compile_encoders", "compile_encoders")):
            if getattr(cfg, key):
                if not hasattr(model, method):
                    raise ConfigError(f"{key} is not supported by {type(model).__name__}")
                graphs = self._graphs and key == "compile_layers"
                getattr(model, method)(**({"mode": "reduce-overhead"} if graphs else {}))
        return model

    def _batches(self) -> dict:
        batches = self.recipe.draw(self.streams, self.micro)
        return {k: to_device(v, self.device) for k, v in batches.items()}

    # -- one optimizer step: micro-steps -> (reduced) gradients -> optimizer step
    def train_step(self) -> dict:
        logs: dict = defaultdict(float)
        acc = self.cfg.accumulation
        done = [out for out in (self._micro_step(logs, last=i == acc - 1) for i in range(acc)) if out is not None]
        if done:  # the reductions DDP / FSDP did not do (a combination reduced g1, g2 itself)
            self.dist.finish_grads(list(self.params.values()), single_objective=len(done[-1].objectives) == 1)
        logs["samples"] = sum(out.samples for out in done)
        logs["grad_norm"] = self._optimizer_step(skip=not done, loss=logs.get("loss", 0.0))
        logs["lr"] = self.scheduler.get_last_lr()[0]
        return dict(logs)

    def _micro_step(self, logs: dict, last: bool):
        """Draw, run the recipe, backward; None when the recipe skipped the micro-step (on any rank)."""
        two = self.recipe.combine_grads is not None
        if self._graphs:  # the graph outputs of the previous micro-step may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        with self.dist.micro_step(sync=last, separate_objectives=two):  # DDP: no_sync() unless it reduces now
            out = self._recipe_step()
            if out is None:
                return None
            for k, v in out.logs.items():
                logs[k] += v / self.cfg.accumulation
            for k, v in self._backward(out.objectives).items():
                logs[k] += v / self.cfg.accumulation
        return out

    def _recipe_step(self):
        """The recipe on the next batches (autocast); None if it raised a skippable error on any rank."""
        batches = self._batches()
        self.micro += 1
        out, failed = None, False
        try:
            with self.autocast:
                out = self.dist.forward(lambda: self.recipe.step(batches))  # through the DDP / FSDP root
        except self.recipe.skippable as e:  # a recipe-level data problem (e.g. an empty teacher caption)
            self.counters[f"skipped_micro/{e.counter}"] += int(getattr(e, "local", True))  # where it happened
            failed = True
        # every rank skips if any rank failed (one consensus per micro-step: the recipe's agree() or this
        # one): the collectives below stay in step across ranks
        failed = self.dist.settle(failed)
        return None if failed else out

    def _backward(self, objectives: list) -> dict:
        """One objective: backward(loss / accumulation); two: the recipe's gradient combination."""
        if len(objectives) == 1:
            fresh = [p for p in self.params.values() if p.grad is None] if self._graphs else []
            (objectives[0] / self.cfg.accumulation).backward()
            self._grads_off_the_graph_pool(fresh)
            return {}
        return self._combined_backward(objectives)

    @staticmethod
    def _grads_off_the_graph_pool(fresh: list) -> None:
        """With ``cuda_graphs``, a ``.grad`` the graphed backward created (on a parameter in ``fresh``, those
        without one before it) lives in the graphs' memory pool, which the next micro-step's replays
        overwrite: copied into ordinary memory.  A ``.grad`` that existed was accumulated into in place."""
        for p in fresh:
            if p.grad is not None:
                p.grad = p.grad.clone()

    def _combined_backward(self, objectives: list) -> dict:
        """g1, g2 of the two objectives, averaged across ranks, combined by the recipe, accumulated."""
        from maskloop.train.surgery import accumulate_, collect_grads

        if self.recipe.combine_grads is None:
            raise TypeError(f"{type(self.recipe).__name__}.step returned {len(objectives)} objectives but the "
                            "recipe defines no combine_grads")
        params, d = list(self.params.values()), self.dist
        stash = collect_grads(params)  # the grads accumulated by earlier micro-steps
        objectives[0].backward()
        # (cuda_graphs: copied out of the graphs' memory pool before the second backward replays into it)
        g1 = d.reduce_replicated(collect_grads(params, clone=self._graphs), params)  # FSDP: replicated averaged
        objectives[1].backward()
        g2 = d.reduce_replicated(collect_grads(params, clone=self._graphs), params)
        g, stats = self.recipe.combine_grads(d.to_local(g1), d.to_local(g2), **d.surgery_kwargs(params))
        accumulate_(params, stash)
        accumulate_(params, d.from_local(g, params), 1.0 / self.cfg.accumulation)
        return stats

    def _optimizer_step(self, skip: bool, loss) -> float:
        params = list(self.params.values())
        nonfinite = not skip and self.guard.check(torch.as_tensor(loss), self.dist.local_grads(params),
                                                  names=list(self.params))
        skip = skip or nonfinite
        norm = float("nan")
        if skip:
            self.counters["skipped_steps"] += 1
            if nonfinite:  # (a decision every rank shares) skipping cannot repair non-finite weights: stop
                self._stop_if_weights_nonfinite()
        else:
            norm = float(self.dist.clip_grad_norm_(params, self.cfg.grad_clip))
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return norm

    def _stop_if_weights_nonfinite(self) -> None:
        from maskloop.errors import DivergenceError
        from maskloop.train.optim import nonfinite_names

        bad = nonfinite_names(self.params, self.device)
        if bad:
            raise DivergenceError(
                f"training diverged at step {self.step + 1}: {len(bad)} of {len(self.params)} trained parameter(s) "
                f"hold NaN/Inf, e.g. {bad[:5]} (lr {self.cfg.lr:g}); stopped, no checkpoint written with them. "
                "Lower lr or check the grad clip / data, then resume from the last checkpoint")

    # -- checkpoints (single files, or DCP shards under FSDP: maskloop/train/state.py)
    def save(self) -> Path:
        from maskloop.train.state import save_trainer

        return save_trainer(self)

    def resume(self, path) -> None:
        from maskloop.train.state import resume_trainer

        resume_trainer(self, path)

    # -- the loop
    def fit(self, steps: int | None = None) -> list[dict]:
        from tqdm.auto import tqdm

        target = steps if steps is not None else self.total_steps
        self.logger.start(to_dict(self.cfg))
        bar = tqdm(total=target, initial=self.step, desc=self.cfg.recipe, dynamic_ncols=True,
                   disable=not (self.cfg.progress and dist.is_main()))
        while self.step < target:
            t0 = time.perf_counter()
            logs = self.train_step()
            dt = time.perf_counter() - t0
            if self.step % self.cfg.log_every == 0 or self.step == target:
                self.logger.log(self.step, logs, dt, self.streams, self.counters)
            bar.set_postfix(loss=f"{float(logs.get('loss', float('nan'))):.3f}", sps=f"{logs['samples'] / max(dt, 1e-9):.1f}")
            bar.update(1)
            if self.cfg.ckpt_every and (self.step % self.cfg.ckpt_every == 0 or self.step == target):
                self.save()
        bar.close()
        self.logger.flush()
        return self.history

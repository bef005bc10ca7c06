"""The training engine: one process or torchrun, precision, accumulation, clipping, checkpoints, logs.

``maskloop train --config run.yaml`` builds a :class:`TrainConfig`, the model, the data streams the
recipe asks for, and runs :meth:`Trainer.fit`.  Per optimizer step:

    for each of `accumulation` micro-steps:
        batches <- one batch per stream (recipe schedule: Loop 1 interleaves referring batches)
        objectives <- recipe.step(batches)            (bf16 autocast on CUDA, fp32 on CPU)
        one objective:  backward(loss / accumulation)
        two objectives: g1, g2 <- two backwards; averaged across ranks; g <- surgery(g1, g2) / accumulation
    gradients averaged across ranks (single-objective recipes), non-finite check, clip, AdamW, LR schedule,
    EMA update; every `ckpt_every` steps an atomic checkpoint (weights, EMA, optimizer, scheduler,
    sampler positions, RNG).

Distributed: ``torchrun --nproc_per_node N -m maskloop.cli train ...``.  Each rank reads a disjoint shard
of every stream (``MixtureSampler``); gradients are averaged with ``torch.distributed.all_reduce`` over
flat buckets — the same reduction DDP performs — done explicitly because Loop 1 runs several forward
passes per step and surgery needs g1 and g2 separately.  The frozen base is replicated; models that
do not fit one GPU need FSDP (not wired yet).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maskloop.config import ConfigError, from_dict, load_yaml, to_dict
from maskloop.train import dist


@dataclass
class TrainConfig:
    recipe: str = "sft"
    model: str = "tiny"  # a preset name or a checkpoint folder
    init_from: str | None = None  # a checkpoint folder whose weights initialise the model
    # a preset built without a checkpoint gets width-aware weights (maskloop.model.init) instead of
    # transformers' N(0, 0.02); for models trained from random init, e.g. the demo's
    scratch_init: bool = False
    # with scratch_init: strength of the LLM attention's recency prior at init (model/init.py
    # init_recency_prior; 0 = none); the demo's from-scratch LLM needs it to route the expression to [SEG]
    recency_init: float = 0.0
    run_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 2  # per GPU, per stream
    accumulation: int = 4
    lr: float | None = None  # None: the recipe's default
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    grad_clip: float = 1.0
    compile_layers: bool = False  # torch.compile each LLM decoder layer (regional; CUDA runs, first steps slower)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or "bf16" / "fp32"
    freeze: str = "default"  # default | all
    ema_decay: float = 0.999
    seed: int = 0
    ckpt_every: int = 250
    keep_last: int = 3
    log_every: int = 10
    max_nonfinite: int = 10
    num_workers: int = 0
    progress: bool = True
    # Loop 1 / Loop 2
    caption_len: int = 64
    noise_ratio: float = 0.25
    topk: int = 128
    tau: float = 0.7
    mask_caption_padding: bool = True  # False reproduces the research code (padding left visible)
    variant: str = "gumbel"  # or "generate": the simpler generate-then-segment Loop 1
    lm_weight: float = 1.0
    seg_lm_weight: float = 1.0
    refer_ratio: float = 0.25  # referring batches per Loop-1 batch, interleaved through the epoch
    surgery_beta: float = 0.5
    surgery_mode: str = "always"  # or "pcgrad"
    # data: stream name -> list of source specs {kind, ..., repeat, weight}
    data: dict = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path, overrides: list[str] | None = None) -> TrainConfig:
        data = load_yaml(path)
        return cls.from_mapping(data, overrides)

    @classmethod
    def from_mapping(cls, data: dict, overrides: list[str] | None = None) -> TrainConfig:
        data = dict(data)
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value")
            key, value = item.split("=", 1)
            import yaml

            data[key] = yaml.safe_load(value)
        cfg = from_dict(cls, data, "train config")
        cfg.betas = tuple(cfg.betas)
        from maskloop.recipes import RECIPES

        if cfg.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {cfg.recipe!r}; choose one of {sorted(RECIPES)}")
        if cfg.recency_init < 0 or (cfg.recency_init and not cfg.scratch_init):
            raise ConfigError(f"recency_init={cfg.recency_init}: a strength > 0 that needs scratch_init: true "
                              "(it is an initialisation of a model trained from random weights)")
        return cfg


# ----------------------------------------------------------------------------------------------
# model and data construction


def build_model(cfg: TrainConfig):
    from maskloop.model.checkpoints import load_pretrained, load_published_state, read_state_file
    from maskloop.model.grounded import GroundedMLLM
    from maskloop.model.presets import FROM_SCRATCH_PRESETS, PRESETS, get_preset

    if cfg.model in PRESETS:
        from maskloop.data.sources.shapes import all_words
        from maskloop.model.init import init_from_scratch, init_recency_prior
        from maskloop.model.prompts import build_word_tokenizer

        if cfg.model not in FROM_SCRATCH_PRESETS:
            raise ConfigError(
                f"preset {cfg.model!r} needs a real tokenizer: pass the checkpoint folder as `model` instead"
            )
        model = GroundedMLLM(get_preset(cfg.model), build_word_tokenizer(all_words()))
        if cfg.scratch_init and cfg.init_from is None:
            init_from_scratch(model)
            if cfg.recency_init:
                init_recency_prior(model, cfg.recency_init)
    else:
        model = load_pretrained(cfg.model)
    if cfg.init_from:
        load_published_state(model, read_state_file(cfg.init_from))
    model.set_trainable(cfg.freeze)
    return model


def build_source(spec: dict, model):
    """One dataset from a spec such as ``{kind: refcoco, root: ..., split: train}``."""
    from maskloop.data import sources as S
    from maskloop.data.sources import shapes
    from maskloop.data.transforms import SampleTransform

    spec = dict(spec)
    kind = spec.pop("kind")
    spec.pop("repeat", None)
    spec.pop("weight", None)
    c = model.cfg
    tf = SampleTransform(image_size=c.vision.image_size, sam_size=c.sam2.image_size, prompt_grid=c.prompt_grid)
    kinds = {
        "shapes_refer": shapes.ShapesReferDataset,
        "shapes_caption": shapes.ShapesRegionCaptionDataset,
        "shapes_pairs": shapes.ShapesPairDataset,
        "shapes_masks": shapes.ShapesMaskOnlyDataset,
        "refcoco": S.RefCOCODataset,
        "dam": S.DAMDataset,
        "sa1b": S.SA1BDataset,
        "sav": S.SAVDataset,
        "sav_pairs": S.SAVPairsDataset,
        "openimages": S.OpenImagesDataset,
    }
    if kind not in kinds:
        raise ConfigError(f"unknown data source kind {kind!r}; known: {sorted(kinds)}")
    return kinds[kind](transform=tf, **spec)


class Stream:
    """An endless, resumable iterator of batches over a mixture of sources (one DataLoader)."""

    def __init__(self, name: str, specs: list[dict], model, batch_size: int, seed: int, num_workers: int):
        from maskloop.data.mixture import MixtureDataset, MixtureSampler, collate

        if not specs:
            raise ConfigError(f"the recipe needs data stream {name!r}: add `data: {{{name}: [...]}}` to the config")
        sources = {f"{s['kind']}{i}": build_source(s, model) for i, s in enumerate(specs)}
        repeats = {f"{s['kind']}{i}": s["repeat"] for i, s in enumerate(specs) if "repeat" in s}
        weights = {f"{s['kind']}{i}": s["weight"] for i, s in enumerate(specs) if "weight" in s}
        self.name = name
        self.dataset = MixtureDataset(sources, repeats=repeats or None, weights=weights or None)
        self.sampler = MixtureSampler(self.dataset, num_replicas=dist.world_size(), rank=dist.rank(), seed=seed)
        self.batch_size = batch_size
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, sampler=self.sampler, collate_fn=collate, num_workers=num_workers,
            drop_last=True,
        )
        self.consumed = 0  # samples of the current epoch used for training
        self._it = None

    def __len__(self) -> int:
        return len(self.loader)

    def next(self) -> dict:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            batch = next(self._it)
        except StopIteration:
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self.consumed = 0
            self._it = iter(self.loader)
            batch = next(self._it)
        self.consumed += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict(consumed=self.consumed)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self.consumed = int(state["position"])
        self._it = None

    def skip_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for src in self.dataset.sources:
            for k, v in getattr(src, "skip_counts", dict)().items():
                out[k] = out.get(k, 0) + v
        return out


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# the trainer


def _reduce_logs(logs: dict, counts: dict) -> tuple[dict, dict]:
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


class Trainer:
    def __init__(self, cfg: TrainConfig, model=None, streams: dict | None = None):
        from maskloop.recipes import RECIPES
        from maskloop.train.ema import EMA
        from maskloop.train.optim import NonFiniteGuard, build_optimizer, build_scheduler

        self.cfg = cfg
        self.info = dist.init_distributed()
        self.device = self.info.device
        torch.manual_seed(cfg.seed)  # the same initialisation on every rank ...
        self.model = (model if model is not None else build_model(cfg)).to(self.device)
        if dist.world_size() > 1:  # ... and rank 0's weights everywhere, as DDP does
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                torch.distributed.broadcast(t.data, src=0)
        torch.manual_seed(cfg.seed + dist.rank())  # then independent random streams per rank
        self.model.set_trainable(cfg.freeze)
        self.model.train()
        recipe_cls, stream_names, defaults = RECIPES[cfg.recipe]
        self.lr = cfg.lr if cfg.lr is not None else defaults["lr"]
        self.params = self.model.trainable_parameters()
        self.ema = EMA(self.params, decay=cfg.ema_decay)
        self.recipe = recipe_cls(self.model, cfg, self.ema, seed=cfg.seed + dist.rank())
        self.optimizer = build_optimizer(list(self.params.items()), lr=self.lr, weight_decay=cfg.weight_decay,
                                         betas=cfg.betas)
        self.scheduler = build_scheduler(self.optimizer, cfg.steps, warmup_ratio=cfg.warmup_ratio,
                                         schedule=cfg.schedule)
        self.guard = NonFiniteGuard(max_consecutive=cfg.max_nonfinite)
        if streams is None:
            # SFT: the streams the data names (referring and/or captions); the loops: all theirs, "refer" optional
            names = [n for n in stream_names if n in cfg.data or (n != "refer" and cfg.recipe != "sft")]
            if not names:
                raise ConfigError(f"recipe {cfg.recipe!r} needs data for at least one of {list(stream_names)}")
            streams = {n: Stream(n, cfg.data.get(n, []), self.model, cfg.batch_size, cfg.seed, cfg.num_workers)
                       for n in names}
        self.streams = streams
        self.step = 0
        self.micro = 0  # micro-steps taken (drives the Loop-1 referring interleave)
        self.counters: dict[str, float] = defaultdict(float, {"skipped_steps": 0.0, "skipped_micro/teacher_empty": 0.0})
        self.run_dir = Path(cfg.run_dir)
        self.writer = None
        self.history: list[dict] = []
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())
        if use_bf16 and self.device.type == "cuda":  # frozen base in bf16, trained weights fp32
            self.model.to_training_dtype(torch.bfloat16)
        if cfg.compile_layers:
            if not hasattr(self.model, "compile_llm_layers"):
                raise ConfigError(f"compile_layers is not supported by {type(self.model).__name__}")
            self.model.compile_llm_layers()
        self.groups = {g: [i for i, n in enumerate(self.params) if n in {m for m, _ in ps}]
                       for g, ps in self.model.parameter_groups().items() if any(p.requires_grad for _, p in ps)}

    # -- data schedule
    def _batches(self) -> dict:
        names = set(self.streams)
        out = {}
        if self.cfg.recipe in ("loop1", "dual") and "refer" in names:
            ratio = self.cfg.refer_ratio
            period = max(1, round(1 + 1 / ratio)) if ratio > 0 else 0
            is_refer = period > 0 and self.micro % period == 0  # the first micro-step is a referring one
            if is_refer:
                out["refer"] = self.streams["refer"].next()
            else:
                out["pairs"] = self.streams["pairs"].next()
            names -= {"refer", "pairs"}
        for n in sorted(names):
            out[n] = self.streams[n].next()
        return {k: _to_device(v, self.device) for k, v in out.items()}

    # -- one optimizer step
    def train_step(self) -> dict:
        from maskloop.train.surgery import accumulate_, collect_grads, gradient_surgery

        cfg = self.cfg
        params = list(self.params.values())
        logs: dict[str, float] = defaultdict(float)
        samples = 0
        skipped_micro = 0
        out = None
        for _ in range(cfg.accumulation):
            batches = self._batches()
            self.micro += 1
            failed = False
            try:
                with self.autocast:
                    step_out = self.recipe.step(batches)
            except Exception as e:  # a recipe-level data problem (e.g. an empty teacher caption): skip
                from maskloop.recipes.loop1 import TeacherOutputError

                if not isinstance(e, TeacherOutputError):
                    raise
                self.counters["skipped_micro/teacher_empty"] += 1
                failed = True
            # every rank skips the micro-step if any rank failed: the collectives below (gradient all-reduce,
            # surgery's reductions) and the optimizer step then stay in step across ranks
            if dist.world_size() > 1:
                failed = dist.any_rank(failed, self.device)
            if failed:
                skipped_micro += 1
                continue
            out = step_out
            samples += out.samples
            for k, v in out.logs.items():
                logs[k] += v / cfg.accumulation
            if len(out.objectives) == 1:
                (out.objectives[0] / cfg.accumulation).backward()
            else:
                stash = collect_grads(params)  # the grads accumulated by earlier micro-steps
                out.objectives[0].backward(retain_graph=False)
                g1 = collect_grads(params)
                out.objectives[1].backward()
                g2 = collect_grads(params)
                g, stats = gradient_surgery(g1, g2, beta=cfg.surgery_beta, mode=cfg.surgery_mode,
                                            reduce=dist.world_size() > 1, groups=self.groups, only_g1="project",
                                            params=params)
                accumulate_(params, stash)
                accumulate_(params, g, 1.0 / cfg.accumulation)
                for k, v in stats.items():
                    logs[f"surgery/{k}"] += v / cfg.accumulation
        if out is not None and len(out.objectives) == 1 and dist.world_size() > 1:
            dist.all_reduce_grads(params)
        grads = [p.grad for p in params]
        skip = skipped_micro == cfg.accumulation or self.guard.check(torch.as_tensor(logs.get("loss", 0.0)), grads)
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            self.counters["skipped_steps"] += 1
            logs["grad_norm"] = float("nan")
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.update()
            logs["grad_norm"] = float(norm)
        self.scheduler.step()
        self.step += 1
        logs["lr"] = self.scheduler.get_last_lr()[0]
        logs["samples"] = samples
        return dict(logs)

    # -- checkpoints
    def save(self) -> Path:
        from maskloop.train.checkpoint import capture_rng, save_checkpoint

        path = None
        if dist.is_main():
            path = save_checkpoint(
                self.run_dir / "checkpoints", self.step,
                trainable={k: v.detach() for k, v in self.params.items()},
                ema=self.ema.state_dict()["shadow"],
                optimizer_state=self.optimizer.state_dict(),
                scheduler_state=self.scheduler.state_dict(),
                sampler_state={n: s.state_dict() for n, s in self.streams.items()},
                rng={**capture_rng(), "recipe": self.recipe.state_dict()},
                extra={"micro": self.micro, "counters": dict(self.counters), "guard": self.guard.state_dict(),
                       "ema_state": {k: v for k, v in self.ema.state_dict().items() if k != "shadow"},
                       "config": to_dict(self.cfg)},
                keep_last=self.cfg.keep_last,
            )
        dist.barrier()
        return path

    def resume(self, path) -> None:
        from maskloop.train.checkpoint import load_checkpoint, restore_rng

        ck = load_checkpoint(path, map_location=self.device)
        missing = set(self.params) - set(ck["trainable"])
        if missing:
            raise RuntimeError(f"checkpoint {ck['path']} lacks trained parameters {sorted(missing)[:5]}...; "
                               "was it written by another recipe / freeze policy?")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(ck["trainable"][k])
        ema_state = dict(ck["extra"].get("ema_state", {}))
        ema_state["shadow"] = ck["ema"]
        self.ema.load_state_dict(ema_state)
        self.optimizer.load_state_dict(ck["optimizer_state"])
        self.scheduler.load_state_dict(ck["scheduler_state"])
        for n, s in self.streams.items():
            s.load_state_dict(ck["sampler_state"][n])
        restore_rng(ck["rng"])
        self.recipe.load_state_dict(ck["rng"]["recipe"])
        self.step = ck["step"]
        self.micro = ck["extra"]["micro"]
        self.counters.update(ck["extra"].get("counters", {}))
        self.guard.load_state_dict(ck["extra"]["guard"])

    # -- the loop
    def _log(self, logs: dict, dt: float) -> None:
        logs = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in logs.items()}
        logs["samples_per_s"] = logs.pop("samples") * dist.world_size() / max(dt, 1e-9)
        counts = {}
        for n, s in self.streams.items():
            c = s.skip_counts()
            counts[f"data_skipped/{n}"] = sum(c.values())
            for reason, count in c.items():
                counts[f"data_skipped/{n}/{reason}"] = count
        counts.update(self.counters)
        if dist.world_size() > 1:  # the scalars of the global batch: losses averaged, counts summed over ranks
            logs, counts = _reduce_logs(logs, counts)
        logs.update(counts)
        logs["step"] = self.step
        self.history.append(logs)
        if not dist.is_main():
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        for k, v in logs.items():
            if isinstance(v, (int, float)) and math.isfinite(v) and k != "step":
                self.writer.add_scalar(k, v, self.step)
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({k: v for k, v in logs.items() if isinstance(v, (int, float))}) + "\n")

    def fit(self, steps: int | None = None) -> list[dict]:
        from tqdm.auto import tqdm

        target = steps if steps is not None else self.cfg.steps
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            (self.run_dir / "train_config.json").write_text(json.dumps(to_dict(self.cfg), indent=1))
        bar = tqdm(total=target, initial=self.step, desc=self.cfg.recipe, disable=not (self.cfg.progress and dist.is_main()),
                   dynamic_ncols=True)
        while self.step < target:
            t0 = time.perf_counter()
            logs = self.train_step()
            dt = time.perf_counter() - t0
            if self.step % self.cfg.log_every == 0 or self.step == target:
                self._log(logs, dt)
            bar.set_postfix(loss=f"{float(logs.get('loss', float('nan'))):.3f}", sps=f"{logs['samples'] / max(dt, 1e-9):.1f}")
            bar.update(1)
            if self.cfg.ckpt_every and (self.step % self.cfg.ckpt_every == 0 or self.step == target):
                self.save()
        bar.close()
        if self.writer is not None:
            self.writer.flush()
        return self.history

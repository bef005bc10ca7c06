"""PSALM joint segmentation training (SPEC §5), one readable file.

The loop, top to bottom (:func:`train_psalm`):

1. **Model**: a :class:`PSALMModel` from a preset (``psalm-tiny`` for tests,
   ``psalm-swinb-phi15`` ...), optionally initialised from a maskloop-key safetensors file
   (``init_from``, e.g. the output of the baseline -> deformable adapter). The Swin tower
   stays frozen unless ``train_backbone`` (PSALM's ``train_backbone=False``).
2. **Data**: PSALM's joint mixture -- COCO panoptic, RefCOCO/+/g, COCO-Interactive (and COCO
   instances if asked) -- each source repeated ``repeat`` times (PSALM's ``data_ratio``),
   every batch drawn from one source (``single_task_batches``, PSALM's
   ``UnifyDatasetSingleDatasetForBatch``) and collated per task.
3. **Objective**: per task group, ``PSALMCriterion`` (Hungarian matching; mask BCE + dice;
   query / class-name / region class; ``[SEG]`` LM term), weighted by the group's share of
   the batch.
4. **Step**: ``accumulation`` micro-batches, gradients averaged across ranks, non-finite
   guard, clip, AdamW, warmup + cosine.
5. **Bookkeeping**: tqdm bar, ``metrics.jsonl`` and TensorBoard scalars (``tb/``) in the
   run dir, atomic checkpoints (``checkpoints/step_XXXXXXXX``) with optimizer / scheduler /
   sampler / RNG state, resumable with ``resume: true``.

Published defaults (:data:`PSALM_DEFAULTS`), from SPEC §5 and PSALM's ``scripts/train.sh``:
lr 6e-5, AdamW (torch defaults: betas 0.9 / 0.999, eps 1e-8) with **weight decay 0**,
3% linear warmup then cosine, 10 epochs, gradient clip 1.0 (HF Trainer default), bf16 on
CUDA. Batch 2 per GPU with accumulation 2 (SPEC; the released script uses 4 x 1, the same
4 samples per GPU step). PSALM runs DeepSpeed ZeRO-2; here torchrun + explicit gradient
all-reduce (DDP's reduction), which fits Phi-1.5 + Swin-B on one 80 GB GPU per rank.

Launch: ``torchrun --nproc_per_node N -m maskloop.recipes.psalm --config psalm.yaml`` or
:func:`main_train` (the CLI calls it).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from maskloop.train import dist

__all__ = ["PSALM_DEFAULTS", "train_psalm", "build_psalm", "build_source", "load_trained", "main_train",
           "load_config_file"]

PSALM_DEFAULTS: dict = {
    # model
    "model": "psalm-swinb-phi15",  # a preset of maskloop.model.psalm.model.PRESETS
    "model_overrides": {},  # PSALMConfig fields, e.g. {"deform": false}
    "init_from": None,  # safetensors state dict in PSALMModel keys
    # published starts, PSALM's argument names (maskloop.model.psalm.checkpoints.load_pretrained_parts)
    "model_name_or_path": None,  # a Hugging Face Phi folder (phi-1_5)
    "vision_tower": None,  # detectron2's Mask2Former model_final_*.pkl (Swin + pixel decoder + decoder layers)
    "pretrain_mm_mlp_adapter": None,  # mm_projector.bin
    "psalm_checkpoint": None,  # a full PSALM checkpoint (pytorch_model.bin / safetensors / folder)
    "tokenizer": None,  # a local Hugging Face tokenizer folder; None: a word tokenizer (tiny preset)
    "train_backbone": False,  # PSALM keeps the Swin tower frozen
    "image_size": None,  # None: the preset's (1024)
    "mask_size": None,  # target resolution; None: image_size
    # data: list of source specs {kind, ..., repeat}; kinds in build_source
    "data": [],
    "single_task_batches": True,
    "num_workers": 4,
    # optimisation (PSALM scripts/train.sh + SPEC §5)
    "epochs": 10,
    "max_steps": None,  # optimizer steps; overrides epochs when set
    "batch_size": 2,  # per GPU
    "accumulation": 2,
    "lr": 6e-5,
    "weight_decay": 0.0,
    "betas": (0.9, 0.999),
    "warmup_ratio": 0.03,
    "schedule": "cosine",
    "grad_clip": 1.0,
    "precision": "auto",  # auto: bf16 autocast on CUDA, fp32 on CPU; or "bf16" / "fp32"
    "max_nonfinite": 10,
    # loss (Mask2Former's, as PSALM reads them)
    "num_points": 12544,
    "deep_supervision": True,
    "lm_weight": 1.0,
    # bookkeeping
    "run_dir": "runs/psalm",
    "seed": 0,
    "ckpt_every": 15000,  # optimizer steps (PSALM save_steps); the last step is always saved
    "keep_last": 1,
    "log_every": 1,
    "progress": True,
    "resume": False,
}

_SHAPES_EXTRA_WORDS = ("background", "rectangle", "ellipse")


# ----------------------------------------------------------------------------------------------
# construction


def load_config_file(path) -> dict:
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        return json.loads(text)
    import yaml

    return yaml.safe_load(text) or {}


def _merge(config: dict) -> dict:
    unknown = set(config) - set(PSALM_DEFAULTS)
    if unknown:
        raise KeyError(f"unknown PSALM recipe key(s) {sorted(unknown)}; known: {sorted(PSALM_DEFAULTS)}")
    cfg = {**PSALM_DEFAULTS, **config}
    cfg["betas"] = tuple(cfg["betas"])
    return cfg


def build_source(spec: dict, image_size: int, mask_size: int, seed: int = 0):
    """One dataset from ``{kind, ...}``; kinds: coco_panoptic, coco_semantic, coco_instances,
    coco_interactive, coco_interactive_cross, refcoco (the reader's own keyword arguments pass through)."""
    from maskloop.data.psalm import PSALMTransform
    from maskloop.data.sources.coco_instances import COCOInstancesDataset
    from maskloop.data.sources.coco_interactive import COCOInteractiveDataset
    from maskloop.data.sources.coco_panoptic import COCOPanopticDataset
    from maskloop.data.sources.refcoco import RefCOCODataset
    from maskloop.data.transforms import SampleTransform

    spec = dict(spec)
    kind = spec.pop("kind")
    spec.pop("repeat", None)
    tf = PSALMTransform(image_size, mask_size)
    if kind in ("coco_panoptic", "coco_semantic"):
        spec.setdefault("task", "panoptic" if kind == "coco_panoptic" else "semantic")
        return COCOPanopticDataset(transform=tf, **spec)
    if kind == "coco_instances":
        return COCOInstancesDataset(transform=tf, **spec)
    if kind == "coco_interactive":
        spec.setdefault("seed", seed)
        return COCOInteractiveDataset(transform=tf, **spec)
    if kind == "coco_interactive_cross":  # PSALM's cross-image json (datasets/build_DAVIS.py layout)
        from maskloop.data.sources.coco_interactive_cross import COCOInteractiveCrossDataset

        return COCOInteractiveCrossDataset(transform=tf, **spec)
    if kind == "refcoco":
        return RefCOCODataset(transform=SampleTransform(image_size=image_size, sam_size=mask_size), **spec)
    raise KeyError(f"unknown PSALM data kind {kind!r}; one of coco_panoptic, coco_semantic, coco_instances, "
                   "coco_interactive, coco_interactive_cross, refcoco")


def _tokenizer(cfg: dict, class_names: list[str]):
    if cfg["tokenizer"]:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(cfg["tokenizer"], local_files_only=True)
    from maskloop.data.psalm import INSTRUCTIONS
    from maskloop.data.sources.shapes import all_words
    from maskloop.model.prompts import build_word_tokenizer

    words = set(all_words()) | set(_SHAPES_EXTRA_WORDS)
    for text in list(INSTRUCTIONS.values()) + class_names:
        words |= {w.strip(".,:?").lower() for w in text.split()} - {""}
    return build_word_tokenizer(sorted(words))


def build_psalm(config: dict, eval_mode: bool = False) -> dict:
    """-> {"config", "model", "tokenizer", "collator", "dataset", "sources"} from a recipe dict."""
    from maskloop.data.psalm import PSALMCollator, PSALMMixture
    from maskloop.model.psalm.model import PSALMModel, psalm_config

    cfg = _merge(config)
    overrides = dict(cfg["model_overrides"])
    if cfg["image_size"]:
        overrides["image_size"] = int(cfg["image_size"])
    mcfg = psalm_config(cfg["model"], **overrides)
    image_size = mcfg.image_size
    mask_size = int(cfg["mask_size"] or image_size)
    if not cfg["data"]:
        raise ValueError("the PSALM recipe needs `data`: a list of source specs, e.g. "
                         "[{kind: coco_panoptic, root: /data/coco, split: train2017}, ...]")
    sources, repeats = {}, {}
    for i, spec in enumerate(cfg["data"]):
        name = spec.get("name") or f"{spec['kind']}{i}"
        s = dict(spec)
        s.setdefault("name", name)
        sources[name] = build_source(s, image_size, mask_size, cfg["seed"])
        repeats[name] = int(spec.get("repeat", 1)) if not eval_mode else 1
    class_names = sorted({n for s in sources.values() for n in getattr(s, "class_names", [])})
    tok = _tokenizer(cfg, class_names)
    if len(tok) > mcfg.base_vocab:  # the word tokenizer of the tiny preset may outgrow its base vocabulary
        mcfg = psalm_config(cfg["model"], **overrides, base_vocab=len(tok), tokens=None)
    torch.manual_seed(cfg["seed"])
    model = PSALMModel(mcfg)
    if any(cfg[k] for k in ("model_name_or_path", "vision_tower", "pretrain_mm_mlp_adapter", "psalm_checkpoint")):
        from maskloop.model.psalm.checkpoints import load_pretrained_parts

        load_pretrained_parts(model, llm=cfg["model_name_or_path"], vision_tower=cfg["vision_tower"],
                              mm_projector=cfg["pretrain_mm_mlp_adapter"], psalm_checkpoint=cfg["psalm_checkpoint"])
    if cfg["init_from"]:
        load_trained(model, cfg["init_from"])
    return {"config": cfg, "model": model, "tokenizer": tok, "sources": sources,
            "dataset": PSALMMixture(sources, repeats), "collator": PSALMCollator(mcfg, tok)}


def load_trained(model, path) -> None:
    """Load weights into ``model``: a recipe run / step directory (trainable tensors) or a
    ``.safetensors`` file in PSALMModel keys. Unknown keys are an error; missing ones are
    reported only if nothing matched."""
    from safetensors.torch import load_file

    from maskloop.train.checkpoint import load_checkpoint

    p = Path(path)
    state = load_file(str(p)) if p.suffix == ".safetensors" else load_checkpoint(p, load_optimizer=False)["trainable"]
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise KeyError(f"{path} has {len(unknown)} key(s) PSALMModel does not know, e.g. {unknown[:3]}; "
                       "convert PSALM checkpoints with maskloop.model.psalm.adapt.to_maskloop_keys first")
    bad = [k for k in state if own[k].shape != state[k].shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {bad[:3]} (model preset differs from the checkpoint's)")
    model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------------------------
# training


def _loss_on_batch(model, criterion, batch: dict, device, autocast) -> tuple[torch.Tensor, dict]:
    """Sum over task groups of (group size / batch size) x the group's total loss."""
    from maskloop.data.psalm import group_to

    total, logs = 0.0, {}
    for g in batch["groups"]:
        g = group_to(g, device)
        share = len(g["targets"]) / batch["size"]
        with autocast:
            out = model(g["task"], **g["inputs"])
        loss, terms = criterion(out, g["targets"])
        total = total + share * loss
        logs[f"loss/{g['task']}"] = float(loss.detach())
        for k, v in terms.items():
            if not k[-1].isdigit():  # final-layer terms only in the logs
                logs[k] = logs.get(k, 0.0) + share * float(v.detach())
    logs["loss"] = float(total.detach())
    return total, logs


def train_psalm(config: dict, model=None) -> list[dict]:
    """Train PSALM from a recipe dict (keys of :data:`PSALM_DEFAULTS`); returns the logged history."""
    from tqdm.auto import tqdm

    from maskloop.data.psalm import SourceBatchSampler
    from maskloop.model.psalm.losses import LossWeights, PSALMCriterion
    from maskloop.train.checkpoint import (
        capture_rng,
        latest_checkpoint,
        load_checkpoint,
        restore_rng,
        save_checkpoint,
    )
    from maskloop.train.optim import NonFiniteGuard, build_optimizer, build_scheduler

    # 1. model and data ---------------------------------------------------------------------------
    info = dist.init_distributed()
    device = info.device
    built = build_psalm(config)
    cfg = built["config"]
    model = (model if model is not None else built["model"]).to(device)
    if dist.world_size() > 1:  # rank 0's initial weights everywhere, as DDP does
        for t in list(model.parameters()) + list(model.buffers()):
            torch.distributed.broadcast(t.data, src=0)
    torch.manual_seed(cfg["seed"] + dist.rank())
    model.vision_tower.requires_grad_(bool(cfg["train_backbone"]))
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    dataset, collator = built["dataset"], built["collator"]
    sizes = dataset.source_sizes() if cfg["single_task_batches"] else [len(dataset)]
    sampler = SourceBatchSampler(sizes, cfg["batch_size"], seed=cfg["seed"], num_replicas=dist.world_size(),
                                 rank=dist.rank())
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                         num_workers=cfg["num_workers"])
    acc = int(cfg["accumulation"])
    steps_per_epoch = max(1, len(sampler) // acc)
    total_steps = int(cfg["max_steps"] or cfg["epochs"] * steps_per_epoch)

    # 2. objective, optimizer, schedule -----------------------------------------------------------
    criterion = PSALMCriterion(LossWeights(num_points=cfg["num_points"], deep_supervision=cfg["deep_supervision"],
                                           lm_weight=cfg["lm_weight"]))
    optimizer = build_optimizer(list(params.items()), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                betas=cfg["betas"])
    scheduler = build_scheduler(optimizer, total_steps, warmup_ratio=cfg["warmup_ratio"], schedule=cfg["schedule"])
    guard = NonFiniteGuard(max_consecutive=cfg["max_nonfinite"])
    use_bf16 = cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    run_dir = Path(cfg["run_dir"])
    ckpt_dir = run_dir / "checkpoints"
    step, consumed = 0, 0  # optimizer steps done; batches of the current epoch used
    if cfg["resume"] and latest_checkpoint(ckpt_dir) is not None:
        ck = load_checkpoint(ckpt_dir, map_location=device)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(ck["trainable"][k])
        optimizer.load_state_dict(ck["optimizer_state"])
        scheduler.load_state_dict(ck["scheduler_state"])
        sampler.load_state_dict(ck["sampler_state"])
        guard.load_state_dict(ck["extra"]["guard"])
        restore_rng(ck["rng"])
        step, consumed = ck["step"], sampler.skip
    for s in dataset.sources:
        getattr(s, "set_epoch", lambda e: None)(sampler.epoch)

    def save() -> None:
        if dist.is_main():
            save_checkpoint(
                ckpt_dir, step, trainable={k: v.detach() for k, v in params.items()},
                optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                sampler_state=sampler.state_dict(consumed), rng=capture_rng(),
                extra={"guard": guard.state_dict(), "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                               for k, v in cfg.items()}},
                keep_last=cfg["keep_last"],
            )
        dist.barrier()

    # 3. the loop ---------------------------------------------------------------------------------
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = None
    if dist.is_main():
        (run_dir / "train_config.json").write_text(json.dumps({k: (list(v) if isinstance(v, tuple) else v)
                                                               for k, v in cfg.items()}, indent=1))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))
    history: list[dict] = []
    plist = list(params.values())
    it = iter(loader)
    bar = tqdm(total=total_steps, initial=step, desc="psalm", dynamic_ncols=True,
               disable=not (cfg["progress"] and dist.is_main()))
    skipped_data: dict[str, int] = dict(dataset.skip_counts())
    while step < total_steps:
        t0 = time.perf_counter()
        logs: dict[str, float] = {}
        samples = 0
        for _ in range(acc):
            try:
                batch = next(it)
            except StopIteration:  # next epoch: reshuffle, new random prompt types
                sampler.set_epoch(sampler.epoch + 1)
                for s in dataset.sources:
                    getattr(s, "set_epoch", lambda e: None)(sampler.epoch)
                consumed, it = 0, iter(loader)
                batch = next(it)
            consumed += 1
            samples += batch["size"]
            for k, v in batch["skipped"].items():
                skipped_data[k] = skipped_data.get(k, 0) + v
            loss, micro = _loss_on_batch(model, criterion, batch, device, autocast)
            (loss / acc).backward()
            for k, v in micro.items():
                logs[k] = logs.get(k, 0.0) + v / acc
        if dist.world_size() > 1:
            dist.all_reduce_grads(plist)
        if guard.check(torch.as_tensor(logs["loss"]), [p.grad for p in plist]):
            optimizer.zero_grad(set_to_none=True)
            logs["grad_norm"] = float("nan")
        else:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(plist, cfg["grad_clip"]))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        dt = time.perf_counter() - t0
        logs.update(step=step, epoch=sampler.epoch, lr=scheduler.get_last_lr()[0],
                    samples_per_s=samples * dist.world_size() / max(dt, 1e-9),
                    skipped_steps=guard.total_skipped, data_skipped=sum(skipped_data.values()))
        logs.update({f"data_skipped/{k}": v for k, v in skipped_data.items()})
        bar.set_postfix(loss=f"{logs['loss']:.3f}")
        bar.update(1)
        if step % cfg["log_every"] == 0 or step == total_steps:
            history.append(logs)
            if writer is not None:
                for k, v in logs.items():
                    if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                        writer.add_scalar(k, v, step)
                with (run_dir / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(logs) + "\n")
        if cfg["ckpt_every"] and (step % cfg["ckpt_every"] == 0 or step == total_steps):
            save()
    bar.close()
    if writer is not None:
        writer.close()
    return history


def main_train(argv: list[str] | None = None) -> list[dict]:
    """``maskloop train psalm --config psalm.yaml [key=value ...]`` (values parsed as YAML)."""
    import yaml

    p = argparse.ArgumentParser(prog="maskloop train psalm", description="PSALM joint segmentation training")
    p.add_argument("--config", help="JSON / YAML file with keys of PSALM_DEFAULTS")
    p.add_argument("--print-defaults", action="store_true", help="print PSALM_DEFAULTS as JSON and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=100 data='[{kind: ...}]'")
    a = p.parse_args(argv)
    if a.print_defaults:
        print(json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in PSALM_DEFAULTS.items()}, indent=1))
        return []
    cfg = load_config_file(a.config) if a.config else {}
    for item in a.overrides:
        if "=" not in item:
            p.error(f"override {item!r} must look like key=value")
        k, v = item.split("=", 1)
        cfg[k] = yaml.safe_load(v)
    return train_psalm(cfg)


if __name__ == "__main__":
    main_train()

"""Recipe: PSALM joint segmentation training (docs/recipes.md, "PSALM"), on the shared Trainer.

Top to bottom:

1. **Model** (:meth:`PSALM.build_model`): a :class:`PSALMModel` from a preset (``psalm-tiny`` for tests,
   ``psalm-swinb-phi15`` ...), optionally initialised from a maskloop-key safetensors file (``init_from``,
   e.g. the output of the baseline -> deformable adapter).  The Swin tower stays frozen unless
   ``psalm.train_backbone`` (PSALM's ``train_backbone=False``).
2. **Data** (:meth:`PSALM.build_streams`): PSALM's joint mixture -- COCO panoptic, RefCOCO/+/g,
   COCO-Interactive (and COCO instances if asked) -- each source repeated ``repeat`` times (PSALM's
   ``data_ratio``), every batch drawn from one source (``psalm.single_task_batches``, PSALM's
   ``UnifyDatasetSingleDatasetForBatch``) and collated per task: one stream, ``"psalm"``.
3. **Objective** (:meth:`PSALM.step`): per task group, ``PSALMCriterion`` (Hungarian matching; mask
   BCE + dice; query / class-name / region class; ``[SEG]`` LM term), weighted by the group's share of
   the batch.
4. **Step, checkpoints, logs**: the Trainer's (accumulation, gradients averaged across ranks,
   non-finite guard, clip, AdamW, warmup + cosine; atomic resumable checkpoints; metrics.jsonl + tb/).

Published defaults (``RECIPE_DEFAULTS["psalm"]`` and :class:`~maskloop.config.PsalmConfig`, from PSALM's
``scripts/train.sh``): lr 6e-5, AdamW (betas 0.9 / 0.999) with **weight decay 0**, 3% linear warmup then
cosine, 10 epochs, gradient clip 1.0, bf16 on CUDA, batch 2 per GPU with accumulation 2, no EMA.

``train_psalm(dict)`` / ``main_train(argv)`` keep the flat key space of :data:`PSALM_DEFAULTS`; the CLI
reads ``recipe: psalm`` configs like any other (``maskloop train --config configs/psalm.yaml``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from maskloop.config import ConfigError, PsalmConfig, TrainConfig, nest_flat_keys, to_dict
from maskloop.train.recipe import Recipe, StepOutput

__all__ = ["PSALM", "PSALM_DEFAULTS", "train_psalm", "build_psalm", "build_source", "load_trained", "main_train",
           "load_config_file", "psalm_train_config"]

_SHARED_KEYS = ("model", "init_from", "steps", "batch_size", "accumulation", "lr", "weight_decay", "betas",
                "warmup_ratio", "schedule", "grad_clip", "precision", "max_nonfinite", "run_dir", "seed",
                "ckpt_every", "keep_last", "log_every", "progress", "num_workers")


def _flat_defaults() -> dict:
    from maskloop.config import RECIPE_DEFAULTS

    train = to_dict(TrainConfig.from_mapping({"recipe": "psalm", **RECIPE_DEFAULTS["psalm"]}))
    out = {("max_steps" if k == "steps" else k): train[k] for k in _SHARED_KEYS}
    out.update(to_dict(PsalmConfig()))
    out["betas"] = tuple(out["betas"])
    out["resume"] = False
    return out


_SHAPES_EXTRA_WORDS = ("background", "rectangle", "ellipse")


def psalm_train_config(flat: dict) -> tuple[TrainConfig, bool]:
    """(the TrainConfig, resume) of a flat recipe dict in the keys of :data:`PSALM_DEFAULTS`."""
    flat = dict(flat)
    unknown = sorted(set(flat) - set(PSALM_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown PSALM recipe key(s) {unknown}; known: {sorted(PSALM_DEFAULTS)}")
    resume = bool(flat.pop("resume", False))
    flat.pop("recipe", None)
    return TrainConfig.from_mapping(nest_flat_keys({"recipe": "psalm", **flat}, warn=False)), resume


# ----------------------------------------------------------------------------------------------
# construction


def load_config_file(path) -> dict:
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        return json.loads(text)
    import yaml

    return yaml.safe_load(text) or {}


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
    raise ConfigError(f"unknown PSALM data kind {kind!r}; one of coco_panoptic, coco_semantic, coco_instances, "
                      "coco_interactive, coco_interactive_cross, refcoco")


# PSALM's --data_ratio fields (train.py make_unify_datamodule): panoptic || referring || region || mm_conv
_RATIO_GROUP = {"coco_panoptic": 0, "coco_semantic": 0, "coco_instances": 0, "refcoco": 1, "coco_interactive": 2}


def _data_ratio(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        r = [int(x) for x in str(text).split("||")]
    except ValueError:
        r = []
    if len(r) != 4 or min(r) < 0:
        raise ConfigError(f"psalm.data_ratio must be PSALM's 'a||b||c||d' (non-negative integers: panoptic || "
                          f"referring || region || mm_conv repeats), got {text!r}")
    if r[3]:
        raise ConfigError(f"psalm.data_ratio {text!r}: maskloop has no LLaVA conversation (mm_conv) reader; set the "
                          "4th field to 0")
    return r


def _check_cross_image(p: PsalmConfig, eval_mode: bool) -> None:
    """``cross_image: true`` <-> a ``coco_interactive_cross`` source in the training data."""
    n_cross = sum(1 for s in p.data if s.get("kind") == "coco_interactive_cross")
    if p.cross_image and not n_cross:
        raise ConfigError("psalm.cross_image is true but `data` has no cross-image source; add "
                          "{kind: coco_interactive_cross, json_path: <PSALM's cross-image json>, image_dir: <root>}")
    if n_cross and not p.cross_image and not eval_mode:
        raise ConfigError("`data` has a coco_interactive_cross source but psalm.cross_image is false; set "
                          "psalm.cross_image: true to train the cross-image task (or drop the source)")


def _tokenizer(cfg, class_names: list[str]):
    path = cfg["tokenizer"] if isinstance(cfg, dict) else cfg.psalm.tokenizer
    if path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    from maskloop.data.psalm import INSTRUCTIONS
    from maskloop.data.sources.shapes import all_words
    from maskloop.model.prompts import build_word_tokenizer

    words = set(all_words()) | set(_SHAPES_EXTRA_WORDS)
    for text in list(INSTRUCTIONS.values()) + class_names:
        words |= {w.strip(".,:?").lower() for w in text.split()} - {""}
    return build_word_tokenizer(sorted(words))


#: model switches a published PSALM checkpoint needs to see PSALM's inputs (docs/checkpoints.md): the class
#: name "background" as the no-object class, each class name as its own tokens + [SEG] averaged over its span
PSALM_CHECKPOINT_INPUTS = {"no_object": "background", "class_name_tokens": "span"}


def build_psalm(config: dict | TrainConfig, eval_mode: bool = False) -> dict:
    """-> {"config", "model", "tokenizer", "collator", "dataset", "sources"} from a flat recipe dict (keys of
    :data:`PSALM_DEFAULTS`) or a ``recipe: psalm`` :class:`TrainConfig`."""
    from maskloop.data.psalm import PSALMCollator, PSALMMixture
    from maskloop.model.psalm.model import PSALMModel, psalm_config

    cfg = config if isinstance(config, TrainConfig) else psalm_train_config(config)[0]
    p = cfg.psalm
    overrides = dict(p.model_overrides)
    if p.psalm_checkpoint:  # a published PSALM checkpoint was trained with PSALM's class-name inputs
        for key, value in PSALM_CHECKPOINT_INPUTS.items():
            if key not in overrides:
                overrides[key] = value
                print(f"psalm: {key}: {value} (PSALM's, for the PSALM checkpoint; set model_overrides.{key} to change)")
    if p.image_size:
        overrides["image_size"] = int(p.image_size)
    mcfg = psalm_config(cfg.model, **overrides)
    image_size = mcfg.image_size
    mask_size = int(p.mask_size or image_size)
    if not p.data:
        raise ConfigError("the PSALM recipe needs `data`: a list of source specs, e.g. "
                          "[{kind: coco_panoptic, root: /data/coco, split: train2017}, ...]")
    _check_cross_image(p, eval_mode)
    ratio = _data_ratio(p.data_ratio)
    sources, repeats = {}, {}
    for i, spec in enumerate(p.data):
        name = spec.get("name") or f"{spec['kind']}{i}"
        s = dict(spec)
        s.setdefault("name", name)
        sources[name] = build_source(s, image_size, mask_size, cfg.seed)
        rep = int(spec.get("repeat", 1))
        if ratio is not None and spec["kind"] in _RATIO_GROUP:
            if "repeat" in spec:
                raise ConfigError(f"data source {name!r} sets `repeat` and psalm.data_ratio is set too; give one")
            rep = ratio[_RATIO_GROUP[spec["kind"]]]
        repeats[name] = rep if not eval_mode else 1
    if not eval_mode and not any(repeats.values()):
        raise ConfigError("every PSALM data source has repeat 0 (psalm.data_ratio / repeat): nothing to train on")
    class_names = sorted({n for s in sources.values() for n in getattr(s, "class_names", [])})
    tok = _tokenizer(cfg, class_names)
    if len(tok) > mcfg.base_vocab:  # the word tokenizer of the tiny preset may outgrow its base vocabulary
        mcfg = psalm_config(cfg.model, **overrides, base_vocab=len(tok), tokens=None)
    torch.manual_seed(cfg.seed)
    model = PSALMModel(mcfg)
    if any((p.model_name_or_path, p.vision_tower, p.pretrain_mm_mlp_adapter, p.psalm_checkpoint)):
        from maskloop.model.psalm.checkpoints import load_pretrained_parts

        load_pretrained_parts(model, llm=p.model_name_or_path, vision_tower=p.vision_tower,
                              mm_projector=p.pretrain_mm_mlp_adapter, psalm_checkpoint=p.psalm_checkpoint)
    if cfg.init_from:
        load_trained(model, cfg.init_from)
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
# the recipe


class PSALMStream:
    """The joint mixture as one endless, resumable stream of single-source batches (a Trainer stream)."""

    def __init__(self, dataset, collator, cfg: TrainConfig, rank: int, world: int):
        from maskloop.data.psalm import SourceBatchSampler

        self.dataset = dataset
        sizes = dataset.source_sizes() if cfg.psalm.single_task_batches else [len(dataset)]
        if cfg.psalm.task_switch is not None and not cfg.psalm.single_task_batches:
            raise ConfigError("psalm.task_switch (PSALM's turn-taking between sources) needs "
                              "psalm.single_task_batches: true")
        try:
            self.sampler = SourceBatchSampler(sizes, cfg.batch_size, seed=cfg.seed, num_replicas=world, rank=rank,
                                              task_switch=cfg.psalm.task_switch)
        except ValueError as e:
            raise ConfigError(f"psalm.task_switch: {e}") from None
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collator,
                                                  num_workers=cfg.num_workers)
        self.consumed = 0  # batches of the current epoch used
        from maskloop.data.robust import SkipCounter

        self.skips = SkipCounter()  # the Trainer syncs, logs and checkpoints it (maskloop.train.streams)
        self.skips.update(dataset)
        self._it = None
        self._set_epoch()

    def _set_epoch(self) -> None:  # new random prompt types each epoch
        for s in self.dataset.sources:
            getattr(s, "set_epoch", lambda e: None)(self.sampler.epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def next(self) -> dict:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            batch = next(self._it)
        except StopIteration:  # next epoch: reshuffle
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self._set_epoch()
            self.consumed, self._it = 0, iter(self.loader)
            batch = next(self._it)
        self.consumed += 1
        self.skips.update(batch)
        return batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict(self.consumed)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self.consumed, self._it = self.sampler.skip, None
        self._set_epoch()

    def skip_counts(self) -> dict[str, int]:
        return self.skips.counts()


class PSALM(Recipe):
    streams = ("psalm",)

    def build_model(self):
        self._built = build_psalm(self.cfg)
        return self._built["model"]

    def set_trainable(self, model) -> None:
        model.vision_tower.requires_grad_(bool(self.cfg.psalm.train_backbone))

    def setup(self, model, ema, seed: int) -> None:
        from maskloop.model.psalm.losses import LossWeights, PSALMCriterion

        super().setup(model, ema, seed)
        p = self.cfg.psalm
        self.criterion = PSALMCriterion(LossWeights(num_points=p.num_points, deep_supervision=p.deep_supervision,
                                                    lm_weight=p.lm_weight))
        self.device = next(model.parameters()).device

    def build_streams(self, model) -> dict:
        from maskloop.train import dist

        built = getattr(self, "_built", None) or build_psalm(self.cfg)  # a model handed in: the data still
        return {"psalm": PSALMStream(built["dataset"], built["collator"], self.cfg, dist.rank(), dist.world_size())}

    def total_steps(self, streams: dict) -> int:
        per_epoch = max(1, len(streams["psalm"]) // self.cfg.accumulation)
        return int(self.cfg.steps or self.cfg.psalm.epochs * per_epoch)

    def step(self, batches: dict) -> StepOutput:
        """Sum over the batch's task groups of (group size / batch size) x the group's total loss."""
        from maskloop.data.psalm import group_to

        batch = batches["psalm"]
        total, logs = 0.0, {}
        for g in batch["groups"]:
            g = group_to(g, self.device)
            share = len(g["targets"]) / batch["size"]
            out = self.model(g["task"], **g["inputs"])  # under the Trainer's autocast
            with torch.autocast(self.device.type, enabled=False):  # the criterion in full precision
                loss, terms = self.criterion(out, g["targets"])
            total = total + share * loss
            logs[f"loss/{g['task']}"] = loss.detach()
            for k, v in terms.items():
                if not k[-1].isdigit():  # final-layer terms only in the logs
                    logs[k] = logs.get(k, 0.0) + share * v.detach()
        logs["loss"] = total.detach()
        return StepOutput([total], logs, batch["size"])


def train_psalm(config: dict, model=None) -> list[dict]:
    """Train PSALM from a flat recipe dict (keys of :data:`PSALM_DEFAULTS`); returns the logged history."""
    from maskloop.train.checkpoint import latest_checkpoint
    from maskloop.train.engine import Trainer

    cfg, resume = psalm_train_config(config)
    trainer = Trainer(cfg, model=model, recipe=PSALM(cfg))
    ckpts = Path(cfg.run_dir) / "checkpoints"
    if resume and latest_checkpoint(ckpts) is not None:
        trainer.resume(ckpts)
    return trainer.fit()


def main_train(argv: list[str] | None = None) -> list[dict]:
    """``python -m maskloop.recipes.psalm --config psalm.yaml [key=value ...]`` (values parsed as YAML)."""
    from maskloop.config import apply_overrides

    p = argparse.ArgumentParser(prog="maskloop.recipes.psalm", description="PSALM joint segmentation training")
    p.add_argument("--config", help="JSON / YAML file with keys of PSALM_DEFAULTS")
    p.add_argument("--print-defaults", action="store_true", help="print PSALM_DEFAULTS as JSON and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=100 data='[{kind: ...}]'")
    a = p.parse_args(argv)
    if a.print_defaults:
        print(json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in PSALM_DEFAULTS.items()}, indent=1))
        return []
    return train_psalm(apply_overrides(load_config_file(a.config) if a.config else {}, a.overrides))


PSALM_DEFAULTS: dict = _flat_defaults()

if __name__ == "__main__":
    main_train()

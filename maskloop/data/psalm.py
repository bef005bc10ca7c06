"""PSALM samples: the image transform, the task-grouped collate and a single-source batch sampler.

A PSALM *sample* (what the readers in ``maskloop.data.sources.coco_*`` and the referring
adapter return) is a dict; ``M`` is the transform's ``mask_size``, ``S`` its ``image_size``:

=====================  ===========================  =======================================
key                    shape / type                 tasks
=====================  ===========================  =======================================
``task``               str                          all (one of ``model.psalm.TASKS``)
``pixel_values``       (3, S, S) float32            all (ImageNet-normalised, direct resize)
``masks``              (N, M, M) float32 {0, 1}     all: the targets
``labels``             (N,) int64                   all: class index (panoptic / semantic /
                                                    instance), region index (region), 0
                                                    (referring)
``class_names``        list[str] (K)                panoptic / semantic / instance
``isthing``            list[bool] (K)               panoptic / semantic / instance
``category_ids``       list[int] (K)                dataset category id of each class index
``panoptic_map``       (M, M) int64 segment ids     panoptic (0 = void), for PQ
``segments``           list[{id, category_id,       panoptic: ``category_id`` is the class
                       iscrowd}]                    index
``semantic_map``       (M, M) int64, 255 = ignore   panoptic / semantic, for mIoU
``crowd_masks``        (C, M, M), ``crowd_labels``  instance: crowd regions (not targets; AP)
``region_masks``       (R, M, M) float32            region: the (thickened) visual prompts
``prompt_type``        str                          region: point / scribble / box / mask
``expression``         str                          referring
=====================  ===========================  =======================================

The images are resized directly to S x S (bicubic) and every mask / id map to M x M
(nearest, PIL pixel-centre sampling), the maskloop convention (no LSJ crop, no padding).

:class:`PSALMCollator` tokenises the task prompt (the layout of
:func:`maskloop.model.psalm.model.build_prompt_ids`) and batches samples **per task**: a
batch of mixed tasks becomes one group per task, each group holding exactly the keyword
arguments of :meth:`PSALMModel.forward` plus the criterion's targets. PSALM itself draws
every batch from a single dataset (``UnifyDatasetSingleDatasetForBatch``); use
:class:`SourceBatchSampler` for that, or any sampler for mixed batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, JpegImagePlugin
from torch.utils.data import ConcatDataset, Sampler

from .robust import merge_skip_counts, worker_errors
from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "PSALMTransform", "PSALMCollator", "SourceBatchSampler", "PSALMMixture", "INSTRUCTIONS",
    "referring_sample",
]

_BICUBIC = Image.Resampling.BICUBIC
_NEAREST = Image.Resampling.NEAREST

#: Instruction text per task (PSALM's wording, without the special tokens, which
#: ``build_prompt_ids`` lays out).
INSTRUCTIONS = {
    "panoptic": "Please do panoptic segmentation. This is all the candidate categories:",
    "semantic": "Please do semantic segmentation. This is all the candidate categories:",
    "instance": "Please do instance segmentation. This is all the candidate categories:",
    "referring": "Please segment the object according to the description:",
    "region": "Please segment by given regions. This is all regions:",
    "cross_image": "Please segment by given regions. This is all regions:",
}
CLASS_TASKS = ("panoptic", "semantic", "instance")
#: PSALM's no-object class name (``coco_class_name + ['background']`` in its train_datasets.py), appended
#: last under ``PSALMConfig.no_object = "background"``
BACKGROUND = "background"


class PSALMTransform:
    """Original image -> ``pixel_values`` (3, S, S); masks / id maps -> (M, M) nearest.

    ``mask_size="original"`` (or ``original=True``; what evaluation uses, see
    :func:`maskloop.eval.psalm_eval.evaluate_psalm`): masks and id maps keep the image's own size, so
    that predictions are scored there as Mask2Former / PSALM do (COCO area ranges in original pixels, no
    object lost to a resize).  The model's *inputs* stay at the model size: the collator resizes the
    region prompts (``region_masks``) to S x S with the same nearest rule.
    """

    def __init__(self, image_size: int = 1024, mask_size: int | str | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, draft: bool = True,
                 original: bool = False):
        self.image_size = int(image_size)
        self.original = bool(original) or mask_size == "original"
        self.mask_size = self.image_size if (mask_size is None or mask_size == "original") else int(mask_size)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)
        self.draft = bool(draft)

    def __repr__(self) -> str:
        m = "'original'" if self.original else self.mask_size
        return f"PSALMTransform(image_size={self.image_size}, mask_size={m})"

    @property
    def draft_size(self) -> int | None:
        return self.image_size if self.draft else None

    def image(self, img: Image.Image) -> torch.Tensor:
        if self.draft and isinstance(img, JpegImagePlugin.JpegImageFile) and img.tile:
            img.draft("RGB", (self.image_size, self.image_size))
        img = img if img.mode == "RGB" else img.convert("RGB")
        s = self.image_size
        small = img if img.size == (s, s) else img.resize((s, s), _BICUBIC)
        x = (np.asarray(small, dtype=np.float32) * (1.0 / 255.0) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def masks(self, masks: np.ndarray) -> torch.Tensor:
        """(N, H, W) bool -> (N, M, M) float32 ((N, H, W) when ``original``)."""
        if self.original:
            return torch.from_numpy(np.asarray(masks, dtype=bool).astype(np.float32))
        m = self.mask_size
        out = np.zeros((len(masks), m, m), dtype=np.float32)
        for i, mk in enumerate(masks):
            pil = Image.fromarray(np.asarray(mk, dtype=bool).astype(np.uint8) * 255)
            out[i] = np.asarray(pil.resize((m, m), _NEAREST)) > 127
        return torch.from_numpy(out)

    def label_map(self, ids: np.ndarray) -> torch.Tensor:
        """(H, W) integer map -> (M, M) int64 (nearest; as is when ``original``)."""
        if self.original:
            return torch.from_numpy(np.asarray(ids).astype(np.int64))
        m = self.mask_size
        pil = Image.fromarray(np.asarray(ids, dtype=np.int32), mode="I")
        return torch.from_numpy(np.asarray(pil.resize((m, m), _NEAREST)).astype(np.int64))


def referring_sample(sample: dict) -> dict:
    """A :class:`~maskloop.data.sources.refcoco.RefCOCODataset` sample -> a PSALM referring sample.

    Build the RefCOCO reader with ``SampleTransform(image_size=S, sam_size=M)``; its
    ``pixel_values`` (S) and ``masks`` (M) are used as they are; a sample that carries the original-size
    ``gt_mask`` (the evaluation transform) gives that as the target instead.
    """
    target = sample["gt_mask"] if "gt_mask" in sample else sample["masks"]
    return {
        "task": "referring", "pixel_values": sample["pixel_values"], "masks": target[None].float(),
        "labels": torch.zeros(1, dtype=torch.long), "expression": sample["expression"],
        "dataset": sample.get("dataset"), "skipped": sample.get("skipped", []),
        "skipped_keys": sample.get("skipped_keys", []),
    }


class _ReferringView(torch.utils.data.Dataset):
    """Wraps a RefCOCO-style dataset (expression + mask) as PSALM referring samples."""

    wrap_sample = staticmethod(referring_sample)  # evaluation reads the inner reader and wraps (no substitution)

    def __init__(self, dataset):
        self.dataset = dataset
        self.name = getattr(dataset, "name", "referring")

    def __len__(self):
        return len(self.dataset)

    @worker_errors()
    def __getitem__(self, i):
        return referring_sample(self.dataset[i])

    def skip_counts(self):
        return getattr(self.dataset, "skip_counts", dict)()

    def bad_items(self):
        return getattr(self.dataset, "bad_items", list)()


class PSALMMixture(ConcatDataset):
    """Several PSALM sources, each repeated ``repeat`` times (PSALM's ``data_ratio``).

    ``sources``: name -> dataset (RefCOCO-style datasets are wrapped as referring samples).
    """

    def __init__(self, sources: dict, repeats: dict | None = None):
        self.names = list(sources)
        self.sources = [s if _is_psalm(s) else _ReferringView(s) for s in sources.values()]
        repeats = repeats or {}
        self.repeats = [int(repeats.get(n, 1)) for n in self.names]
        super().__init__([s for s, r in zip(self.sources, self.repeats) for _ in range(r)])

    def source_sizes(self) -> list[int]:
        return [len(d) for d in self.datasets]

    def skip_counts(self) -> dict[str, int]:
        return merge_skip_counts(*(getattr(s, "skip_counts", dict)() for s in self.sources))


def _is_psalm(ds) -> bool:
    """PSALM readers declare ``psalm_task``; anything else is read as expression + mask."""
    return getattr(ds, "psalm_task", None) is not None


class SourceBatchSampler(Sampler[list[int]]):
    """Batches that each come from one sub-dataset of a ``ConcatDataset`` (PSALM's scheme).

    Every sub-dataset's indices are shuffled (seed + epoch), cut into batches, the batches
    of all sub-datasets shuffled together, then dealt round-robin to the ``num_replicas``
    ranks (each rank gets ``len // num_replicas`` batches, so ranks stay in step).

    ``task_switch`` (PSALM's ``UnifyDatasetSingleDatasetForBatch``, which its ``train.py`` builds with
    16): instead of shuffling the batches of all sub-datasets together, visit the sub-datasets in
    turn (their order in the ``ConcatDataset``, a repeated source once per repeat), ``task_switch``
    samples of one before moving to the next, each sub-dataset's shuffled indices taken cyclically
    (PSALM's ``idx % len``); every rank sees the same turn order. An epoch has as many batches as the
    shuffled scheme.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, drop_last: bool = True, shuffle: bool = True, task_switch: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if task_switch is not None and (task_switch < batch_size or task_switch % batch_size):
            raise ValueError(f"task_switch={task_switch} must be a multiple of batch_size={batch_size}: PSALM "
                             "switches source after that many samples and a batch holds one source")
        self.task_switch = task_switch
        self.sizes = list(sizes)
        self.batch_size = int(batch_size)
        self.seed, self.num_replicas, self.rank = int(seed), int(num_replicas), int(rank)
        self.drop_last, self.shuffle = drop_last, shuffle
        self.epoch = 0
        self.skip = 0  # batches of the current epoch already consumed (resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.skip = 0

    def _round_robin(self, g: torch.Generator) -> list[list[int]]:
        """PSALM's turn-taking: ``task_switch / batch_size`` batches per rank from each sub-dataset in turn."""
        per_turn = self.task_switch // self.batch_size * self.num_replicas
        n_batches = len(self) * self.num_replicas
        offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        live = [i for i, n in enumerate(self.sizes) if n > 0]
        perms = {i: (torch.randperm(self.sizes[i], generator=g) if self.shuffle else torch.arange(self.sizes[i]))
                 for i in live}
        pos = dict.fromkeys(live, 0)
        batches: list[list[int]] = []
        turn = 0
        while len(batches) < n_batches and live:
            i = live[turn % len(live)]
            for _ in range(min(per_turn, n_batches - len(batches))):
                idx = [int(perms[i][(pos[i] + k) % self.sizes[i]]) + offsets[i] for k in range(self.batch_size)]
                pos[i] += self.batch_size
                batches.append(idx)
            turn += 1
        return batches[self.rank::self.num_replicas]

    def _all_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.task_switch is not None:
            return self._round_robin(g)
        batches, offset = [], 0
        for n in self.sizes:
            idx = (torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)) + offset
            for s in range(0, n, self.batch_size):
                b = idx[s:s + self.batch_size].tolist()
                if len(b) == self.batch_size or not self.drop_last:
                    batches.append(b)
            offset += n
        if self.shuffle:
            order = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in order]
        per = len(batches) // self.num_replicas
        return batches[self.rank: per * self.num_replicas: self.num_replicas]

    def __len__(self) -> int:
        total = sum((n // self.batch_size) if self.drop_last else math.ceil(n / self.batch_size) for n in self.sizes)
        return total // self.num_replicas

    def __iter__(self):
        yield from self._all_batches()[self.skip:]

    def state_dict(self, consumed_batches: int) -> dict:
        return {"epoch": self.epoch, "skip": int(consumed_batches)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.skip = int(state["epoch"]), int(state["skip"])


# --------------------------------------------------------------------------------------
# collate
# --------------------------------------------------------------------------------------


class PSALMCollator:
    """Samples -> ``{"groups": [group per task], "size": B, "skipped": {...}}``.

    A group is ``{"task", "inputs": kwargs of PSALMModel.forward (no task), "targets":
    [{"labels", "masks"}] for PSALMCriterion, "meta": [per-sample eval info], "index":
    positions of its samples in the batch}``.

    ``tokenizer``: a Hugging Face tokenizer (``encode``) or a callable text -> ids. Every
    text id must be below ``config.base_vocab`` (the special tokens sit after it).
    ``lm_labels``: supervise the ``[SEG]`` token with the LM loss (PSALM's answer token).
    """

    META_KEYS = ("class_names", "isthing", "category_ids", "panoptic_map", "segments", "semantic_map", "iscrowd",
                 "expression", "prompt_type", "image_id", "dataset", "masks", "labels", "crowd_masks", "crowd_labels")

    def __init__(self, config, tokenizer, instructions: dict | None = None, lm_labels: bool = True,
                 pad_id: int | None = None):
        from maskloop.model.psalm.model import n_image_tokens

        self.config = config
        self.tokenizer = tokenizer
        self.instructions = {**INSTRUCTIONS, **(instructions or {})}
        self.lm_labels = lm_labels
        self.pad_id = pad_id if pad_id is not None else int(getattr(tokenizer, "pad_token_id", None) or 0)
        self.n_image = n_image_tokens(config)
        self._cache: dict[str, list[int]] = {}
        #: resize ``region_masks`` (model inputs) to this size; set while evaluating at the original size
        self.region_size: int | None = None

    def encode(self, text: str) -> list[int]:
        if text not in self._cache:
            enc: Callable = getattr(self.tokenizer, "encode", None)
            ids = list(enc(text, add_special_tokens=False)) if enc is not None else list(self.tokenizer(text))
            bad = [i for i in ids if not 0 <= i < self.config.base_vocab]
            if bad:
                raise ValueError(f"tokenizer gave ids {bad[:5]} for {text!r}, outside the model's base vocabulary "
                                 f"[0, {self.config.base_vocab}); build the PSALM config with base_vocab >= "
                                 f"len(tokenizer) (psalm_config(name, base_vocab=..., tokens=None))")
            self._cache[text] = ids
        return self._cache[text]

    def _class_names(self, sample: dict) -> list[str]:
        """The sample's class names; with ``no_object: background`` PSALM's ``background`` appended last."""
        names = list(sample["class_names"])
        return names + [BACKGROUND] if getattr(self.config, "no_object", "embed") == "background" else names

    @worker_errors("collate")
    def __call__(self, samples: list[dict]) -> dict:
        order: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            order.setdefault(s["task"], []).append(i)
        groups = [self.group(task, [samples[i] for i in idx], idx) for task, idx in order.items()]
        skipped = merge_skip_counts(*({k: 1} for s in samples for k in s.get("skipped", [])))
        keys = {f"{sr.split('/', 1)[0]}\t{key}": sr for s in samples
                for sr, key in zip(s.get("skipped") or [], s.get("skipped_keys") or [])}
        return {"groups": groups, "size": len(samples), "skipped": skipped, "skipped_keys": keys}

    def group(self, task: str, samples: list[dict], index: list[int] | None = None) -> dict:
        from maskloop.model.psalm.model import build_prompt_ids

        cfg, tok = self.config, self.config.tokens
        text = self.encode(self.instructions[task])
        ids, refer = [], []
        for s in samples:
            kw = {}
            if task in CLASS_TASKS:
                if getattr(cfg, "class_name_tokens", "token") == "span":  # PSALM: name tokens + [SEG] each
                    kw["cls_lengths"] = [len(self.encode(n)) + 1 for n in self._class_names(s)]
                else:
                    kw["n_cls"] = len(self._class_names(s))
            elif task in ("region", "cross_image"):
                kw["n_regions"] = int(s["region_masks"].shape[0])
            elif task == "referring":
                kw["refer_ids"] = self.encode(s["expression"])
            i, r = build_prompt_ids(cfg, task, text, self.n_image, cfg.num_queries, **kw)
            ids.append(i)
            refer.append(r)
        B, T = len(samples), max(len(i) for i in ids)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attention = torch.zeros(B, T, dtype=torch.long)
        refer_mask = torch.zeros(B, T, dtype=torch.bool)
        for b, (i, r) in enumerate(zip(ids, refer)):
            input_ids[b, :len(i)] = torch.tensor(i)
            attention[b, :len(i)] = 1
            refer_mask[b, :len(r)] = torch.tensor(r)
        inputs: dict = {
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "input_ids": input_ids, "attention_mask": attention,
        }
        if self.lm_labels:
            inputs["labels"] = torch.where(input_ids == tok.seg_token, input_ids, torch.full_like(input_ids, -100))
        if task in CLASS_TASKS:
            names = [[self.encode(n) for n in self._class_names(s)] for s in samples]
            K = max(len(n) for n in names)
            L = max((len(x) for n in names for x in n), default=1)
            cid = torch.full((B, K, max(L, 1)), self.pad_id, dtype=torch.long)
            cmask = torch.zeros(B, K, max(L, 1), dtype=torch.bool)
            valid = torch.zeros(B, K, dtype=torch.bool)
            for b, n in enumerate(names):
                for k, x in enumerate(n):
                    cid[b, k, :len(x)] = torch.tensor(x, dtype=torch.long)
                    cmask[b, k, :len(x)] = True
                    valid[b, k] = True
            inputs.update(class_name_ids=cid, class_name_mask=cmask, class_valid=valid)
        elif task in ("region", "cross_image"):
            R = max(int(s["region_masks"].shape[0]) for s in samples)
            regions = [s["region_masks"] for s in samples]
            if self.region_size:  # original-size prompts (evaluation) -> the size the model is fed
                regions = [_nearest(x, self.region_size) for x in regions]
            hw = regions[0].shape[-2:]
            rm = torch.zeros(B, R, *hw)
            rv = torch.zeros(B, R, dtype=torch.bool)
            for b, x in enumerate(regions):
                r = x.shape[0]
                rm[b, :r] = x
                rv[b, :r] = True
            inputs.update(region_masks=rm, region_valid=rv)
            if task == "cross_image":
                inputs["prompt_pixel_values"] = torch.stack([s["prompt_pixel_values"] for s in samples])
        elif task == "referring":
            inputs["refer_mask"] = refer_mask
        targets = [{"labels": s["labels"].long(), "masks": s["masks"].float()} for s in samples]
        meta = [{k: s[k] for k in self.META_KEYS if k in s} for s in samples]
        return {"task": task, "inputs": inputs, "targets": targets, "meta": meta,
                "index": list(index) if index is not None else list(range(B))}


def _nearest(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(R, H, W) {0, 1} -> (R, size, size) by pixel-centre nearest sampling (PIL's NEAREST rule)."""
    if masks.shape[-2:] == (size, size):
        return masks
    return torch.nn.functional.interpolate(masks[None].float(), size=(size, size), mode="nearest-exact")[0]


def group_to(group: dict, device, dtype: torch.dtype | None = None) -> dict:
    """Move a collated group's tensors (inputs and targets) to ``device``."""
    def mv(v):
        if not isinstance(v, torch.Tensor):
            return v
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        return v.to(device, non_blocking=True)

    out = dict(group)
    out["inputs"] = {k: mv(v) for k, v in group["inputs"].items()}
    out["targets"] = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in group["targets"]]
    return out

"""Evaluation-side data handling: the ground truth at the original size, and skip-and-count.

Two things differ from training:

* **The ground truth stays at the original resolution.**  :class:`EvalTransform` is the
  ordinary :class:`~maskloop.data.transforms.SampleTransform` (same model inputs) that also
  hands back the original mask as ``gt_mask`` (H, W) bool and ``orig_size`` (H, W), so that
  predictions are resized to the image's own size and scored there, as Sa2VA's and
  Mask2Former's evaluations do.  Every reader takes a ``transform=``, so no reader changes.
* **Nothing is substituted.**  For training, a bad sample is replaced by the next valid one
  (:class:`~maskloop.data.robust.RobustDataset`); in evaluation that would score a duplicate and
  report ``n = len(split)``.  :class:`EvalSplit` calls the reader's ``load`` directly: a bad
  sample becomes a *skip marker* carrying its reason, :func:`eval_collate` drops markers from the
  batch and counts them, and the results carry ``n_scored`` / ``n_skipped`` / ``skipped``
  (per reason).  Counting happens in the main process from the markers, so DataLoader workers
  neither lose nor double count.

    tf = eval_transform(model.cfg)
    ds = RefCOCODataset(root, split="val", transform=tf)
    counts = SkipCounts()
    for batch in eval_loader(ds, batch_size=8):
        counts.add(batch)
        if not batch["n"]:
            continue
        ...  # batch["gt_mask"]: list of (H_i, W_i) bool tensors
    counts.as_dict()  # {'n_skipped': 1, 'skipped': {'missing_file': 1}}
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from maskloop.data.robust import RobustDataset, classify
from maskloop.data.tiles import TiledTransform
from maskloop.data.transforms import SampleTransform

SKIP = "_skip"  # key of a skip marker: {SKIP: reason, "key": what was bad}


class EvalTransform(SampleTransform):
    """:class:`SampleTransform` that also returns the original mask (``gt_mask``, (H, W) bool) and
    ``orig_size`` (H, W).

    With a tiling model config, :func:`eval_transform` gives :class:`TiledEvalTransform` (InternVL's
    dynamic 448-tiles + thumbnail as ``pixel_values`` (n, 3, S, S) and ``num_tiles``); the model reads
    them in :func:`maskloop.eval.refer.mllm_image_inputs`.
    """

    keep_empty = True  # a sample whose decoded mask is empty is scored, not skipped (see data.sources.common)

    def __call__(self, image, mask):
        out = super().__call__(image, mask)
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        out["gt_mask"] = torch.from_numpy(np.ascontiguousarray(m > 0))
        out["orig_size"] = tuple(int(s) for s in m.shape[-2:])
        return out


class TiledEvalTransform(EvalTransform, TiledTransform):
    """:class:`EvalTransform` over InternVL's tiles (:class:`~maskloop.data.tiles.TiledTransform`)."""


def eval_transform(model_cfg) -> EvalTransform:
    """The evaluation transform at a model config's sizes (tiled when ``model_cfg.tiles``)."""
    c = model_cfg
    if c.tiles:
        return TiledEvalTransform.from_config(c)
    return EvalTransform(image_size=c.vision.image_size, sam_size=c.sam2.image_size, prompt_grid=c.prompt_grid)


class EvalSplit(torch.utils.data.Dataset):
    """A split for evaluation: item ``i`` is sample ``i`` or a skip marker, never another sample.

    ``dataset``: a :class:`RobustDataset` (its ``load`` is called directly, bad items are recorded
    in its skip log as usual) or any map-style dataset (an exception there is counted as a skip).
    ``max_samples``: evaluate the first ``max_samples`` items only.
    """

    def __init__(self, dataset, max_samples: int | None = None):
        self.dataset = dataset
        self.n = len(dataset) if max_samples is None else min(len(dataset), int(max_samples))
        self.name = getattr(dataset, "name", "dataset")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(f"{self.name}: index {i} out of range for {self.n} samples")
        ds, i, wraps = _locate(self.dataset, i)
        item = self._read(ds, i)
        if SKIP not in item:
            for w in reversed(wraps):
                item = w(item)
        return item

    def _read(self, ds, i: int) -> dict:
        if isinstance(ds, RobustDataset):
            for k in ds.item_keys(i):  # a file already known bad (e.g. another sentence of a missing image)
                if k in ds._bad:
                    return {SKIP: ds._bad[k][0], "key": k}
            if i in ds._bad_indices:
                return {SKIP: "known_bad", "key": f"{self.name}[{i}]"}
            try:
                sample = ds.load(i)
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:  # noqa: BLE001 - counted, never fatal, never substituted
                key = str(getattr(e, "key", None) or f"{self.name}[{i}]")
                ds.record_bad(classify(e), key, getattr(e, "detail", "") or str(e))
                ds._bad_indices.add(i)
                ds._new_skips = []
                return {SKIP: classify(e), "key": key}
            sample.setdefault("dataset", getattr(ds, "name", self.name))
            sample["skipped"] = []
            return sample
        try:
            return ds[i]
        except (KeyboardInterrupt, MemoryError, IndexError):
            raise
        except Exception as e:  # noqa: BLE001
            return {SKIP: classify(e), "key": f"{self.name}[{i}]"}


def _locate(ds, i: int):
    """(reader, index in it, [sample wrappers]) through ConcatDataset / Subset and views that declare
    ``wrap_sample`` over a ``dataset`` (e.g. PSALM's referring view), so the reader itself is asked."""
    import bisect

    wraps = []
    while True:
        if isinstance(ds, torch.utils.data.ConcatDataset):
            k = bisect.bisect_right(ds.cumulative_sizes, i)
            i = i - (ds.cumulative_sizes[k - 1] if k else 0)
            ds = ds.datasets[k]
        elif isinstance(ds, torch.utils.data.Subset):
            ds, i = ds.dataset, int(ds.indices[i])
        elif hasattr(ds, "wrap_sample") and hasattr(ds, "dataset"):
            wraps.append(ds.wrap_sample)
            ds = ds.dataset
        else:
            return ds, i, wraps


def eval_collate(samples: list[dict]) -> dict:
    """Batch the valid samples; skip markers become ``batch["skipped"]`` ({reason: n}).

    Tensors of one shape are stacked (a tiled sample's tiles, its regions: concatenated, as in training's
    :func:`~maskloop.data.mixture.collate`); tensors whose shapes differ (``gt_mask`` at each image's own
    size) and other values are kept as lists.  ``batch["n"]``: number of valid samples."""
    valid = [s for s in samples if SKIP not in s]
    batch: dict = {"skipped": dict(Counter(s[SKIP] for s in samples if SKIP in s)), "n": len(valid)}
    keys: list[str] = []
    for s in valid:
        keys += [k for k in s if k not in keys and k != "skipped"]
    from maskloop.data.mixture import _flat_keys

    flat = _flat_keys(keys)  # tiles / regions / several masks a sample: concatenated, their counts stacked
    for k in keys:
        vals = [s.get(k) for s in valid]
        if k in flat and all(isinstance(v, torch.Tensor) for v in vals):
            batch[k] = torch.cat(vals)
        elif all(isinstance(v, torch.Tensor) for v in vals) and len({tuple(v.shape) for v in vals}) == 1:
            batch[k] = torch.stack(vals)
        else:
            batch[k] = vals
    return batch


class SkippingCollate:
    """Wraps a collator of its own (e.g. PSALM's): skip markers are dropped and counted in
    ``batch["eval_skipped"]`` ({reason: n}); ``batch["eval_n"]`` valid samples (the collator is not called
    when there are none)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, samples: list[dict]) -> dict:
        valid = [s for s in samples if SKIP not in s]
        out = self.collate(valid) if valid else {}
        out["eval_skipped"] = dict(Counter(s[SKIP] for s in samples if SKIP in s))
        out["eval_n"] = len(valid)
        return out


def eval_loader(dataset, batch_size: int, num_workers: int = 0, max_samples: int | None = None):
    """A sequential, non-dropping, non-substituting DataLoader over :class:`EvalSplit`."""
    split = dataset if isinstance(dataset, EvalSplit) else EvalSplit(dataset, max_samples)
    return torch.utils.data.DataLoader(split, batch_size=batch_size, shuffle=False, collate_fn=eval_collate,
                                       num_workers=num_workers, drop_last=False)


class SkipCounts:
    """Per-reason counts of the samples an evaluation skipped."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def add(self, batch: dict) -> None:
        self.counts.update(batch.get("skipped") or {})

    @property
    def n(self) -> int:
        return int(sum(self.counts.values()))

    def as_dict(self) -> dict:
        return {"n_skipped": self.n, "skipped": dict(sorted(self.counts.items()))}


def to_device(batch: dict, device) -> dict:
    """Move the batch's tensors (not the lists) to ``device``."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


__all__ = ["EvalSplit", "EvalTransform", "SKIP", "SkipCounts", "SkippingCollate", "eval_collate", "eval_loader", "eval_transform",
           "to_device"]

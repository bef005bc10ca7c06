"""Mixing sources: per-source repeats and weights, distributed + resumable sampling.

:class:`MixtureDataset` concatenates named sources into one index space (global index =
source offset + local index) and defines what one **epoch** contains:

* ``repeats[name]`` (float >= 0, default 1): the source contributes
  ``round(len(source) * repeats)`` samples per epoch (the research config repeats RefCOCO
  x4; 0.5 takes a fresh half each epoch).
* ``weights[name]`` (optional): if given, the epoch length ``L`` is ``num_samples`` (or the
  total from the repeats) and each source gets exactly its share ``L * w / sum(w)``
  (largest-remainder rounding), overriding the repeats' proportions.

A source that needs more samples than it has is cycled through fresh permutations, so
every item is seen before any repeats. :class:`MixtureSampler` shuffles the epoch with a
generator seeded by ``(seed, epoch)`` (identical on every rank), pads (or drops, with
``drop_last``) to a multiple of ``num_replicas`` and gives rank ``r`` the positions
``r, r + R, r + 2R, ...``: shards are disjoint and together cover the epoch. Call
``set_epoch(e)`` each epoch to reshuffle. ``state_dict()`` records (epoch, position) so a
resumed run continues mid-epoch with exactly the remaining order.
:class:`LengthGroupedSampler` additionally sorts windows ("megabatches") of the shuffled
epoch by caption/expression length so that each step's batch has similar lengths.

:func:`collate` stacks tensors, lists strings/None and sums the per-sample skip counts
(``batch["skipped"]``) and keys (``batch["skipped_keys"]``, for
:class:`~maskloop.data.robust.SkipCounter`). Inside DataLoader workers, an error of a source
or of ``collate`` reaches the main process as a one-line :class:`DataError`.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .robust import DataError, merge_skip_counts, worker_errors

__all__ = ["MixtureDataset", "MixtureSampler", "LengthGroupedSampler", "collate"]


class MixtureDataset(Dataset):
    def __init__(
        self,
        sources: Mapping[str, Dataset],
        repeats: Mapping[str, float] | None = None,
        weights: Mapping[str, float] | None = None,
        num_samples: int | None = None,
    ):
        if not sources:
            raise ValueError("MixtureDataset needs at least one source")
        self.names = list(sources)
        self.sources = [sources[n] for n in self.names]
        repeats = dict(repeats or {})
        weights = dict(weights or {})
        for d, what in ((repeats, "repeats"), (weights, "weights")):
            unknown = set(d) - set(self.names)
            if unknown:
                raise ValueError(f"{what} name unknown sources {sorted(unknown)}; sources are {self.names}")
            if any(float(v) < 0 for v in d.values()):
                raise ValueError(f"{what} must be >= 0")
        self.repeats = [float(repeats.get(n, 1.0)) for n in self.names]
        self.sizes = [len(s) for s in self.sources]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        quotas = [int(round(n * r)) for n, r in zip(self.sizes, self.repeats)]
        if weights:
            w = np.array([float(weights.get(n, 0.0)) for n in self.names])
            if w.sum() <= 0:
                raise ValueError("weights must not all be zero")
            total = int(num_samples if num_samples is not None else sum(quotas))
            exact = total * w / w.sum()
            q = np.floor(exact).astype(int)
            for i in np.argsort(-(exact - q), kind="stable")[: total - q.sum()]:
                q[i] += 1
            quotas = [int(x) for x in q]
        elif num_samples is not None:
            raise ValueError("num_samples needs weights (without weights the epoch length follows the repeats)")
        for n, size, q in zip(self.names, self.sizes, quotas):
            if q > 0 and size == 0:
                raise ValueError(f"source {n!r} is empty but is asked for {q} samples per epoch")
        self.quotas = quotas
        self.epoch_length = int(sum(quotas))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return s, int(index - self.offsets[s])

    @worker_errors("mixture")
    def __getitem__(self, index: int) -> dict:
        s, local = self.locate(int(index))
        sample = self.sources[s][local]
        sample["dataset"] = self.names[s]
        return sample

    def epoch_indices(self, epoch: int, seed: int = 0, shuffle: bool = True) -> np.ndarray:
        """Global indices of one epoch (identical on every rank for a given seed/epoch)."""
        parts = []
        for s, (size, q) in enumerate(zip(self.sizes, self.quotas)):
            if q == 0:
                continue
            reps = math.ceil(q / size)
            if shuffle:
                rng = np.random.default_rng([seed, epoch, s])
                local = np.concatenate([rng.permutation(size) for _ in range(reps)])[:q]
            else:
                local = np.tile(np.arange(size), reps)[:q]
            parts.append(local + self.offsets[s])
        idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if shuffle:
            idx = np.random.default_rng([seed, epoch, 1 << 20]).permutation(idx)
        return idx.astype(np.int64)

    def lengths(self) -> np.ndarray:
        """Caption/expression length of every global index (0 when a source has none)."""
        out = np.zeros(len(self), np.int64)
        for s, src in enumerate(self.sources):
            fn = getattr(src, "text_length", None)
            if fn is not None:
                out[self.offsets[s]: self.offsets[s + 1]] = [fn(i) for i in range(self.sizes[s])]
        return out

    def skip_counts(self) -> dict[str, int]:
        return merge_skip_counts(*(getattr(s, "skip_counts", dict)() for s in self.sources))


def _dist_defaults(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None or rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            num_replicas = torch.distributed.get_world_size() if num_replicas is None else num_replicas
            rank = torch.distributed.get_rank() if rank is None else rank
        else:
            num_replicas = 1 if num_replicas is None else num_replicas
            rank = 0 if rank is None else rank
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} must be in [0, {num_replicas})")
    return int(num_replicas), int(rank)


class MixtureSampler(Sampler[int]):
    """Distributed, per-epoch reshuffled, resumable sampler over a :class:`MixtureDataset`.

    ``state_dict()`` -> ``{"epoch", "position", "seed", "num_replicas"}``; ``position`` is
    the number of this rank's indices already *yielded*. A DataLoader with workers pulls
    indices ahead of training, so pass ``consumed=`` (samples this rank actually trained
    on) to :meth:`state_dict` when checkpointing.
    """

    def __init__(
        self,
        dataset: MixtureDataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        self.dataset = dataset
        self.num_replicas, self.rank = _dist_defaults(num_replicas, rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._start = 0  # position to resume from in the current epoch
        self._yielded = 0

    def _global_order(self) -> np.ndarray:
        return self.dataset.epoch_indices(self.epoch, self.seed, self.shuffle)

    def _rank_order(self) -> np.ndarray:
        idx = self._global_order()
        r = self.num_replicas
        if self.drop_last:
            idx = idx[: (len(idx) // r) * r]
        elif len(idx) % r:
            pad = r - len(idx) % r
            idx = np.concatenate([idx, np.resize(idx, pad)]) if len(idx) else idx
        return idx[self.rank:: r]

    def __len__(self) -> int:
        n, r = self.dataset.epoch_length, self.num_replicas
        return n // r if self.drop_last else math.ceil(n / r)

    def __iter__(self) -> Iterator[int]:
        order = self._rank_order()
        start = min(self._start, len(order))
        self._yielded = start
        for i in order[start:]:
            self._yielded += 1
            yield int(i)
        self._start = 0  # a finished epoch restarts from 0 unless resumed again

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self._start = 0
            self._yielded = 0
        self.epoch = int(epoch)

    def state_dict(self, consumed: int | None = None) -> dict:
        return {
            "epoch": self.epoch,
            "position": int(self._yielded if consumed is None else consumed),
            "seed": self.seed,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.epoch = int(state["epoch"])
        position = int(state["position"])
        if int(state.get("seed", self.seed)) != self.seed:
            warnings.warn(f"resuming with seed {self.seed} but the checkpoint used {state['seed']}; the order will differ",
                          stacklevel=2)
        old = int(state.get("num_replicas", self.num_replicas))
        if old != self.num_replicas:  # keep the global progress; the order of the rest differs
            position = (position * old) // self.num_replicas
            warnings.warn(f"world size changed {old} -> {self.num_replicas}: resuming at global sample "
                          f"{position * self.num_replicas}; the remaining order is not identical", stacklevel=2)
        self._start = position
        self._yielded = position


class LengthGroupedSampler(MixtureSampler):
    """:class:`MixtureSampler` whose batches group samples of similar text length.

    The shuffled epoch is cut into megabatches of ``batch_size * num_replicas * mega_batch_mult``
    indices, each sorted by length (longest first); the usual rank striding then gives
    every rank, at every step, a batch of neighbouring lengths.
    """

    def __init__(self, dataset: MixtureDataset, batch_size: int, mega_batch_mult: int = 50,
                 lengths: np.ndarray | None = None, **kwargs):
        super().__init__(dataset, **kwargs)
        self.batch_size = int(batch_size)
        self.mega_batch_mult = int(mega_batch_mult)
        self.lengths = np.asarray(lengths if lengths is not None else dataset.lengths())

    def _global_order(self) -> np.ndarray:
        idx = super()._global_order()
        mb = max(1, self.batch_size * self.num_replicas * self.mega_batch_mult)
        chunks = [idx[i: i + mb] for i in range(0, len(idx), mb)]
        return np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks]) if chunks else idx


# a sample carrying a count (key) holds a variable number of rows in these keys: they are concatenated
# (flat, sample-major), not stacked; the counts (B,) say which rows are whose
FLAT_KEYS = {"num_tiles": ("pixel_values",), "num_regions": ("prompt_masks", "masks"), "num_masks": ("masks",)}


def _flat_keys(keys: list[str]) -> set[str]:
    out = set()
    for count, flat in FLAT_KEYS.items():
        for sfx in ("", "1", "2"):
            if count + sfx in keys:
                out |= {f + sfx for f in flat}
    return out


@worker_errors("collate")
def collate(samples: list[dict]) -> dict:
    """Batch sample dicts: tensors stacked, other values listed, ``skipped`` summed into
    ``{"source/reason": n}`` and ``skipped_keys`` merged into ``{"source\tkey": "source/reason"}``.

    Keys of :data:`FLAT_KEYS` (tiles, regions, several target masks) are concatenated along dim 0
    when their count key is present.  A batch of pairs says whether every sample's image 2 is its image 1
    (the very same tensor, as single-image sources read ``as_pair`` give): ``batch["same_image"]``, a bool,
    so that frozen encoders read such images once."""
    if not samples:
        return {}
    keys: list[str] = []
    for s in samples:
        keys += [k for k in s if k not in keys]
    flat = _flat_keys(keys)
    batch: dict = {}
    for k in keys:
        vals = [s.get(k) for s in samples]
        if k == "skipped":
            batch[k] = merge_skip_counts(*(Counter(v or []) for v in vals))
        elif k == "skipped_keys":
            batch[k] = {f"{sr.split('/', 1)[0]}\t{key}": sr for s in samples
                        for sr, key in zip(s.get("skipped") or [], s.get("skipped_keys") or [])}
        elif k in flat and all(isinstance(v, torch.Tensor) for v in vals):
            batch[k] = torch.cat(vals)
        elif any(isinstance(v, torch.Tensor) for v in vals):
            if not all(isinstance(v, torch.Tensor) for v in vals):
                names = sorted({str(s.get("dataset")) for s in samples if not isinstance(s.get(k), torch.Tensor)})
                raise DataError(f"cannot batch {k!r}: samples from {names} lack it (mixing pair and single "
                                 "samples? build single-image sources with as_pair=True)")
            batch[k] = torch.stack(vals)
        else:
            batch[k] = vals
    if "pixel_values1" in batch and "pixel_values2" in batch:
        batch["same_image"] = all(s.get("pixel_values1") is s.get("pixel_values2") for s in samples)
    return batch

"""Data streams: endless, resumable iterators of batches, one DataLoader each."""

from __future__ import annotations

import torch

from maskloop.config import ConfigError
from maskloop.data.robust import SkipCounter
from maskloop.train import dist
from maskloop.train.build import build_source


class Stream:
    """An endless, resumable iterator of batches over a mixture of sources (one DataLoader)."""

    def __init__(self, name: str, specs: list[dict], model, batch_size: int, seed: int, num_workers: int):
        from maskloop.data.mixture import MixtureDataset, MixtureSampler, collate

        if not specs:
            raise ConfigError(f"the recipe needs data stream {name!r}: add `data: {{{name}: [...]}}` to the config")
        if not isinstance(specs, (list, tuple)):
            raise ConfigError(f"data.{name}: expected a list of source specs, got {type(specs).__name__}")
        built = [build_source(s, model, f"data.{name}[{i}]") for i, s in enumerate(specs)]
        sources = {f"{s['kind']}{i}": b for i, (s, b) in enumerate(zip(specs, built))}
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
        self.skips = SkipCounter()  # distinct bad items met: index-time skips, then every trained batch's
        self.skips.update(self.dataset)

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
        self.skips.update(batch)  # the skips the workers met producing it (skipped_keys)
        return batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict(consumed=self.consumed)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self.consumed = int(state["position"])
        self._it = None

    def sync_skips(self) -> dict[str, int]:
        """The run's skip counts over every worker and rank (a collective: every rank calls it, at log steps
        and before a checkpoint); afterwards ``self.skips`` is the same on every rank."""
        return sync_skips(self)


def sync_skips(stream) -> dict[str, int]:
    """:meth:`Stream.sync_skips` for any stream with a ``skips`` counter and a ``dataset``."""
    stream.skips.update(stream.dataset)  # the main process's own skips (all of them with 0 workers)
    return stream.skips.reduce()


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

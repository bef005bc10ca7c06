"""The recipe interface: what a training recipe gives the :class:`~maskloop.train.engine.Trainer`.

A recipe is a plug-in (one file in ``maskloop/recipes/``); the Trainer owns everything generic (device,
precision, distribution, accumulation, clipping, the optimizer, EMA, checkpoints, logs) and asks the recipe
only for what is specific to its algorithm:

==================  ============================================================================
``build_model()``   the model (default: :func:`maskloop.train.build.build_model` on the config)
``set_trainable``   which parameters train (default: the config's ``freeze`` policy)
``setup()``         after the model is on its device: the recipe's own state (random streams, ...)
``build_streams``   the data streams, name -> :class:`~maskloop.train.streams.Stream` (default: the
                    config's ``data`` for the names in :attr:`Recipe.streams`)
``total_steps``     the run length (default: the config's ``steps``)
``draw()``          the micro-step's batches, one per stream unless the recipe interleaves
``step()``          batches -> :class:`StepOutput`: one objective, or two for a gradient combination
``skippable``       exceptions of ``step()`` that skip the micro-step on every rank (counted)
``combine_grads``   optional: (g1, g2) -> the gradient to accumulate, for two-objective recipes
==================  ============================================================================

Recipes hold no distribution code: the Trainer reduces gradients across ranks (and, later, wraps the model
for DDP / FSDP2) around the calls above.  The algorithm of each recipe: docs/recipes.md.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class StepOutput:
    """One micro-step of a recipe: its objectives, scalar logs (detached tensors or numbers, turned into
    numbers only on log steps: no host sync per micro-step) and the number of samples it used."""

    objectives: list[torch.Tensor]
    logs: dict = field(default_factory=dict)
    samples: int = 0


class Recipe:
    """Base of every recipe; subclasses override :meth:`step` and whichever hooks they need."""

    streams: tuple[str, ...] = ()
    """Data stream names the recipe reads (keys of the config's ``data``)."""
    optional_streams: tuple[str, ...] = ()
    """Of those, the ones the data may leave out (at least one stream must remain)."""
    skippable: tuple[type[BaseException], ...] = ()
    """Exceptions of :meth:`step` that skip the micro-step; counted as ``skipped_micro/<e.counter>`` on the rank
    where it happened (an exception raised because another rank failed sets ``e.local = False``)."""
    combine_grads: Callable | None = None
    """Optional ``combine_grads(g1, g2, **reduction) -> (g, stats)``: g1, g2 are the per-parameter gradients of
    the two objectives of :meth:`step`; ``reduction`` says how they sit across ranks (the Trainer decides,
    :meth:`maskloop.train.sharding.Distributor.surgery_kwargs`): ``reduce=True`` — replicated, still to be
    averaged; ``sharded=True, replicated=[...]`` — FSDP shards, already averaged, their dot products and
    norms to be summed over ranks; nothing — one process.  Pass it on to ``gradient_surgery``.  ``stats``
    are logged as given."""

    def agree(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank (the Trainer sets the distributed version).  A recipe that
        skips a micro-step (raises one of :attr:`skippable`) decides with ``if self.agree(bad): raise ...``,
        so every rank raises at the same point and none is left inside a collective (FSDP all-gathers)."""
        return bool(flag)

    def __init__(self, cfg):
        self.cfg = cfg

    # -- construction ------------------------------------------------------------------------
    def build_model(self):
        from maskloop.train.build import build_model

        return build_model(self.cfg)

    def set_trainable(self, model) -> None:
        model.set_trainable(self.cfg.freeze)

    def setup(self, model, ema, seed: int) -> None:
        """Called once the model is on its device; ``seed`` differs per rank."""
        self.model, self.ema = model, ema

    def build_streams(self, model) -> dict:
        from maskloop.config import ConfigError
        from maskloop.train.streams import Stream

        c = self.cfg
        names = [n for n in self.streams if n in c.data or n not in self.optional_streams]
        if not names:
            raise ConfigError(f"recipe {c.recipe!r} needs data for at least one of {list(self.streams)}")
        return {n: Stream(n, c.data.get(n, []), model, c.batch_size, c.seed, c.num_workers) for n in names}

    def total_steps(self, streams: dict) -> int:
        from maskloop.config import ConfigError

        if self.cfg.steps is None:
            raise ConfigError(f"recipe {self.cfg.recipe!r} needs `steps`")
        return self.cfg.steps

    # -- one micro-step ----------------------------------------------------------------------
    def draw(self, streams: dict, micro: int) -> dict:
        """The batches of micro-step ``micro`` (0, 1, ...): by default one from every stream."""
        return {n: streams[n].next() for n in sorted(streams)}

    def step(self, batches: dict) -> StepOutput:
        raise NotImplementedError

    # -- resumable random streams ------------------------------------------------------------
    def state_dict(self) -> dict:
        out = {}
        for name, v in vars(self).items():
            if isinstance(v, random.Random):
                version, internal, gauss = v.getstate()
                out[name] = {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}
            elif isinstance(v, torch.Generator):
                out[name] = {"generator": v.get_state()}
            elif isinstance(v, Recipe):
                out[name] = v.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        for name, st in state.items():
            v = getattr(self, name)
            if isinstance(v, random.Random):
                v.setstate((int(st["version"]), tuple(int(x) for x in st["state"].tolist()), st["gauss"]))
            elif isinstance(v, torch.Generator):
                v.set_state(st["generator"])
            else:
                v.load_state_dict(st)


def resolve_recipe(cfg) -> Recipe:
    """The recipe named by ``cfg.recipe``, built on ``cfg``, from :data:`maskloop.config.RECIPES` (a
    ``module:Class`` path: the training core names no recipe and imports none statically)."""
    import importlib

    from maskloop.config import RECIPES, ConfigError

    if cfg.recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {cfg.recipe!r}; choose one of {sorted(RECIPES)}")
    module, cls = RECIPES[cfg.recipe].split(":")
    return getattr(importlib.import_module(module), cls)(cfg)

"""Training recipes, one readable file each: sft, loop1, loop2, dual, psalm (docs/recipes.md).

The names and ``module:Class`` paths are :data:`maskloop.config.RECIPES`; :func:`get` builds one for a config
(the CLI calls it and hands the recipe to the Trainer).
"""

from __future__ import annotations

from maskloop.config import RECIPES
from maskloop.train.recipe import Recipe, StepOutput, resolve_recipe

__all__ = ["RECIPES", "Recipe", "StepOutput", "get"]


def get(cfg) -> Recipe:
    """The recipe ``cfg.recipe`` built on ``cfg`` (a :class:`~maskloop.config.TrainConfig`)."""
    return resolve_recipe(cfg)

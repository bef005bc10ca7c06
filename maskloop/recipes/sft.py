"""Recipe: supervised fine-tuning (docs/recipes.md, "SFT").

Each micro-step takes one referring batch (expression -> [SEG] -> mask; LM CE + 2.0 BCE + 0.5 Dice)
and one region-caption batch (mask -> caption; LM CE), and optimises their sum.  A run whose data has
only one of the two streams trains that one alone.
"""

from __future__ import annotations

import random

from maskloop.recipes.common import Recipe, StepOutput, _d, caption_loss, refer_loss
from maskloop.train import dist


class SFT(Recipe):
    streams = ("refer", "caption")
    optional_streams = ("refer", "caption")  # either may be absent (e.g. referring-only SFT)

    def setup(self, model, ema, seed: int) -> None:
        super().setup(model, ema, seed)
        self.rng = random.Random(self.cfg.seed)  # alike on every rank: questions drawn for the global batch

    def step(self, batches: dict) -> StepOutput:
        loss, logs, n = 0.0, {}, 0
        if "refer" in batches:
            loss_r, logs_r = refer_loss(self.model, batches["refer"], self.rng, self.cfg.sft.lm_weight,
                                    (dist.world_size(), dist.rank()))
            loss, n = loss + loss_r, n + batches["refer"]["pixel_values"].shape[0]
            logs.update(logs_r)
        if "caption" in batches:
            loss_c, logs_c = caption_loss(self.model, batches["caption"])
            loss, n = loss + loss_c, n + batches["caption"]["pixel_values"].shape[0]
            logs.update(logs_c)
        return StepOutput([loss], {"loss": _d(loss), **logs}, n)

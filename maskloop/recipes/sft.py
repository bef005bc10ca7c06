"""Recipe: supervised fine-tuning (SPEC §2a).

Each micro-step takes one referring batch (expression -> [SEG] -> mask; LM CE + 2.0 BCE + 0.5 Dice)
and one region-caption batch (mask -> caption; LM CE), and optimises their sum.  A run whose data has
only one of the two streams trains that one alone.
"""

from __future__ import annotations

import random

from maskloop.recipes.common import RecipeBase, StepOutput, _d, caption_loss, refer_loss

STREAMS = ("refer", "caption")
DEFAULTS = {"lr": 4e-5, "warmup_ratio": 0.05, "schedule": "cosine"}


class SFT(RecipeBase):
    def __init__(self, model, cfg, ema=None, seed: int = 0):
        self.model, self.cfg = model, cfg
        self.rng = random.Random(seed)

    def step(self, batches: dict) -> StepOutput:
        loss, logs, n = 0.0, {}, 0
        if "refer" in batches:  # either stream may be absent from the data (e.g. referring-only SFT)
            loss_r, logs_r = refer_loss(self.model, batches["refer"], self.rng, self.cfg.lm_weight)
            loss, n = loss + loss_r, n + batches["refer"]["pixel_values"].shape[0]
            logs.update(logs_r)
        if "caption" in batches:
            loss_c, logs_c = caption_loss(self.model, batches["caption"])
            loss, n = loss + loss_c, n + batches["caption"]["pixel_values"].shape[0]
            logs.update(logs_c)
        return StepOutput([loss], {"loss": _d(loss), **logs}, n)

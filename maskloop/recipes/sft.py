"""Recipe: supervised fine-tuning (SPEC §2a).

Each micro-step takes one referring batch (expression -> [SEG] -> mask; LM CE + 2.0 BCE + 0.5 Dice)
and one region-caption batch (mask -> caption; LM CE), and optimises their sum.
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
        loss_r, logs_r = refer_loss(self.model, batches["refer"], self.rng, self.cfg.lm_weight)
        loss_c, logs_c = caption_loss(self.model, batches["caption"])
        n = batches["refer"]["pixel_values"].shape[0] + batches["caption"]["pixel_values"].shape[0]
        return StepOutput([loss_r + loss_c], {"loss": _d(loss_r + loss_c), **logs_r, **logs_c}, n)

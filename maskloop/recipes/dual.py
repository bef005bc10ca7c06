"""Recipe: Loop 1 + Loop 2 with gradient surgery (SPEC §2d).

Every micro-step pairs one Loop-1 batch (or an interleaved referring batch) with one DAM batch.
The engine takes g1 = grad(loss1) and g2 = grad(loss2) over the trainable parameters (averaged across
ranks), and accumulates g = g1 + beta (g2 - c g1), c = (g1.g2)/|g1|^2 over the whole concatenated
trainable gradient (beta = 0.5, applied always; ``surgery_mode="pcgrad"`` projects only when g1.g2 < 0).
"""

from __future__ import annotations

from maskloop.recipes.common import RecipeBase, StepOutput
from maskloop.recipes.loop1 import Loop1
from maskloop.recipes.loop2 import Loop2

STREAMS = ("pairs", "refer", "dam")
DEFAULTS = {"lr": 1e-5}


class Dual(RecipeBase):
    def __init__(self, model, cfg, ema, seed: int = 0):
        self.loop1 = Loop1(model, cfg, ema, seed)
        self.loop2 = Loop2(model, cfg, ema, seed)

    def step(self, batches: dict) -> StepOutput:
        one = self.loop1.step(batches)
        two = self.loop2.step(batches)
        logs = {**one.logs, **two.logs, "loss1": one.logs["loss"], "loss2": two.logs["loss"]}
        logs["loss"] = one.logs["loss"] + two.logs["loss"]
        return StepOutput([one.objectives[0], two.objectives[0]], logs, one.samples + two.samples)



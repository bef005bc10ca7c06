"""Recipe: Loop 1 + Loop 2 with gradient surgery (docs/recipes.md, "Dual").

Every micro-step pairs one Loop-1 batch (or an interleaved referring batch) with one DAM batch.
The Trainer takes g1 = grad(loss1) and g2 = grad(loss2) over the trainable parameters and calls
:meth:`Dual.combine_grads`: g = g1 + beta (g2 - c g1), c = (g1.g2)/|g1|^2 over the whole concatenated
trainable gradient, both averaged across ranks first (beta = 0.5, applied always;
``dual.surgery_mode: pcgrad`` projects only when g1.g2 < 0).
"""

from __future__ import annotations

from maskloop.recipes.common import Recipe, StepOutput
from maskloop.recipes.loop1 import Loop1, TeacherOutputError
from maskloop.recipes.loop2 import Loop2
from maskloop.train.surgery import gradient_surgery


class Dual(Recipe):
    streams = ("pairs", "refer", "dam")
    optional_streams = ("refer",)
    skippable = (TeacherOutputError,)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.loop1, self.loop2 = Loop1(cfg), Loop2(cfg)

    def setup(self, model, ema, seed: int) -> None:
        super().setup(model, ema, seed)
        self.loop1.setup(model, ema, seed)
        self.loop2.setup(model, ema, seed)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        # per-group norms in the logs (lora / projector / sam2_decoder / ...), trainable groups only
        self.groups = {g: [i for i, n in enumerate(names) if n in {m for m, _ in ps}]
                       for g, ps in model.parameter_groups().items() if any(p.requires_grad for _, p in ps)}

    def draw(self, streams: dict, micro: int) -> dict:
        return self.loop1.draw(streams, micro)  # Loop 1's interleave; one DAM batch every micro-step

    def step(self, batches: dict) -> StepOutput:
        one = self.loop1.step(batches)
        two = self.loop2.step(batches)
        logs = {**one.logs, **two.logs, "loss1": one.logs["loss"], "loss2": two.logs["loss"]}
        logs["loss"] = one.logs["loss"] + two.logs["loss"]
        return StepOutput([one.objectives[0], two.objectives[0]], logs, one.samples + two.samples)

    def combine_grads(self, g1: list, g2: list, **reduction) -> tuple[list, dict]:
        c = self.cfg.dual
        g, stats = gradient_surgery(g1, g2, beta=c.surgery_beta, mode=c.surgery_mode, groups=self.groups,
                                    only_g1="project", params=self.params, **reduction)
        return g, {f"surgery/{k}": v for k, v in stats.items()}

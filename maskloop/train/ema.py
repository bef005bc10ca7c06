"""EMA of the trained parameters only (docs/recipes.md, "Loop 1" step 1: the Loop-1 teacher).

The teacher shares the frozen base with the student: only the trained parameters (LoRA,
projectors, SAM2 decoder, new-token rows) get float32 shadow copies, so the EMA costs
4 bytes per *trained* parameter whatever the size of the frozen model.  ``swap()`` puts the
shadow values into the live parameters for teacher generation and restores them afterwards.

    ema = EMA(dict(model.named_parameters()))      # frozen entries are skipped
    ...
    optimizer.step(); ema.update()
    with ema.swap(), torch.no_grad():
        caption = model.generate(...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import torch

__all__ = ["EMA"]


class EMA:
    """Exponential moving average ``shadow = d * shadow + (1 - d) * param`` of trained parameters.

    params: name -> Parameter (or an iterable of (name, Parameter)); parameters with
    ``requires_grad=False`` are skipped (the frozen base never gets a copy).
    warmup: if True the decay is ``min(decay, (1 + n) / (10 + n))`` with n the number of
    updates done before this one (so early updates follow the parameters more closely).
    """

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter] | Iterable[tuple[str, torch.nn.Parameter]],
        decay: float = 0.999,
        warmup: bool = False,
    ):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        items = params.items() if isinstance(params, Mapping) else params
        self.params: dict[str, torch.nn.Parameter] = {n: p for n, p in items if p.requires_grad}
        if not self.params:
            raise ValueError("EMA got no trainable parameters (all have requires_grad=False)")
        from torch.distributed.tensor import DTensor

        # multi-tensor kernels (one launch per dtype, not one per parameter) for plain tensors; FSDP's DTensor
        # shards take the per-tensor path
        self._foreach = not any(isinstance(p, DTensor) for p in self.params.values())
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self._swapped = False
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {
                n: p.detach().to(torch.float32, copy=True) for n, p in self.params.items()
            }

    def _copy(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        if self._foreach:
            torch._foreach_copy_(dst, src)
        else:
            for a, b in zip(dst, src, strict=True):
                a.copy_(b)

    def current_decay(self) -> float:
        """The decay the next ``update()`` uses."""
        if self.warmup:
            n = self.num_updates
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Call after every optimizer step."""
        if self._swapped:
            raise RuntimeError("EMA.update() inside EMA.swap(): the live parameters hold the EMA values")
        d = self.current_decay()
        if self._foreach:  # one multi-tensor kernel per dtype instead of two kernels per parameter
            by_dtype: dict[torch.dtype, list[str]] = {}
            for n, p in self.params.items():
                by_dtype.setdefault(p.dtype, []).append(n)
            for dtype, names in by_dtype.items():
                live = [self.params[n].detach() for n in names]
                if dtype != torch.float32:
                    live = [t.float() for t in live]
                torch._foreach_lerp_([self.shadow[n] for n in names], live, 1.0 - d)
        else:
            for name, p in self.params.items():
                s = self.shadow[name]
                s.lerp_(p.detach().to(s.dtype), 1.0 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def swap(self):
        """Temporarily load the EMA weights into the live parameters; restored on exit (also on error)."""
        if self._swapped:
            raise RuntimeError("EMA.swap() is already active (nested swap)")
        names = list(self.params)
        live = [self.params[n].detach() for n in names]
        saved: list[torch.Tensor] | None = None  # set once the live values are backed up whole
        try:
            with torch.no_grad():
                backup = [torch.empty_like(t) for t in live]
                self._copy(backup, live)
                saved = backup
                self._copy(live, [self.shadow[n] for n in names])
            self._swapped = True
            yield self
        finally:
            if saved is not None:
                with torch.no_grad():
                    self._copy(live, saved)
            self._swapped = False

    @torch.no_grad()
    def copy_to(self) -> None:
        """Write the EMA values into the live parameters permanently (e.g. before export)."""
        for name, p in self.params.items():
            p.copy_(self.shadow[name])

    def num_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.shadow.values())

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {n: s.detach().clone() for n, s in self.shadow.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        shadow = state["shadow"] if "shadow" in state else state  # also accept a bare name -> tensor map
        missing = sorted(set(self.shadow) - set(shadow))
        unexpected = sorted(set(shadow) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match the trained parameters: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}. Was it saved with a different set of "
                "trainable modules (LoRA rank / targets)?"
            )
        for n, s in self.shadow.items():
            if tuple(shadow[n].shape) != tuple(s.shape):
                raise ValueError(
                    f"EMA shadow {n!r}: saved shape {tuple(shadow[n].shape)} != {tuple(s.shape)}"
                )
            s.copy_(shadow[n])
        if "shadow" in state:
            self.decay = float(state.get("decay", self.decay))
            self.warmup = bool(state.get("warmup", self.warmup))
            self.num_updates = int(state.get("num_updates", self.num_updates))

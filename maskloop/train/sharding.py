"""Data parallelism on PyTorch's own stack: the one place that knows ``none`` / ``ddp`` / ``fsdp``.

``distributed:`` in the train config picks one of

* ``none`` — every rank holds the whole model; after the backward passes the trained gradients are
  averaged with one flat all-reduce per dtype (the behaviour before DDP/FSDP existed; also what a
  single process runs).
* ``ddp`` — :class:`torch.nn.parallel.DistributedDataParallel` around a thin root module whose forward
  runs the recipe's micro-step, so the bucketed all-reduce overlaps the backward pass.  Micro-steps
  before the last of an accumulation run under ``no_sync()``.  A recipe with two objectives (``dual``:
  g1 and g2 must stay apart for the surgery) runs every micro-step under ``no_sync()`` and the surgery
  averages g1 and g2 itself (``reduce=True``).
* ``fsdp`` — FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) on every transformer block (LLM decoder
  layers, ViT layers, SAM2 Hiera blocks: :data:`UNIT_PATHS`) and on the root, whose forward runs the
  micro-step.  Parameters outside the blocks (embeddings, lm_head, projector, [SEG] head, SAM2 mask
  decoder, new-token rows: small, and read directly as tensors by the model) are *ignored* by FSDP:
  replicated, their gradients averaged with one all-reduce.  Block gradients are reduce-scattered by
  FSDP (each rank keeps the averaged gradient of its shard); the surgery sums its dot products and
  norms over shards (``sharded=True``) and counts the replicated entries once.
  ``fsdp_shard_frozen: false`` keeps the frozen base replicated and shards only the trained parameters
  of the blocks (their LoRA adapters), for a base that fits but an optimizer state that should not be
  replicated.

Recipes stay free of distribution code: a recipe that must decide to skip a micro-step calls
``self.agree(flag)`` (set to :meth:`Distributor.agree`), so every rank skips at the same point and no
rank is left waiting in a collective (FSDP all-gathers inside the forward).

Activation checkpointing (``activation_checkpointing: true``) recomputes every block in the backward
pass (``torch.utils.checkpoint``, non-reentrant); it applies with any of the three modes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as tdist
import torch.nn as nn

from maskloop.errors import ConfigError
from maskloop.train import dist

__all__ = ["MODES", "UNIT_PATHS", "Distributor", "shard_units", "apply_activation_checkpointing", "local",
           "per_rank_batch"]

MODES = ("none", "ddp", "fsdp")

# transformer blocks per model class: the FSDP units and the activation-checkpointing units
UNIT_PATHS: dict[str, tuple[str, ...]] = {
    "GroundedMLLM": (
        "internvl.model.language_model.layers",
        "internvl.model.vision_tower.encoder.layer",
        "sam.sam.vision_encoder.backbone.blocks",
    ),
    "PsalmModel": (
        "llm.model.layers",
        "vision.backbone.encoder.layers",
    ),
}


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks (see :data:`UNIT_PATHS`), outermost lists first."""
    name = type(model).__name__
    paths = getattr(model, "SHARD_UNITS", None) or UNIT_PATHS.get(name)
    if not paths:
        raise ConfigError(f"no sharding units are known for {name}; known models: {sorted(UNIT_PATHS)}")
    units: list[nn.Module] = []
    for path in paths:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue  # e.g. a model variant without that tower
        units.extend(blocks)
    if not units:
        raise ConfigError(f"{name} has none of its block lists {list(paths)}")
    return units


def apply_activation_checkpointing(units: Sequence[nn.Module]) -> int:
    """Recompute each unit's forward in the backward pass (non-reentrant ``torch.utils.checkpoint``).

    Only where autograd records (the no-grad teacher decoding runs the plain forward).  Returns how
    many units were wrapped (a unit already wrapped is left as it is)."""
    from torch.utils.checkpoint import checkpoint

    n = 0
    for m in units:
        if getattr(m, "_maskloop_checkpointed", False):
            continue
        plain = m.forward

        def forward(*args, _plain=plain, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        m.forward = forward
        m._maskloop_checkpointed = True
        n += 1
    return n


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The local shard of a DTensor (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class _StepRoot(nn.Module):
    """The root module DDP and FSDP see: its forward runs one micro-step of the recipe.

    Returns ``(objectives, step_output)``: the objectives as a list of tensors, so the wrappers find
    them (DDP's unused-parameter search, FSDP's pre-backward hooks)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model

    def forward(self, fn: Callable[[], object]):
        out = fn()
        return list(out.objectives), out


class Distributor:
    """Wraps the model for one of :data:`MODES` and does what the mode leaves to us.

    Life cycle (the Trainer's order)::

        d = Distributor(cfg.distributed, device, ...)
        d.prepare(model)                  # before the trained-parameter dict, EMA and optimizer exist
        with d.micro_step(sync=last):     # one micro-step's forward and backward
            out = d.forward(lambda: recipe.step(batches))
            ...backward...
        d.finish_grads(params)            # reductions the wrapper does not do
        d.clip_grad_norm_(params, max_norm)
    """

    def __init__(self, mode: str = "none", device: torch.device | None = None, *, bf16: bool = False,
                 shard_frozen: bool = True, activation_checkpointing: bool = False,
                 reshard_after_forward: bool = True):
        if mode not in MODES:
            raise ConfigError(f"distributed={mode!r}: choose one of {list(MODES)}")
        if mode != "none" and not dist.is_initialized():
            raise ConfigError(f"distributed: {mode} needs a process group: launch with torchrun "
                              "(e.g. `torchrun --nproc_per_node 2 -m maskloop.cli train ...`)")
        self.mode = mode
        self.device = device or torch.device("cpu")
        self.bf16 = bf16
        self.shard_frozen = shard_frozen
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward
        self.root: nn.Module | None = None
        self.model: nn.Module | None = None
        self._replicated_ids: set[int] = set()

    # -- set-up
    def prepare(self, model: nn.Module) -> nn.Module:
        """Shard / wrap ``model`` in place; returns the root module."""
        self.model = model
        if self.activation_checkpointing:
            apply_activation_checkpointing(shard_units(model))
        root = _StepRoot(model)
        if self.mode == "fsdp":
            self._fully_shard(root, model)
            model.sharded = True  # e.g. GroundedMLLM.generate then decodes on the plain (per-layer) path
            if hasattr(model, "generate"):  # greedy decoding: gather the blocks once, not at every token
                plain = model.generate

                def generate(*args, _plain=plain, **kwargs):
                    with self.gathered():
                        return _plain(*args, **kwargs)

                model.generate = generate
        elif self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            kw = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            # find_unused_parameters: micro-steps use different parts (a referring batch, a pairs batch)
            root = DDP(root, find_unused_parameters=True, broadcast_buffers=False, **kw)
        self.root = root
        return root

    def _fully_shard(self, root: nn.Module, model: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if self.bf16 else MixedPrecisionPolicy())
        in_units: set[int] = set()
        units_done: list[nn.Module] = []
        for unit in shard_units(model):
            if self.shard_frozen:
                fully_shard(unit, mp_policy=mp, reshard_after_forward=self.reshard_after_forward)
                units_done.append(unit)
                in_units |= {id(p) for p in unit.parameters()}
            else:  # only the trained leaves of the block (its LoRA adapters): the frozen base stays whole
                for sub in unit.modules():
                    own = list(sub.parameters(recurse=False))
                    if own and all(p.requires_grad for p in own) and sub is not unit:
                        fully_shard(sub, mp_policy=mp, reshard_after_forward=self.reshard_after_forward)
                        units_done.append(sub)
                        in_units |= {id(p) for p in own}
        self._units = units_done
        ignored = {p for p in model.parameters() if id(p) not in in_units}
        self._replicated_ids = {id(p) for p in ignored}
        fully_shard(root, mp_policy=mp, ignored_params=ignored)

    @contextmanager
    def gathered(self):
        """FSDP: every block's parameters gathered for the duration (no grad: greedy decoding runs each
        block once per token; gathering them once instead of at every token is what makes it fast), then
        re-sharded.  Memory: the whole bf16 model on every rank while it lasts."""
        units = getattr(self, "_units", [])
        if self.mode != "fsdp" or not units:
            yield
            return
        for u in units:
            u.set_reshard_after_forward(False, recurse=False)
            u.unshard()
        try:
            yield
        finally:
            for u in units:
                u.reshard()
                u.set_reshard_after_forward(self.reshard_after_forward, recurse=False)

    # -- one micro-step
    @contextmanager
    def micro_step(self, *, sync: bool, separate_objectives: bool = False):
        """The context of one micro-step's forward and backward.

        sync: the last micro-step of an accumulation (DDP reduces then).  separate_objectives: the
        recipe returns two objectives whose gradients are combined by the surgery (DDP never reduces;
        the surgery averages g1 and g2)."""
        if self.mode == "ddp" and (separate_objectives or not sync):
            with self.root.no_sync():
                yield
        else:
            yield

    def forward(self, fn: Callable[[], object]):
        """Run ``fn`` (the recipe's micro-step) through the root module; returns its StepOutput."""
        if self.root is None or self.mode == "none":
            return fn()
        return self.root(fn)[1]

    def agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (a recipe's skip decision).

        Each rank takes part in exactly ONE such consensus per micro-step: the recipe's (this call, at
        most once a micro-step), or the Trainer's after the step (:meth:`settle`) when the recipe made
        none — so a rank that failed before reaching its recipe's ``agree`` meets the others there."""
        self.agreed = True
        return dist.any_rank(bool(flag), self.device) if dist.world_size() > 1 else bool(flag)

    def settle(self, failed: bool) -> bool:
        """The Trainer's end-of-micro-step skip decision (see :meth:`agree`); resets for the next one."""
        if not getattr(self, "agreed", False) and dist.world_size() > 1:
            failed = dist.any_rank(failed, self.device)
        self.agreed = False
        return failed

    # -- gradients
    def is_replicated(self, p: torch.Tensor) -> bool:
        return not _is_dtensor(p)

    def finish_grads(self, params: Sequence[torch.Tensor], *, single_objective: bool = True) -> None:
        """After the micro-steps: the reductions the wrapper did not do (mean over ranks).

        none: every trained gradient; ddp: nothing (DDP reduced them; the dual recipe's were averaged by
        the surgery); fsdp: the replicated (ignored) parameters only, for single-objective recipes (the
        dual recipe reduces g1 and g2 per micro-step, :meth:`reduce_replicated`)."""
        if dist.world_size() <= 1 or not single_objective:
            return
        if self.mode == "none":
            dist.all_reduce_grads(params)
        elif self.mode == "fsdp":
            dist.all_reduce_grads([p for p in params if self.is_replicated(p)])

    def reduce_replicated(self, grads: list[torch.Tensor | None], params: Sequence[torch.Tensor]) -> list:
        """FSDP, dual recipe: average the replicated entries of one objective's gradient list."""
        if self.mode != "fsdp" or dist.world_size() <= 1:
            return grads
        idx = [i for i, p in enumerate(params) if self.is_replicated(p)]
        present = torch.tensor([grads[i] is not None for i in idx], dtype=torch.int32, device=self.device)
        tdist.all_reduce(present, op=tdist.ReduceOp.MAX)
        out = list(grads)
        ws = dist.world_size()
        for j, i in enumerate(idx):
            if not present[j]:
                continue
            g = out[i] if out[i] is not None else torch.zeros_like(params[i])
            g = g.clone()
            tdist.all_reduce(g)
            out[i] = g.div_(ws)
        return out

    def surgery_kwargs(self, params: Sequence[torch.Tensor]) -> dict:
        """How :func:`maskloop.train.surgery.gradient_surgery` must treat the gradients of this mode."""
        if dist.world_size() <= 1:
            return {}
        if self.mode == "fsdp":
            return {"sharded": True, "replicated": [self.is_replicated(p) for p in params]}
        return {"reduce": True}

    def to_local(self, grads: list) -> list:
        return [local(g) for g in grads]

    def from_local(self, grads: list, params: Sequence[torch.Tensor]) -> list:
        """Local shards back to DTensors shaped like their parameters (FSDP)."""
        from torch.distributed.tensor import DTensor

        out = []
        for g, p in zip(grads, params):
            if g is not None and _is_dtensor(p) and not _is_dtensor(g):
                g = DTensor.from_local(g, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                       run_check=False)
            out.append(g)
        return out

    def grad_norm(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """The global L2 norm of the trained gradients: sharded parts summed over ranks, replicated once."""
        sharded = torch.zeros((), dtype=torch.float32, device=self.device)
        whole = torch.zeros((), dtype=torch.float32, device=self.device)
        for p in params:
            if p.grad is None:
                continue
            g = local(p.grad).detach().float()
            if _is_dtensor(p.grad):
                sharded = sharded + g.pow(2).sum().to(self.device)
            else:
                whole = whole + g.pow(2).sum().to(self.device)
        if self.mode == "fsdp" and dist.world_size() > 1:
            tdist.all_reduce(sharded)
        return (sharded + whole).sqrt()

    def clip_grad_norm_(self, params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over mixed sharded / replicated gradients; returns the norm."""
        if self.mode != "fsdp":
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = self.grad_norm(params)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                local(p.grad).mul_(coef.to(local(p.grad).device, local(p.grad).dtype))
        return norm

    def local_grads(self, params: Sequence[torch.Tensor]) -> list:
        """Each parameter's local gradient (for the non-finite guard, which reduces its flag over ranks)."""
        return [local(p.grad) for p in params]

    # -- whole tensors (export, logging)
    def full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if _is_dtensor(t) else t

    def cleanup_context(self):
        return nullcontext()


def per_rank_batch(global_batch: int, world_size: int, accumulation: int) -> int:
    """The per-process batch for a global batch (samples per optimizer step) at this world size."""
    n = world_size * accumulation
    if global_batch < 1 or global_batch % n:
        raise ConfigError(f"global_batch={global_batch} is not divisible by world size {world_size} x accumulation "
                          f"{accumulation}: choose a global batch that is a multiple of {n}, or set batch_size "
                          "(per process) instead")
    return global_batch // n

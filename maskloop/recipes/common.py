"""Pieces shared by the recipes: batch -> model inputs, the supervised losses, token noise."""

from __future__ import annotations

import random

import torch

from maskloop.model.grounded import GroundedMLLM
from maskloop.model.prompts import Ragged
from maskloop.model.region import centroid_cells, ensure_nonempty
from maskloop.model.sequence import device_ids
from maskloop.train.recipe import Recipe, StepOutput

__all__ = ["Recipe", "RecipeBase", "SideStream", "StepOutput", "refer_loss", "caption_loss", "noise_tokens", "global_rows", "with_end"]


def _d(x):
    """A detached log value (converted to a number only when logged: no host sync per micro-step)."""
    return x.detach() if isinstance(x, torch.Tensor) else x


RecipeBase = Recipe  # the recipe interface (maskloop/train/recipe.py); old name kept for imports


class SideStream:
    """Work that no trained weight feeds (the frozen image encoders) run ahead on a second CUDA stream.

    The launches return at once, the main stream goes on (e.g. with the teacher's decoding, bound by
    memory bandwidth while the encoders are bound by compute), and :meth:`join` makes the main stream wait
    for the side one on the device (no host sync) before the results are read.  On the CPU, or with
    ``enabled=False``, the work simply runs inline: the same operations in the same order either way.

        side = SideStream(device)
        with side:
            maps = model.sam_backbone(g2)
        ...                       # main-stream work
        side.join(maps)           # before maps are used
    """

    def __init__(self, device: torch.device, enabled: bool = True):
        device = torch.device(device)
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None
        self._ctx = None
        self._start = None

    def after(self, event=None) -> "SideStream":
        """``with side.after(event):`` the work starts on the device once the main stream has reached
        ``event`` (a CUDA event recorded on it earlier, when its inputs were ready) instead of the point
        where the host enters the block; None: that point."""
        self._start = event
        return self

    def __enter__(self):
        if self.stream is not None:
            if self._start is not None:
                self.stream.wait_event(self._start)
            else:
                self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))  # the inputs are ready
            self._ctx = torch.cuda.stream(self.stream)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._start = None
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(*exc)
        return False

    def join(self, *results) -> None:
        """The main stream waits for the side stream; ``results``' tensors are marked as used by the main
        stream, so the caching allocator does not hand their memory to the side stream while they live."""
        if self.stream is None:
            return
        main = torch.cuda.current_stream(self.stream.device)
        main.wait_stream(self.stream)
        todo = list(results)
        while todo:
            x = todo.pop()
            if isinstance(x, torch.Tensor):
                x.record_stream(main)
            elif isinstance(x, (list, tuple)):
                todo.extend(x)


def region_prompts(batch: dict, suffix: str = "") -> tuple[torch.Tensor, int]:
    """The batch's 16x16 prompt masks with K = 0 rows set to their mask's centroid cell (counted)."""
    pm = batch[f"prompt_masks{suffix}"]
    return ensure_nonempty(pm, centroid_cells(batch[f"masks{suffix}"], pm.shape[-1]))


def refer_loss(model: GroundedMLLM, batch: dict, rng: random.Random, lm_weight: float = 1.0,
               shard: tuple[int, int] = (1, 0)) -> tuple[torch.Tensor, dict]:
    """Supervised referring segmentation: expression tokens -> "... [SEG]" -> mask (docs/recipes.md, "SFT").

    The question templates are drawn for the global batch (``shard`` = (world, rank), :func:`global_rows`)
    from an ``rng`` seeded alike on every rank, so N processes ask what one process asks."""
    B = batch["g_pixel_values"].shape[0]  # (pixel_values holds every tile of a tiled batch)
    world, rank = shard
    out = model.segment(
        batch["pixel_values"],
        model.sam_features(batch["g_pixel_values"]),
        model.builder.expressions(batch["expression"]),
        model.builder.seg_question(world * B, rng)[rank::world],
        gt_masks=batch["masks"],
        num_tiles=batch.get("num_tiles"),
    )
    loss = out["loss_mask"] + lm_weight * out["loss_lm"]
    return loss, {k: _d(out[k]) for k in ("loss_mask", "loss_bce", "loss_dice", "loss_lm")}


def caption_loss(model: GroundedMLLM, batch: dict) -> tuple[torch.Tensor, dict]:
    """Supervised region captioning: image + region(mask) -> caption, teacher forced (docs/recipes.md, "SFT")."""
    pm, n_empty = region_prompts(batch)
    out = model.caption_logits(batch["pixel_values"], pm, model.builder.caption_answer(batch["caption"]),
                               num_tiles=batch.get("num_tiles"))
    return out["loss_lm"], {"loss_caption": _d(out["loss_lm"]), "region_k0_fallbacks": n_empty}


def allowed_vocab(model: GroundedMLLM) -> torch.Tensor:
    """(V,) bool: ids that token noise and the Gumbel top-k may use (no special / image / unused rows)."""
    V = model.embed_matrix.shape[0]
    ok = torch.zeros(V, dtype=torch.bool, device=model.embed_matrix.device)
    ok[: len(model.tokenizer)] = True
    ok[torch.tensor(model.builder.special_ids, device=ok.device)] = False
    return ok


def global_rows(draw, B: int, shard: tuple[int, int] = (1, 0)) -> torch.Tensor:
    """This rank's rows of a random tensor drawn for the whole global batch.

    ``draw(n)`` returns n rows; with ``shard = (world, rank)`` it is called for ``world * B`` rows and
    rank r keeps rows r, r + world, ... — the global positions of its samples under the strided data
    sharding (:class:`~maskloop.data.mixture.MixtureSampler`).  With a generator seeded alike on every
    rank, N processes then draw exactly the numbers one process draws for the same global batch.
    """
    world, rank = shard
    if world == 1:
        return draw(B)
    return draw(world * B)[rank::world]


def noise_tokens(
    ids: torch.Tensor, lengths: torch.Tensor, allowed: torch.Tensor, ratio: float, generator: torch.Generator | None,
    shard: tuple[int, int] = (1, 0),
) -> torch.Tensor:
    """Replace ``ratio`` of the first lengths[b] tokens of each row with random allowed ids (B, T).

    ``allowed``: a (V,) bool mask, or the allowed ids themselves (an integer tensor, e.g. the mask's
    ``nonzero()`` computed once: no host sync per call).  ``shard`` (world, rank): draw for the global
    batch and keep this rank's rows (:func:`global_rows`).
    """
    B, T = ids.shape
    dev = ids.device
    real = torch.arange(T, device=dev)[None] < lengths[:, None]
    u = global_rows(lambda n: torch.rand(n, T, device=dev, generator=generator), B, shard)
    flip = (u < ratio) & real
    pool = allowed.nonzero().squeeze(1) if allowed.dtype == torch.bool else allowed
    pick = global_rows(lambda n: torch.randint(0, len(pool), (n, T), device=dev, generator=generator), B, shard)
    return torch.where(flip, pool[pick], ids)


def with_end(ids: torch.Tensor, lengths: torch.Tensor, end_ids, target: bool = True) -> Ragged:
    """Token rows (B, T) of lengths (B,) -> a target :class:`Ragged` with the answer's end appended: one id, or
    the template's whole answer suffix (``builder.answer_end_ids``: phi3_chat's ``<|end|>`` is several tokens
    on a Qwen2.5 tokenizer), right after each row's last token."""
    end = device_ids([end_ids] if isinstance(end_ids, int) else list(end_ids), ids.device)[0].to(ids.dtype)
    B, T = ids.shape
    E = end.numel()
    out = torch.cat([ids, ids.new_zeros(B, E)], 1)
    k = torch.arange(T + E, device=ids.device)[None] - lengths[:, None]  # (B, T + E): index into the end ids
    out = torch.where((k >= 0) & (k < E), end[k.clamp(0, E - 1)], out)
    return Ragged(out, lengths + E, target=target)

"""Recipe: Loop 1 — mask -> caption -> mask, through pseudo-tokens (docs/recipes.md, "Loop 1").

Per pair sample (image1, mask1) / (image2, mask2) — another frame of the same SA-V masklet, or the
same image twice:

1. the EMA teacher captions region(mask1) greedily, no grad, at fixed length T (a batch with an empty
   caption is skipped, :class:`TeacherOutputError`, once the forward passes are queued);
2. token noise replaces 25% of the caption tokens with random non-special ids;
3. trainable forward #1 reads the noised caption (teacher forcing) -> logits at the T positions;
4. straight-through Gumbel-softmax over the top-k logits -> caption embeddings (hard forward, soft grad);
5. trainable forward #2 segments image2 from the caption given as inputs_embeds -> mask logits;
6. loss = 2.0 BCE + 0.5 Dice against mask2 (+ 1.0 LM on the fixed "Sure, [SEG]." answer).

Gradients flow from step 6 through forward #2, the Gumbel weights and forward #1.  Referring
batches are interleaved with these by :meth:`Loop1.draw` (``loop1.refer_ratio``), trained with the supervised loss.
The simpler variant (``variant="generate"``) segments the teacher's caption tokens directly.
"""

from __future__ import annotations

import random

import torch

from maskloop.model.prompts import Embeds, Ragged
from maskloop.recipes.common import (
    Recipe,
    SideStream,
    StepOutput,
    _d,
    allowed_vocab,
    global_rows,
    noise_tokens,
    refer_loss,
    region_prompts,
    with_end,
)
from maskloop.train import dist
from maskloop.train.gumbel import gumbel_topk_embed, sample_gumbel


class TeacherOutputError(RuntimeError):
    """The teacher produced an empty caption (all padding) for some row: the micro-step is skipped."""

    counter = "teacher_empty"  # logged as skipped_micro/teacher_empty


class Loop1(Recipe):
    streams = ("pairs", "refer")
    optional_streams = ("refer",)
    skippable = (TeacherOutputError,)

    def setup(self, model, ema, seed: int) -> None:
        from maskloop.config import ConfigError

        if ema is None:
            raise ConfigError("ema_decay=0: Loop 1's teacher is the EMA of the trained weights; set ema_decay > 0")
        super().setup(model, ema, seed)
        self.rng = random.Random(self.cfg.seed)  # alike on every rank: questions drawn for the global batch
        # token noise and Gumbel noise: one stream shared by every rank, drawn for the global batch and
        # sliced (``global_rows``), so N processes train exactly as one process with the same global batch
        self.gen = torch.Generator(device=model.embed_matrix.device).manual_seed(self.cfg.seed)
        self.allowed = allowed_vocab(model)
        self._pool = (None, -1)

    def _side_stream(self) -> SideStream:
        if getattr(self, "_side", None) is None:
            # not under FSDP: its blocks (the ViT's and Hiera's included) all-gather on streams of their own,
            # ordered against the stream that runs them
            on = self.cfg.loop1.overlap_encoders and not getattr(self.model, "sharded", False)
            self._side = SideStream(self.model.embed_matrix.device, enabled=on)
        return self._side

    @property
    def pool(self) -> torch.Tensor:
        """The allowed ids (``allowed.nonzero()``), recomputed only when ``allowed`` changes."""
        if self._pool[1] != self.allowed._version:
            self._pool = (self.allowed.nonzero().squeeze(1), self.allowed._version)
        return self._pool[0]

    def draw(self, streams: dict, micro: int) -> dict:
        """A referring batch every ``round(1 + 1 / refer_ratio)`` micro-steps (the first one included), a
        pair batch otherwise; one batch of every other stream."""
        names, out = set(streams), {}
        if "refer" in names:
            ratio = self.cfg.loop1.refer_ratio
            period = max(1, round(1 + 1 / ratio)) if ratio > 0 else 0
            if period > 0 and micro % period == 0:
                out["refer"] = streams["refer"].next()
            else:
                out["pairs"] = streams["pairs"].next()
            names -= {"refer", "pairs"}
        for n in sorted(names):
            out[n] = streams[n].next()
        return out

    def step(self, batches: dict) -> StepOutput:
        if batches.get("refer") is not None:  # an interleaved referring batch
            loss, logs = refer_loss(self.model, batches["refer"], self.rng, self.cfg.loop1.lm_weight,
                                    (dist.world_size(), dist.rank()))
            return StepOutput([loss], {"loss": _d(loss), **{f"refer/{k}": v for k, v in logs.items()}},
                              batches["refer"]["g_pixel_values"].shape[0])
        loss, logs = self.loss(batches["pairs"])
        return StepOutput([loss], logs, batches["pairs"]["g_pixel_values1"].shape[0])

    def loss(self, b: dict) -> tuple[torch.Tensor, dict]:
        model = self.model
        pm1, n_k0 = region_prompts(b, "1")

        vision_trains = any(p.requires_grad for p in model.vision.parameters())
        sam_trains = any(p.requires_grad for p in model.sam.sam.vision_encoder.parameters())
        # every image 2 is its image 1 (single-image sources read as pairs): a frozen ViT reads them once
        vit_once = bool(b.get("same_image")) and not vision_trains
        # image 2's frozen encoders (SAM2's Hiera + neck, the ViT) take nothing from the steps below: on CUDA
        # they run on a second stream, beside the teacher's decoding (``loop1.overlap_encoders``)
        side = self._side_stream()
        side_out = {}
        mode, grad = model.training, torch.is_grad_enabled()

        def launch(after=None):  # queued once, in the step's own train / grad mode wherever it is called from
            if side_out:
                return
            now = model.training
            model.train(mode)
            try:
                with side.after(after), torch.set_grad_enabled(grad):
                    side_out["maps2"] = None if sam_trains else model.sam_backbone(b["g_pixel_values2"])
                    side_out["vit2"] = None if vision_trains or vit_once else model.vision_features(b["pixel_values2"])
            finally:
                model.train(now)

        if self.cfg.loop1.overlap_start == "step":
            launch()
        try:
            return self._steps(b, pm1, n_k0, vision_trains, vit_once, side, launch, side_out)
        finally:
            side.join()  # a skipped step too: nothing the main stream runs next overtakes the side stream's reads

    def _steps(self, b, pm1, n_k0, vision_trains, vit_once, side, launch, side_out) -> tuple[torch.Tensor, dict]:
        """Steps 1-6 of the module doc; ``launch()`` queues image 2's encoders on the side stream (once; their
        ``maps2`` / ``vit2`` land in ``side_out``, None where trained; ``vit_once``: image 2 is image 1, whose
        frozen ViT features and image tokens forward #2 reuses)."""
        model, c = self.model, self.cfg.loop1
        # 1. EMA teacher: greedy caption of region(mask1), fixed length T, no gradient
        # a frozen ViT gives the same features to teacher and student: compute them once
        vit1 = None if vision_trains else model.vision_features(b["pixel_values1"])
        was_training = model.training
        model.eval()
        with self.ema.swap(), torch.no_grad():
            # overlap_start "decode": image 2's encoders are queued once the teacher's decoding is, to start
            # on the device where its prompt's pass ends
            teacher = model.describe(b["pixel_values1"] if vision_trains else None, pm1,
                                     max_new_tokens=c.caption_len, vit_feats=vit1, num_tiles=b.get("num_tiles1"),
                                     on_queued=launch)
        model.train(was_training)
        launch()  # (a no-op when already queued)
        # empty captions are counted on the device and read once forward #2 is queued: reading them here would
        # keep the host waiting for the whole decode before it could queue forward #1
        empty = (teacher.lengths == 0).sum()
        ids, lengths = teacher.ids, teacher.lengths  # (B, T), (B,)

        feats1 = None
        if c.variant == "generate":  # simpler variant: segment the teacher's tokens, no gradient into it
            expr = Ragged(ids, lengths)
        else:
            # 2. token noise on the caption tokens (never special / image ids)
            shard = (dist.world_size(), dist.rank())
            noised = noise_tokens(ids, lengths, self.pool, c.noise_ratio, self.gen, shard)
            # 3. trainable forward #1: teacher forcing on the noised caption (+ end token)
            answer = with_end(noised, lengths, model.builder.answer_end_ids)
            feats1 = model.image_tokens(b["pixel_values1"] if vision_trains else None, vit_feats=vit1)
            logits = model.caption_logits(None, pm1, answer, image_feats=feats1, num_tiles=b.get("num_tiles1"))["logits"]
            # 4. straight-through Gumbel-softmax over the top-k -> caption embeddings (B, T, D)
            B, T = ids.shape
            noise = global_rows(lambda n: sample_gumbel((n, T, c.topk), device=ids.device, generator=self.gen), B, shard)
            embeds, _ = gumbel_topk_embed(logits[:, :T], model.embed_matrix, k=c.topk, tau=c.tau,
                                          valid_ids_mask=self.allowed, noise=noise)
            visible = lengths if c.mask_caption_padding else torch.full_like(lengths, ids.shape[1])
            expr = Embeds(embeds, visible)

        # 5. trainable forward #2: image2 + segmentation prompt with the caption as inputs_embeds
        question = model.builder.seg_question(ids.shape[0], fixed=True)
        maps2, vit2 = side_out["maps2"], side_out["vit2"]
        side.join(maps2, vit2)
        sam2 = model.sam_features(b["g_pixel_values2"], maps=maps2)
        if vit_once:  # the same images: forward #1's image tokens (their gradients add up, as two passes' would)
            feats2 = feats1 if feats1 is not None else model.image_tokens(vit_feats=vit1)
        else:
            feats2 = None if vit2 is None else model.image_tokens(vit_feats=vit2)
        out = model.segment(b["pixel_values2"], sam2, expr, question, gt_masks=b["masks2"], image_feats=feats2,
                            lm_loss=c.lm_weight > 0, num_tiles=b.get("num_tiles2"))
        n_empty = int(empty)
        if self.agree(n_empty > 0):  # every rank skips together (no rank left in a collective)
            e = TeacherOutputError(f"the EMA teacher produced {n_empty} empty caption(s) (all padding)"
                                   + ("" if n_empty else " on another rank"))
            e.local = n_empty > 0  # counted where it happened
            raise e
        # 6. mask loss against mask2 (+ LM loss on "Sure, [SEG].")
        loss = out["loss_mask"] + (c.lm_weight * out["loss_lm"] if c.lm_weight > 0 else 0.0)
        logs = {"loss": _d(loss), "loop1/loss_mask": _d(out["loss_mask"]), "loop1/loss_bce": _d(out["loss_bce"]),
                "loop1/loss_dice": _d(out["loss_dice"]), "loop1/caption_len": _d(lengths.float().mean()),
                "loop1/region_k0_fallbacks": n_k0}
        if "loss_lm" in out:
            logs["loop1/loss_seg_lm"] = _d(out["loss_lm"])
        return loss, logs

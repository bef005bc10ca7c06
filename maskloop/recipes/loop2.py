"""Recipe: Loop 2 — caption -> mask -> caption on DAM region captions (docs/recipes.md, "Loop 2").

A. image + caption (tokenised to fixed T, embedded) -> segmentation prompt -> predicted mask'
   (+ 1.0 LM loss on the fixed "Sure, [SEG]." answer);
   mask' -> region prompt: sigmoid -> average-pool to 16x16 -> > 0.5 (not differentiable);
B. image + region(mask') -> caption', teacher forced on the true caption.
Loss2 = CE(caption', caption) + 1.0 seg LM loss.  B runs even when mask' is empty (then its most
probable cell is the region); how often that happens is logged.
"""

from __future__ import annotations

import torch

from maskloop.model.prompts import Ragged
from maskloop.model.region import logits_to_prompt
from maskloop.recipes.common import Recipe, StepOutput, _d, with_end


class Loop2(Recipe):
    streams = ("dam",)

    def step(self, batches: dict) -> StepOutput:
        loss, logs = self.loss(batches["dam"])
        return StepOutput([loss], logs, batches["dam"]["g_pixel_values"].shape[0])

    def loss(self, b: dict) -> tuple[torch.Tensor, dict]:
        model, c = self.model, self.cfg.loop2
        T = c.caption_len
        cap = model.builder.expressions(b["caption"])
        cap = Ragged(cap.ids[:, :T], cap.lengths.clamp(max=T))
        pv, nt = b["pixel_values"], b.get("num_tiles")  # (tiles, 3, S, S) and (B,) for a tiled batch
        B = b["g_pixel_values"].shape[0]
        image_feats = model.image_tokens(pv)  # shared by A and B

        # A. caption embeddings -> mask'
        out_a = model.segment(pv, model.sam_features(b["g_pixel_values"]),
                              model.expression_embeds(cap.ids.to(pv.device), cap.lengths.to(pv.device)),
                              model.builder.seg_question(B, fixed=True), image_feats=image_feats, num_tiles=nt)
        prompt, n_empty = logits_to_prompt(out_a["low_res"], model.cfg.prompt_grid)

        # B. region(mask') -> caption', teacher forced on the true caption
        out_b = model.caption_logits(pv, prompt, with_end(cap.ids, cap.lengths, model.builder.answer_end_ids),
                                     image_feats=image_feats, num_tiles=nt)

        loss = out_b["loss_lm"] + c.seg_lm_weight * out_a["loss_lm"]
        return loss, {"loss": _d(loss), "loop2/loss_caption": _d(out_b["loss_lm"]),
                      "loop2/loss_seg_lm": _d(out_a["loss_lm"]), "loop2/empty_pred_masks": n_empty}

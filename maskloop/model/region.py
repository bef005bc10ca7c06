"""Visual-prompt (region) tokens from 16x16 prompt masks, batched.

A region is a (g, g) {0,1} prompt mask over the image-token grid.  Its K one-cells become K
``<IMG_CONTEXT>`` positions after ``<vp>`` which receive the projected image tokens of those cells, in
raster order.  K = 0 is never fed to the model: :func:`ensure_nonempty` puts one cell at the mask's
centroid (or the most probable cell of a predicted mask) and counts how often it did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maskloop.checks import check_on_device


def centroid_cells(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, H, W) masks -> (B,) flat index of the grid cell holding each mask's centroid (centre if empty)."""
    B, H, W = masks.shape
    m = masks.float()
    area = m.sum((1, 2))
    ys = torch.arange(H, device=m.device, dtype=m.dtype) + 0.5
    xs = torch.arange(W, device=m.device, dtype=m.dtype) + 0.5
    cy = torch.where(area > 0, (m.sum(2) * ys).sum(1) / area.clamp(min=1), torch.full_like(area, H / 2))
    cx = torch.where(area > 0, (m.sum(1) * xs).sum(1) / area.clamp(min=1), torch.full_like(area, W / 2))
    gy = (cy * grid / H).long().clamp(0, grid - 1)
    gx = (cx * grid / W).long().clamp(0, grid - 1)
    return gy * grid + gx


def ensure_nonempty(prompt: torch.Tensor, fallback_cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``prompt`` (B, g, g) with no 1-cell get the cell ``fallback_cells[b]``; returns (prompt, count).

    The count is a 0-d tensor on the prompt's device (no host sync: it is read when logged)."""
    B, g, _ = prompt.shape
    flat = prompt.reshape(B, g * g).bool()
    empty = ~flat.any(1)
    flat = flat | (F.one_hot(fallback_cells, g * g).bool() & empty[:, None])
    return flat.reshape(B, g, g).to(prompt.dtype), empty.sum()


def logits_to_prompt(mask_logits: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted mask logits (B, H, W) -> prompt masks (B, g, g): sigmoid -> avg-pool -> > 0.5.

    Not differentiable (docs/recipes.md, "Loop 2").  Empty results fall back to the most probable cell; the count
    of fallbacks (predicted masks with no cell above 0.5) is returned for logging.
    """
    with torch.no_grad():
        prob = F.adaptive_avg_pool2d(mask_logits.float().sigmoid()[:, None], grid)[:, 0]  # (B, g, g)
        prompt = (prob > 0.5).to(torch.uint8)
        return ensure_nonempty(prompt, prob.flatten(1).argmax(1))


def region_slots(flat: torch.Tensor, num_regions: torch.Tensor) -> torch.Tensor:
    """Regions of a batch, flat (sum R_b, g, g) sample-major, -> slots (B, max R_b, g, g).

    Unused slots of rows with fewer regions are all-zero masks (they hold no cell)."""
    num_regions = num_regions.to(flat.device)
    B, R = num_regions.shape[0], int(num_regions.max()) if num_regions.numel() else 0
    rows = torch.repeat_interleave(torch.arange(B, device=flat.device), num_regions)
    slot = torch.arange(flat.shape[0], device=flat.device) - (torch.cumsum(num_regions, 0) - num_regions)[rows]
    out = flat.new_zeros((B, R, *flat.shape[1:]))
    out[rows, slot] = flat
    return out


def inject_visual_tokens(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    img_ctx_id: int,
    image_feats: torch.Tensor,
    prompt_masks: torch.Tensor | None = None,
    n_image: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill every ``<IMG_CONTEXT>`` position with its visual token, for the whole batch at once.

    inputs_embeds (B, L, D); input_ids (B, L); image_feats (B, N, D) projected image tokens, of which row
    b uses its first ``n_image[b]`` (all N by default: one tile; with tiles, n_tiles[b] * g*g);
    prompt_masks (B, g, g) — one region a row — or (B, R, g, g) — R region slots, all-zero for a row's
    unused ones — or None when the prompt holds no region.
    In row b the first n_image[b] context positions take image_feats[b] in order; the following ones take,
    region after region, the features of each region's masked cells in raster order, gathered from the
    row's *last* g*g image tokens (the last tile: the thumbnail, or the only tile — the whole image).
    """
    B, N, D = image_feats.shape
    ctx = input_ids == img_ctx_id  # (B, L)
    rank = torch.cumsum(ctx.long(), 1) - 1  # (B, L) index among the row's context positions
    n_img = torch.full((B,), N, device=ctx.device, dtype=torch.long) if n_image is None else n_image.to(ctx.device)
    if prompt_masks is not None:
        g2 = prompt_masks.shape[-1] * prompt_masks.shape[-2]
        sel = prompt_masks.reshape(B, -1).bool().to(ctx.device)  # (B, R*g2) region-major
        if (n_image is None and g2 != N) or g2 > N:
            raise ValueError(f"prompt mask has {g2} cells but the image has {N} tokens")
        RT = sel.shape[1]
        ar = torch.arange(RT, device=sel.device)
        order = torch.argsort(torch.where(sel, ar, ar + RT), dim=1)  # (B, R*g2) selected cells first, in order
        region_rank = (rank - n_img[:, None]).clamp(0, RT - 1)
        region_cell = torch.gather(order, 1, region_rank) % g2 + (n_img - g2)[:, None]
        cell = torch.where(rank < n_img[:, None], rank.clamp(0, N - 1), region_cell)
        n_expected = n_img + sel.sum(1)
    else:
        cell = rank.clamp(0, N - 1)
        n_expected = n_img
    check_on_device((ctx.sum(1) == n_expected.to(ctx.device)).all(),
                    "<IMG_CONTEXT> count per row does not match image tokens + region cells",
                    lambda: f"<IMG_CONTEXT> count per row {ctx.sum(1).tolist()} does not match image tokens + "
                            f"region cells {n_expected.tolist()}")
    src = torch.arange(B, device=ctx.device)[:, None] * N + cell  # (B, L); read only where ctx
    vis = image_feats.reshape(B * N, D)[src.reshape(-1)].reshape(B, -1, D).to(inputs_embeds.dtype)
    return torch.where(ctx[..., None], vis, inputs_embeds)

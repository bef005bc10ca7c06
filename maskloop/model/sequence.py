"""Batched prompt assembly: lay out a list of parts into one left-padded batch.

Every row is ``[pad ... pad | part0 | part1 | ...]`` — left padding, so that all rows end at the same
position (generation then reads one column of logits).  Each part is placed with one vectorised
scatter; the Python loop runs over the handful of parts, never over samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskloop.model.prompts import Embeds, Fixed, Part, Ragged, Repeat


@dataclass
class Assembled:
    input_ids: torch.Tensor  # (B, L) — Embeds positions hold pad_id
    attention_mask: torch.Tensor  # (B, L) 1 = real token
    position_ids: torch.Tensor  # (B, L) 0.. over the real tokens
    labels: torch.Tensor  # (B, L) token to predict AT this position (already shifted), -100 elsewhere
    positions: list[tuple[torch.Tensor, torch.Tensor]]  # per part: (B, l) positions, (B, l) valid
    embeds: list[tuple[int, Embeds]]  # (part index, part) for parts given as embeddings


def _part_tokens(part: Part, batch: int, device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(ids (B, l) or None for Embeds, lengths (B,)) of a part."""
    if isinstance(part, Fixed):
        ids = torch.tensor(part.ids, dtype=torch.long, device=device).expand(batch, len(part.ids))
        return ids, torch.full((batch,), len(part.ids), dtype=torch.long, device=device)
    if isinstance(part, Ragged):
        return part.ids.to(device), part.lengths.to(device)
    if isinstance(part, Repeat):
        lengths = torch.as_tensor(part.lengths, dtype=torch.long, device=device).expand(batch).contiguous()
        width = int(lengths.max()) if batch else 0
        return torch.full((batch, width), part.token_id, dtype=torch.long, device=device), lengths
    if isinstance(part, Embeds):
        return None, part.lengths.to(device)
    raise TypeError(f"unknown prompt part {type(part).__name__}")


def assemble(parts: list[Part], batch: int, pad_id: int, device=None) -> Assembled:
    device = device or torch.device("cpu")
    toks = [_part_tokens(p, batch, device) for p in parts]
    lengths = torch.stack([n for _, n in toks], 1)  # (B, P)
    total = lengths.sum(1)  # (B,)
    L = int(total.max())
    start = (L - total)[:, None] + torch.cumsum(lengths, 1) - lengths  # (B, P) first position of each part

    input_ids = torch.full((batch, L), pad_id, dtype=torch.long, device=device)
    labels = torch.full((batch, L), -100, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)[:, None]
    positions, embeds = [], []
    for i, (part, (ids, n)) in enumerate(zip(parts, toks)):
        width = ids.shape[1] if ids is not None else part.embeds.shape[1]
        offs = torch.arange(width, device=device)[None]
        pos = start[:, i : i + 1] + offs  # (B, l)
        valid = offs < n[:, None]
        pos = torch.where(valid, pos, torch.zeros_like(pos))
        positions.append((pos, valid))
        if ids is None:
            embeds.append((i, part))
            continue
        r, p = rows.expand_as(pos)[valid], pos[valid]
        input_ids[r, p] = ids[valid]
        if getattr(part, "target", False):
            keep = p > 0  # the token at position p is predicted by position p - 1
            labels[r[keep], p[keep] - 1] = ids[valid][keep]
    arange = torch.arange(L, device=device)[None]
    attention_mask = (arange >= (L - total)[:, None]).long()
    position_ids = (arange - (L - total)[:, None]).clamp(min=0)
    return Assembled(input_ids, attention_mask, position_ids, labels, positions, embeds)

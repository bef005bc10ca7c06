"""Batched prompt assembly: lay out a list of parts into one left-padded batch.

Every row is ``[pad ... pad | part0 | part1 | ...]`` — left padding, so that all rows end at the same
position (generation then reads one column of logits).  Each part is placed with one vectorised
scatter; the Python loop runs over the handful of parts, never over samples.

No host synchronisation on an accelerator: the batch width ``L`` is computed on the host, from the
lengths the host holds (fixed parts, lengths in CPU tensors) plus, for a part whose lengths live on the
device (a teacher's captions, region cell counts), its padded width — an upper bound, so such a batch may
carry a few more padding columns than the longest row needs (never fewer).  Scatters write the positions
a row does not use into a spare last column that is cut off, instead of selecting with boolean masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from maskloop.lru import SmallCache
from maskloop.model.prompts import Embeds, Fixed, Part, Ragged, Repeat


@dataclass
class Assembled:
    input_ids: torch.Tensor  # (B, L) — Embeds positions hold pad_id
    attention_mask: torch.Tensor  # (B, L) 1 = real token
    position_ids: torch.Tensor  # (B, L) 0.. over the real tokens
    labels: torch.Tensor  # (B, L) token to predict AT this position (already shifted), -100 elsewhere
    positions: list[tuple[torch.Tensor, torch.Tensor]]  # per part: (B, l) positions, (B, l) valid
    embeds: list[tuple[int, Embeds]]  # (part index, part) for parts given as embeddings
    # the supervised tokens of the target parts, flat over those parts: (B, W) position predicting each
    # token (0 where unused), (B, W) bool used, (B, W) token id — W = the sum of their widths
    targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


_FIXED = SmallCache(4096)  # (ids, device) -> (1, n) ids on that device: a prompt's fixed pieces, copied once


def device_ids(ids: list[int], device) -> torch.Tensor:
    return _FIXED.get((tuple(ids), str(device)), lambda: torch.tensor([list(ids)], dtype=torch.long).to(device))


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) padding mask (1 = token) -> (B, 1, L, L) bool: query i sees key j <= i where j is a token.

    The mask transformers builds for SDPA whenever a row is padded (``masking_utils.sdpa_mask``: the
    ``causal_mask_function`` ``kv_idx <= q_idx`` and'ed with ``padding_mask_function``'s
    ``padding_mask[batch_idx, kv_idx]``; a left-padding query sees no key, as there).  Given ready-made, a 4-D
    mask is returned as-is by ``_preprocess_mask_arguments`` (transformers 5.17 ``masking_utils.py`` l. 812,
    5.24 l. 818), so the LLM skips ``_ignore_causal_mask_sdpa``, which reads the padding mask on the host
    (``fast_all(padding_mask)``, 5.17 l. 269 / 5.24 l. 292) to drop the mask when nothing is padded: a host sync
    in every forward pass.  A batch without padding runs the same attention through this mask instead of
    ``is_causal``."""
    L = attention_mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]



_ONCE = WeakIdKeyDictionary()  # tensor -> (its version, the value read for it)


def host_once(key: torch.Tensor, read):
    """``read()`` (a value the host needs from the device), computed once per ``key`` tensor while it is
    unchanged (its version): later calls for the same tensor cost no host synchronisation."""
    hit = _ONCE.get(key)
    if hit is not None and hit[0] == key._version:
        return hit[1]
    value = read()
    _ONCE[key] = (key._version, value)
    return value


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor onto ``device`` without a host synchronisation (through pinned memory on CUDA)."""
    device = torch.device(device)
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _lengths_on_host(lengths, batch: int, read: bool) -> torch.Tensor | None:
    """(B,) int64 CPU lengths when the host holds them (an int, or a CPU tensor and ``read``), else None."""
    if isinstance(lengths, int):
        return torch.full((batch,), lengths, dtype=torch.long)
    if read and lengths.device.type == "cpu":
        return lengths.long().expand(batch)
    return None


def _part_tokens(part: Part, batch: int, device, read: bool):
    """(ids (B, w) on ``device`` or None for Embeds, device lengths (B,) or None, host lengths (B,) or None,
    width w: the most tokens a row of the part can take)."""
    if isinstance(part, Fixed):
        n = len(part.ids)
        return device_ids(part.ids, device).expand(batch, n), None, torch.full((batch,), n, dtype=torch.long), n
    if isinstance(part, Ragged):
        host = _lengths_on_host(part.lengths, batch, read)
        return to_device(part.ids, device), None if host is not None else part.lengths, host, part.ids.shape[1]
    if isinstance(part, Repeat):
        host = _lengths_on_host(part.lengths, batch, read)
        if host is not None:
            width = int(host.max()) if batch else 0
        else:
            # device lengths: the caller's host bound (``Repeat.width``), else one synchronisation
            width = part.width if part.width is not None else (int(part.lengths.max()) if batch else 0)
        return torch.full((batch, width), part.token_id, dtype=torch.long, device=device), \
            None if host is not None else part.lengths, host, width
    if isinstance(part, Embeds):
        host = _lengths_on_host(part.lengths, batch, read)
        return None, None if host is not None else part.lengths, host, part.embeds.shape[1]
    raise TypeError(f"unknown prompt part {type(part).__name__}")


def assemble(parts: list[Part], batch: int, pad_id: int, device=None, read_host_lengths: bool = True,
             length_multiple: int = 1) -> Assembled:
    """Lay ``parts`` out in a (B, L) left-padded batch on ``device``.

    ``read_host_lengths=False`` bounds every part by its width, as if no lengths were on the host (the path
    that device-resident lengths take; tests run it on the CPU).  ``length_multiple`` > 1 pads ``L`` up to a
    multiple of it (more left padding: few distinct shapes, e.g. for CUDA-graph replays)."""
    if length_multiple < 1:
        raise ValueError(f"length_multiple must be >= 1, got {length_multiple}")
    device = torch.device(device or "cpu")
    toks = [_part_tokens(p, batch, device, read_host_lengths) for p in parts]
    # the width on the host: exact over the parts whose lengths it holds, padded widths for the others
    known = [h for _, _, h, _ in toks if h is not None]
    bound = sum(w for _, d, h, w in toks if h is None)
    L = (int(torch.stack(known, 1).sum(1).max()) if known and batch else 0) + bound
    L = -(-L // length_multiple) * length_multiple
    # every part's lengths on the device: the host-held ones copied in one transfer
    host_cols = to_device(torch.stack(known, 1), device) if known else None
    cols, j = [], 0
    for _, dev_len, host, _ in toks:
        if host is not None:
            cols.append(host_cols[:, j])
            j += 1
        else:
            cols.append(dev_len.to(device).long())
    lengths = torch.stack(cols, 1) if cols else torch.zeros(batch, 0, dtype=torch.long, device=device)  # (B, P)
    total = lengths.sum(1)  # (B,)
    start = (L - total)[:, None] + torch.cumsum(lengths, 1) - lengths  # (B, P) first position of each part

    # one spare column (index L) takes every write of an unused slot; it is cut off at the end
    input_ids = torch.full((batch, L + 1), pad_id, dtype=torch.long, device=device)
    labels = torch.full((batch, L + 1), -100, dtype=torch.long, device=device)
    positions, embeds, targets = [], [], []
    for i, (part, (ids, _, _, width)) in enumerate(zip(parts, toks)):
        offs = torch.arange(width, device=device)[None]
        pos = start[:, i : i + 1] + offs  # (B, w)
        valid = offs < lengths[:, i : i + 1]
        positions.append((torch.where(valid, pos, torch.zeros_like(pos)), valid))
        if ids is None:
            embeds.append((i, part))
            continue
        ids = ids[:, :width]
        input_ids.scatter_(1, torch.where(valid, pos, L), ids)
        if getattr(part, "target", False):
            used = valid & (pos > 0)  # the token at position p is predicted by position p - 1
            labels.scatter_(1, torch.where(used, pos - 1, L), ids)
            targets.append((torch.where(used, pos - 1, torch.zeros_like(pos)), used, ids))
    arange = torch.arange(L, device=device)[None]
    attention_mask = (arange >= (L - total)[:, None]).long()
    position_ids = (arange - (L - total)[:, None]).clamp(min=0)
    if targets:
        tgt = tuple(torch.cat(t, 1) for t in zip(*targets))
    else:
        empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
        tgt = (empty, empty.bool(), empty)
    return Assembled(input_ids[:, :L].contiguous(), attention_mask, position_ids, labels[:, :L].contiguous(),
                     positions, embeds, tgt)

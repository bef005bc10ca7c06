"""Prompt assembly against a per-row reference."""

import torch

from maskloop.model.prompts import Embeds, Fixed, Ragged, Repeat
from maskloop.model.sequence import assemble


def test_assemble_matches_row_by_row_concatenation():
    B, PAD = 3, 0
    rag = Ragged.from_lists([[11, 12], [13], []], PAD)
    tgt = Ragged.from_lists([[21], [22, 23, 24], [25, 26]], PAD, target=True)
    emb = Embeds(torch.randn(B, 4, 2), torch.tensor([4, 0, 2]))
    parts = [Fixed([1, 2]), Repeat(9, torch.tensor([2, 0, 1])), rag, emb, tgt]
    asm = assemble(parts, B, PAD)
    rows = [
        [1, 2, 9, 9, 11, 12, -1, -1, -1, -1, 21],
        [1, 2, 13, 22, 23, 24],
        [1, 2, 9, -1, -1, 25, 26],
    ]
    L = max(map(len, rows))
    assert asm.input_ids.shape == (B, L)
    for b, row in enumerate(rows):
        pad = L - len(row)
        want = [PAD] * pad + [PAD if t == -1 else t for t in row]
        assert asm.input_ids[b].tolist() == want
        assert asm.attention_mask[b].tolist() == [0] * pad + [1] * len(row)
        assert asm.position_ids[b, pad:].tolist() == list(range(len(row)))
    # labels: position p predicts the target token at p + 1
    lab = asm.labels
    assert lab[0, -2].item() == 21 and (lab[0] != -100).sum() == 1
    assert lab[1, -4:-1].tolist() == [22, 23, 24]
    # embeds part positions
    pos, valid = asm.positions[3]
    assert valid.sum(1).tolist() == [4, 0, 2]
    assert pos[2, :2].tolist() == [L - 4, L - 3]

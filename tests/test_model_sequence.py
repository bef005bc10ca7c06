"""Prompt assembly against a per-row reference."""

import pytest
import torch
from conftest import selected_lm_loss

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


def _rows(asm):
    """Per row: (ids, labels, position ids) of the real (attended) columns."""
    keep = asm.attention_mask.bool()
    return [(asm.input_ids[b][keep[b]].tolist(), asm.labels[b][keep[b]].tolist(), asm.position_ids[b][keep[b]].tolist())
            for b in range(keep.shape[0])]


def test_device_lengths_path_pads_to_the_widths_and_lays_out_the_same_rows():
    """Lengths the host does not hold (device tensors; here forced with read_host_lengths=False) bound the
    width by each part's padded width: more left padding, the same tokens, labels and positions per row."""
    B, PAD = 3, 0
    rag = Ragged.from_lists([[11, 12], [13], []], PAD)
    tgt = Ragged.from_lists([[21], [22, 23, 24], [25, 26]], PAD, target=True)
    emb = Embeds(torch.randn(B, 4, 2), torch.tensor([4, 0, 2]))
    parts = [Fixed([1, 2]), Repeat(9, torch.tensor([2, 0, 1]), width=3), rag, emb, tgt]
    exact, bound = assemble(parts, B, PAD), assemble(parts, B, PAD, read_host_lengths=False)
    assert exact.input_ids.shape[1] == 11 and bound.input_ids.shape[1] == 2 + 3 + 2 + 4 + 3
    assert _rows(exact) == _rows(bound)
    for (pe, ve), (pb, vb) in zip(exact.positions, bound.positions):
        w = ve.shape[1]  # the Repeat part is 3 wide by its host bound, 2 when its lengths are read
        assert torch.equal(ve, vb[:, :w]) and not vb[:, w:].any()
        assert torch.equal((pe - exact.input_ids.shape[1])[ve], (pb - bound.input_ids.shape[1])[vb])
    # the unused slots' writes went to the cut-off spare column: no stray token anywhere in the padding
    assert (bound.input_ids[~bound.attention_mask.bool()] == PAD).all()
    assert (bound.labels[~bound.attention_mask.bool()] == -100).all()


def test_length_multiple_only_adds_left_padding():
    """A batch padded up to a multiple of 8 carries the same rows, right-aligned, and only padding before."""
    B, PAD = 3, 0
    parts = [Fixed([1, 2]), Ragged.from_lists([[11, 12], [13], []], PAD),
             Ragged.from_lists([[21], [22, 23, 24], [25, 26]], PAD, target=True)]
    a, b = assemble(parts, B, PAD), assemble(parts, B, PAD, length_multiple=8)
    L, M = a.input_ids.shape[1], b.input_ids.shape[1]
    assert L == 6 and M == 8
    for x, y in ((a.input_ids, b.input_ids), (a.attention_mask, b.attention_mask), (a.position_ids, b.position_ids),
                 (a.labels, b.labels)):
        assert torch.equal(y[:, M - L:], x)
    assert (b.attention_mask[:, : M - L] == 0).all() and (b.labels[:, : M - L] == -100).all()
    assert _rows(a) == _rows(b)
    assert assemble(parts, B, PAD, length_multiple=3).input_ids.shape[1] == 6  # already a multiple
    with pytest.raises(ValueError, match="length_multiple"):
        assemble(parts, B, PAD, length_multiple=0)


def test_targets_list_exactly_the_labelled_positions():
    """asm.targets (position predicting each target token, used, id) is the labels tensor read another way."""
    B, PAD = 3, 0
    parts = [Fixed([1]), Ragged.from_lists([[5, 6], [], [7]], PAD, target=True), Fixed([8, 9], target=True),
             Ragged.from_lists([[3], [4, 4], []], PAD, target=True)]
    for read in (True, False):
        asm = assemble(parts, B, PAD, read_host_lengths=read)
        pos, used, ids = asm.targets
        got = sorted((b, int(p), int(t)) for b in range(B) for p, u, t in zip(pos[b], used[b], ids[b]) if u)
        want = sorted((b, p, int(asm.labels[b, p])) for b in range(B) for p in range(asm.labels.shape[1])
                      if asm.labels[b, p] != -100)
        assert got == want and len(want) == (2 + 0 + 1) + 2 * 3 + (1 + 2 + 0)


def test_masked_lm_loss_equals_the_selected_cross_entropy():
    from maskloop.model import losses

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    used = torch.rand(3, 5) > 0.4
    got = losses.masked_lm_loss(logits, labels, used)
    want = selected_lm_loss(logits[used], labels[used])
    torch.testing.assert_close(got, want)
    g1, = torch.autograd.grad(got, logits)
    g2, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g1, g2)
    zero = losses.masked_lm_loss(logits, labels, torch.zeros_like(used))
    assert zero.item() == 0.0 and zero.requires_grad


def test_host_once_reads_once_per_tensor_version():
    from maskloop.model.sequence import host_once

    t, calls = torch.zeros(3), []

    def read():
        calls.append(1)
        return float(t.sum())

    assert host_once(t, read) == 0.0 and host_once(t, read) == 0.0 and len(calls) == 1
    t.add_(1)  # changed in place: read again
    assert host_once(t, read) == 3.0 and len(calls) == 2
    assert host_once(torch.zeros(3), read) == 3.0 and len(calls) == 3  # another tensor

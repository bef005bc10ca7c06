"""Batched region gathering against a per-sample reference."""

import torch

from maskloop.model.prompts import Fixed, Repeat
from maskloop.model.region import centroid_cells, ensure_nonempty, inject_visual_tokens, logits_to_prompt
from maskloop.model.sequence import assemble

CTX, PAD = 7, 0


def reference(embeds, ids, feats, prompts):
    """Straightforward loop: row by row, context position by position."""
    out = embeds.clone()
    B, N, _ = feats.shape
    for b in range(B):
        cells = [j for j in range(N) if prompts[b].flatten()[j]]
        sources = list(range(N)) + cells
        k = 0
        for p in range(ids.shape[1]):
            if ids[b, p] == CTX:
                out[b, p] = feats[b, sources[k]]
                k += 1
        assert k == len(sources)
    return out


def _random_case(B, g, D, seed):
    gen = torch.Generator().manual_seed(seed)
    N = g * g
    prompts = (torch.rand(B, g, g, generator=gen) > 0.7).to(torch.uint8)
    prompts[0] = 0  # K = 0 ...
    prompts[1] = 1  # ... and a full mask
    hi = (torch.rand(B, 32, 32, generator=gen) > 0.5)
    prompts, n_fix = ensure_nonempty(prompts, centroid_cells(hi, g))
    assert n_fix >= 1 and prompts[0].sum() == 1
    k = prompts.flatten(1).sum(1)
    parts = [Fixed([1, 2]), Repeat(CTX, N), Fixed([3]), Repeat(CTX, k), Fixed([4, 5])]
    asm = assemble(parts, B, PAD)
    feats = torch.randn(B, N, D, generator=gen)
    embeds = torch.randn(*asm.input_ids.shape, D, generator=gen)
    return embeds, asm.input_ids, feats, prompts


def test_batched_gather_matches_per_sample_loop():
    for seed in range(5):
        embeds, ids, feats, prompts = _random_case(B=6, g=4, D=5, seed=seed)
        got = inject_visual_tokens(embeds, ids, CTX, feats, prompts)
        torch.testing.assert_close(got, reference(embeds, ids, feats, prompts), rtol=0, atol=0)


def test_gather_is_differentiable_into_features():
    embeds, ids, feats, prompts = _random_case(B=3, g=4, D=5, seed=1)
    feats.requires_grad_(True)
    inject_visual_tokens(embeds, ids, CTX, feats, prompts).sum().backward()
    # every image token is used once by the image, plus once per region selection
    expected = 1 + prompts.flatten(1).float()
    torch.testing.assert_close(feats.grad[..., 0], expected)


def test_count_mismatch_is_a_clear_error():
    embeds, ids, feats, prompts = _random_case(B=2, g=4, D=3, seed=2)
    bad = prompts.clone()
    bad[1] = 1 - bad[1]
    bad[1, 0, 0] = 1 if bad[1].sum() == 0 else bad[1, 0, 0]
    if bad[1].sum() == prompts[1].sum():
        bad[1, 0, 0] = 1 - bad[1, 0, 0]
    try:
        inject_visual_tokens(embeds, ids, CTX, feats, bad)
    except ValueError as e:
        assert "IMG_CONTEXT" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_centroid_and_logits_to_prompt():
    m = torch.zeros(2, 16, 16)
    m[0, 12:16, 0:4] = 1  # bottom-left quarter -> centroid cell row 3, col 0 of a 4x4 grid
    assert centroid_cells(m, 4).tolist() == [3 * 4 + 0, 2 * 4 + 2]  # the empty mask takes the centre
    logits = torch.full((2, 16, 16), -10.0)
    logits[0, :8, :8] = 10.0
    logits[1, 0, 0] = 1.0  # nothing above 0.5 after pooling: falls back to the most probable cell
    prompt, n = logits_to_prompt(logits, 4)
    assert n == 1
    assert prompt[0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert prompt[1].sum() == 1 and prompt[1, 0, 0] == 1


def test_image_context_count_mismatch_is_one_clear_error():
    import pytest

    B, N, D, ctx_id = 2, 4, 3, 7
    ids = torch.zeros(B, 8, dtype=torch.long)
    ids[0, 1:5] = ctx_id
    ids[1, 1:4] = ctx_id  # one slot short
    with pytest.raises(ValueError, match=r"count per row \[4, 3\] does not match image tokens \+ region cells \[4, 4\]"):
        inject_visual_tokens(torch.zeros(B, 8, D), ids, ctx_id, torch.randn(B, N, D))
    ids[1, 4] = ctx_id
    out = inject_visual_tokens(torch.zeros(B, 8, D), ids, ctx_id, feats := torch.randn(B, N, D))
    assert torch.equal(out[:, 1:5], feats) and torch.equal(out[:, 5:], torch.zeros(B, 3, D))

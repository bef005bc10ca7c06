import torch

from maskloop.model.psalm.projector import (
    DeformableProjector,
    SwinConvConnector,
    rasterize_boxes,
    rasterize_points,
    rasterize_scribbles,
    region_features,
)


def _levels(B=2, dims=(8, 16, 32, 64), size=64):
    return [torch.randn(B, d, size // 4 // 2**i, size // 4 // 2**i) for i, d in enumerate(dims)]


def test_deformable_projector_shapes_and_query_mask():
    torch.manual_seed(0)
    p = DeformableProjector(level_dims=(8, 16, 32, 64), hidden=32, n_heads=4, n_points=2, llm_dim=48)
    levels = _levels()
    z = torch.randn(2, 5, 48)
    assert p(z, levels).shape == (2, 1, 48)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = p(z, levels, mask)
    # padded queries do not change the pooled token
    only3 = p(z[:1, :3], [x[:1] for x in levels])
    torch.testing.assert_close(out[:1], only3, rtol=1e-5, atol=1e-5)
    p.pool = "none"
    assert p(z, levels).shape == (2, 5, 48)
    p2 = DeformableProjector(level_dims=(8, 16, 32, 64), hidden=32, n_heads=4, n_points=2, llm_dim=48, query_dim=32)
    assert p2(torch.randn(2, 3, 32), levels).shape == (2, 1, 48)


def test_deformable_projector_backward():
    p = DeformableProjector(level_dims=(8, 16, 32, 64), hidden=32, n_heads=4, n_points=2, llm_dim=48)
    levels = [x.requires_grad_() for x in _levels()]
    p(torch.randn(2, 4, 48), levels).sum().backward()
    assert all(x.grad is not None for x in levels)
    assert p.attn.sampling_offsets.weight.grad.abs().sum() > 0


def test_swin_conv_tokens():
    c = SwinConvConnector(in_dim=64, llm_dim=48, mid_dim=32)
    res5 = torch.randn(2, 64, 8, 8)  # a 256 input
    assert c(res5).shape == (2, 16, 48)
    assert c.feature_map(res5).shape == (2, 48, 4, 4)
    keys = set(c.state_dict())
    assert {"layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv2.weight", "layer1.0.downsample.0.weight",
            "layer1.0.downsample.1.running_mean", "fc.weight"} <= keys


def test_region_features():
    B, C, H, W = 2, 3, 8, 8
    xs = (torch.arange(W).float() + 0.5) / W
    fmap = torch.zeros(B, C, H, W)
    fmap[:, 0] = 1.0  # constant channel
    fmap[:, 1] = xs.view(1, 1, W)  # x coordinate channel
    masks = torch.zeros(B, 3, 64, 64)
    masks[:, 0, :, :32] = 1  # left half
    masks[:, 1, :, 32:] = 1  # right half
    # region 2 empty
    g = torch.Generator().manual_seed(0)
    f = region_features(fmap, masks, n_points=256, generator=g)
    assert f.shape == (B, 3, C)
    torch.testing.assert_close(f[:, :2, 0], torch.ones(B, 2))
    assert (f[:, 0, 1] < 0.5).all() and (f[:, 1, 1] > 0.5).all()
    assert torch.all(f[:, 2] == 0)
    # a region smaller than one cell still gets a feature (falls back to touched cells)
    tiny = torch.zeros(1, 1, 64, 64)
    tiny[0, 0, 1, 1] = 1
    assert region_features(fmap[:1], tiny, generator=g)[0, 0, 0] == 1.0


def test_rasterize():
    size = (64, 64)
    pts = rasterize_points(torch.tensor([[[32.0, 32.0]]]), size, radius=10)
    area = pts.sum().item()
    assert abs(area - 3.14159 * 100) < 25
    scr = rasterize_scribbles(torch.tensor([[[10.0, 32.0], [50.0, 32.0]]]), size, radius=5)
    assert scr[0, 32, 30] and scr[0, 36, 10] and not scr[0, 40, 30]
    assert abs(scr.sum().item() - (40 * 11 + 3.14159 * 25)) < 30
    box = rasterize_boxes(torch.tensor([[10.0, 20.0, 30.0, 25.0]]), size)
    assert box.sum().item() == 20 * 5
    valid = torch.tensor([[True, False]])
    two = rasterize_points(torch.tensor([[[5.0, 5.0], [50.0, 50.0]]]), size, 3, valid)
    assert two[0, 5, 5] and not two[0, 50, 50]

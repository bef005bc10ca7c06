"""SAM2Head's optional cache of the frozen image encoder's maps: the same maps as the encoder, per image."""

import torch

from maskloop.model.presets import get_preset, sam2_config
from maskloop.model.sam2_head import BackboneCache, SAM2Head


def _head():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    head = SAM2Head(sam2_config(cfg), True, "best_iou").eval()
    head.sam.vision_encoder.requires_grad_(False)
    s = head.image_size
    imgs = torch.randint(0, 256, (6, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return head, imgs


def _fresh(head, imgs):
    """The reference: the encoder on each image alone, no cache."""
    cache, head.backbone_cache = head.backbone_cache, None
    with torch.no_grad():
        out = [head.backbone(imgs[i:i + 1]) for i in range(imgs.shape[0])]
    head.backbone_cache = cache
    return [torch.cat([o[level] for o in out]) for level in range(len(out[0]))]


def _close(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and torch.allclose(x, y, atol=1e-5, rtol=1e-4)
                                    for x, y in zip(a, b))


def test_cached_maps_are_the_encoders_per_image_and_computed_once():
    head, imgs = _head()
    head.backbone_cache = cache = BackboneCache()
    with torch.no_grad():
        a = head.backbone(imgs[:4])
        assert cache.misses == 4 and cache.hits == 0 and len(cache) == 4
        order = torch.tensor([5, 2, 2, 0, 4])  # two seen, one twice in the batch, two new
        b = head.backbone(imgs[order])
    assert cache.misses == 6 and cache.hits == 3 and len(cache) == 6
    assert _close(a, _fresh(head, imgs[:4]))
    assert _close(b, _fresh(head, imgs[order]))
    assert all(torch.equal(x[1], x[2]) and torch.equal(x[1], y[2]) for x, y in zip(b, a))  # image 2: stored maps


def test_weight_change_empties_the_cache_and_trained_encoder_bypasses_it():
    head, imgs = _head()
    head.backbone_cache = cache = BackboneCache()
    with torch.no_grad():
        head.backbone(imgs)
        w = head.sam.vision_encoder.backbone.patch_embed.projection.weight
        w.mul_(0.5)  # an in-place change (a load, an optimizer step)
        after = head.backbone(imgs)
    assert cache.misses == 12 and len(cache) == 6
    assert _close(after, _fresh(head, imgs))
    head.sam.vision_encoder.requires_grad_(True)  # trained: the encoder runs, with autograd, nothing stored
    out = head.backbone(imgs[:2])
    assert out[0].requires_grad and cache.misses == 12 and cache.hits == 0


def test_cache_is_bounded_least_recently_used_dropped():
    head, imgs = _head()
    with torch.no_grad():
        per = sum(m[0].numel() * m[0].element_size() for m in head.backbone(imgs[:1]))
        head.backbone_cache = cache = BackboneCache(max_bytes=3 * per)
        head.backbone(imgs[:3])
        head.backbone(imgs[:1])  # image 0 is now the most recently used
        head.backbone(imgs[3:4])  # evicts image 1
        assert len(cache) == 3 and cache.nbytes == 3 * per
        head.backbone(imgs[:1])
        assert cache.hits == 2
        head.backbone(imgs[1:2])
        assert cache.misses == 5

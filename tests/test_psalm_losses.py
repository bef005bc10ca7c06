import torch

from maskloop.model.psalm.losses import LossWeights, PSALMCriterion, hungarian_match
from maskloop.model.psalm.model import PSALMOutput


def _case(perfect_cls=True):
    h = w = 8
    t0 = torch.zeros(h, w)
    t0[:4] = 1
    t1 = torch.zeros(h, w)
    t1[:, :2] = 1
    targets = [{"labels": torch.tensor([1, 0]), "masks": torch.stack([t0, t1])}]
    masks = torch.full((1, 3, h, w), -8.0)
    masks[0, 2] = t0 * 16 - 8  # query 2 draws target 0
    masks[0, 0] = t1 * 16 - 8  # query 0 draws target 1
    logits = torch.full((1, 3, 3), -5.0)  # 2 class names + no object
    logits[0, 2, 1] = logits[0, 0, 0] = logits[0, 1, 2] = 5.0
    return logits, masks, targets


def test_hungarian_match_known_assignment():
    logits, masks, targets = _case()
    for num_points in (None, 256):
        (qi, ti), = hungarian_match(logits, masks, targets, LossWeights(num_points=num_points),
                                    torch.Generator().manual_seed(0))
        assert dict(zip(qi.tolist(), ti.tolist())) == {0: 1, 2: 0}


def test_criterion_perfect_vs_wrong():
    logits, masks, targets = _case()
    seg = torch.tensor([[5.0, -5.0, 5.0]])
    good = PSALMOutput([masks], [logits], None, [seg], None, None, None)
    bad = PSALMOutput([masks.flip(1)], [logits.flip(1)], None, [-seg], None, None, None)
    crit = PSALMCriterion(LossWeights(num_points=None))
    tg, lg = crit(good, targets)
    tb, _ = crit(bad, targets)
    assert tg < 0.2 and tb > tg
    assert set(lg) == {"loss_class_name_class", "loss_SEG_class", "loss_mask", "loss_dice"}
    w = LossWeights()
    assert (w.class_weight, w.mask_weight, w.dice_weight, w.no_object_weight) == (2.0, 5.0, 5.0, 0.1)

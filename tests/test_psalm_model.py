import pytest
import torch

from maskloop.model.psalm.losses import LossWeights, PSALMCriterion
from maskloop.model.psalm.model import PSALMModel, build_prompt_ids, n_image_tokens, psalm_config

SQUARE, CIRCLE = [20, 21], [22, 23]  # token ids of the category names


def _shapes_batch(cfg, B=2, seed=0):
    """Synthetic panoptic-ish images: one bright square and one dark disc per image."""
    g = torch.Generator().manual_seed(seed)
    S = cfg.image_size
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    imgs, targets = torch.zeros(B, 3, S, S), []
    for b in range(B):
        x0, y0 = torch.randint(0, S // 2, (2,), generator=g).tolist()
        sq = torch.zeros(S, S)
        sq[y0:y0 + S // 3, x0:x0 + S // 3] = 1
        cx, cy = torch.randint(S // 4, 3 * S // 4, (2,), generator=g).tolist()
        ci = (((xx - cx) ** 2 + (yy - cy) ** 2) <= (S // 6) ** 2).float() * (1 - sq)
        imgs[b] = sq * 1.0 - ci * 1.0 + 0.1 * torch.randn(3, S, S, generator=g)
        targets.append({"labels": torch.tensor([0, 1]), "masks": torch.stack([sq, ci])})
    return imgs, targets


def _panoptic_inputs(cfg, B):
    ids = [build_prompt_ids(cfg, "panoptic", [5, 6, 7], n_image_tokens(cfg), cfg.num_queries, n_cls=2)[0]
           for _ in range(B)]
    names = torch.tensor([SQUARE, CIRCLE]).expand(B, 2, 2)
    return dict(input_ids=torch.tensor(ids), class_name_ids=names, class_name_mask=torch.ones_like(names).bool())


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = psalm_config("psalm-tiny")
    return cfg, PSALMModel(cfg)


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic", "referring", "region", "cross_image"])
def test_tasks_forward_and_loss(tiny, task):
    cfg, model = tiny
    B = 2
    imgs, targets = _shapes_batch(cfg, B)
    kw = {}
    if task in ("panoptic", "instance", "semantic"):
        kw = _panoptic_inputs(cfg, B)
    elif task == "referring":
        built = [build_prompt_ids(cfg, task, [5], n_image_tokens(cfg), cfg.num_queries, refer_ids=SQUARE)
                 for _ in range(B)]
        kw = dict(input_ids=torch.tensor([b[0] for b in built]), refer_mask=torch.tensor([b[1] for b in built]))
        targets = [{"labels": torch.tensor([0]), "masks": t["masks"][:1]} for t in targets]
    else:
        ids = [build_prompt_ids(cfg, task, [5], n_image_tokens(cfg), cfg.num_queries, n_regions=2)[0]
               for _ in range(B)]
        kw = dict(input_ids=torch.tensor(ids), region_masks=torch.stack([t["masks"] for t in targets]))
        if task == "cross_image":
            kw["prompt_pixel_values"] = imgs.flip(-1)
    out = model(task, imgs, labels=kw["input_ids"], **kw)
    assert out.pred_masks[-1].shape == (B, cfg.num_queries, cfg.image_size // 4, cfg.image_size // 4)
    assert len(out.pred_masks) == cfg.dec_layers
    logits = out.region_logits if task in ("region", "cross_image") else out.class_logits
    assert logits[-1].shape[:2] == (B, cfg.num_queries)
    assert out.deform_tokens.shape == (B, 1, cfg.llm_hidden)
    total, losses = PSALMCriterion(LossWeights(num_points=64))(out, targets)
    assert torch.isfinite(total)
    key = "loss_region_class" if task in ("region", "cross_image") else "loss_class_name_class"
    assert {key, "loss_SEG_class", "loss_mask", "loss_dice", "loss_llm", key + "_0"} <= set(losses)
    total.backward()
    assert model.deform_projector.attn.value_proj.weight.grad is not None
    model.zero_grad()


def test_prompt_count_mismatch_is_explained(tiny):
    cfg, model = tiny
    imgs, _ = _shapes_batch(cfg, 2)
    kw = _panoptic_inputs(cfg, 2)
    kw["class_name_ids"] = torch.tensor([[SQUARE, CIRCLE, SQUARE]] * 2)
    kw["class_name_mask"] = torch.ones(2, 3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="<cls>"):
        model("panoptic", imgs, **kw)


def test_tiny_trains_loss_falls():
    torch.manual_seed(0)
    cfg = psalm_config("psalm-tiny")
    model = PSALMModel(cfg)
    crit = PSALMCriterion(LossWeights(num_points=None, deep_supervision=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    imgs, targets = _shapes_batch(cfg, 2, seed=1)
    kw = _panoptic_inputs(cfg, 2)
    hist = []
    for _ in range(12):
        total, _ = crit(model("panoptic", imgs, **kw), targets)
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        hist.append(total.item())
    assert sum(hist[-3:]) / 3 < 0.7 * sum(hist[:3]) / 3, hist


def test_psalm_argument_names_and_switches():
    import pytest

    from maskloop.model.psalm.model import seg_task_tasks

    cfg = psalm_config("psalm-tiny", mm_hidden_dim=48, mm_n_heads=3, mm_n_points=5, projector_outdim=64)
    assert (cfg.deform_hidden, cfg.deform_heads, cfg.deform_points) == (48, 3, 5)
    large = psalm_config("psalm-swinb-phi15", swin_type="large")
    assert large.level_dims == (192, 384, 768, 1536) and large.swin_heads == (6, 12, 24, 48)
    with pytest.raises(ValueError, match="projector_outdim"):
        psalm_config("psalm-tiny", projector_outdim=2048)
    assert seg_task_tasks("panoptic") == ("semantic", "instance", "panoptic")
    assert seg_task_tasks("referring+region") == ("referring", "region")
    with pytest.raises(ValueError, match="seg_task"):
        seg_task_tasks("detection")


def test_gradient_checkpointing_same_gradients():
    """PSALM's --gradient_checkpointing: recomputation gives the same loss and gradients."""
    torch.manual_seed(0)
    cfg = psalm_config("psalm-tiny")
    a = PSALMModel(cfg).train()
    b = PSALMModel(psalm_config("psalm-tiny", gradient_checkpointing=True)).train()
    b.load_state_dict(a.state_dict())
    assert b.llm.model.gradient_checkpointing
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.base_vocab, (2, 12), generator=g)
    ids[:, :1] = cfg.tokens.seg_token
    x = torch.randn(2, 12, cfg.llm_hidden, generator=g)
    outs = []
    for m in (a, b):
        out = m.llm(inputs_embeds=x, labels=ids)
        out.loss.backward()
        outs.append((out.loss.detach(), m.llm.model.layers[0].mlp.fc1.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])

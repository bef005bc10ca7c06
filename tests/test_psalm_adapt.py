import torch
from safetensors.torch import load_file, save_file

from maskloop.model.psalm.adapt import (
    DEFORM_PREFIX,
    deformable_to_psalm,
    main,
    psalm_to_deformable,
    to_maskloop_keys,
)
from maskloop.model.psalm.model import PSALMModel, psalm_config
from maskloop.model.psalm.projector import DeformableProjector


def _synthetic_psalm_baseline():
    """A tiny baseline checkpoint in PSALM's key names (zamling/PSALM, llava_phi.PSALM)."""
    cfg = psalm_config("psalm-tiny", deform=False)
    torch.manual_seed(0)
    ours = PSALMModel(cfg).state_dict()
    sd = {}
    for k, v in ours.items():
        if k.startswith("llm.model."):
            sd["model." + k[len("llm.model."):]] = v
        elif k.startswith("llm.lm_head."):
            sd["lm_head." + k[len("llm.lm_head."):]] = v
        elif k.startswith("mm_projector."):
            sd["model." + k] = v
        elif k.split(".")[0] in {"seg_query", "seg_query_projector", "SEG_token_projector",
                                 "class_name_projector", "region_projector"}:
            sd[k] = v
    # detectron2-Swin and Mask2Former-Simplify names as PSALM stores them
    sd["model.vision_tower.patch_embed.proj.weight"] = torch.randn(16, 3, 4, 4)
    sd["model.vision_tower.layers.0.blocks.0.attn.qkv.weight"] = torch.randn(48, 16)
    sd["pixel_decoder.adapter_1.0.weight"] = torch.randn(32, 16, 1, 1)
    sd["predictor.query_embed.weight"] = torch.randn(6, 32)
    return cfg, sd


def test_round_trip_and_report(tmp_path):
    cfg, base = _synthetic_psalm_baseline()
    assert {"model.layers.0.self_attn.q_proj.weight", "model.final_layernorm.weight", "lm_head.weight",
            "model.mm_projector.fc.weight", "seg_query"} <= set(base)
    adapted, report = psalm_to_deformable(base, hidden=32, n_heads=2, n_points=2)
    assert report["copied"] == sorted(base)
    assert report["new"] and all(k.startswith(DEFORM_PREFIX) for k in report["new"])
    assert report["config"]["level_dims"] == list(cfg.level_dims)
    assert report["config"]["llm_dim"] == cfg.llm_hidden
    for k, v in base.items():
        assert torch.equal(adapted[k], v)
    back = deformable_to_psalm(adapted)
    assert back.keys() == base.keys() and all(torch.equal(back[k], base[k]) for k in base)
    # the new keys load strictly into the module they describe
    mod = DeformableProjector(cfg.level_dims, 32, 2, 2, cfg.llm_hidden)
    mod.load_state_dict({k[len(DEFORM_PREFIX):]: v for k, v in adapted.items() if k.startswith(DEFORM_PREFIX)})
    # PSALM names -> our model's names: the shared modules load into PSALMModel
    renamed, unmapped = to_maskloop_keys(adapted)
    assert sorted(unmapped) == sorted(k for k in base if k.startswith(("model.vision_tower.", "pixel_decoder.",
                                                                        "predictor.")))
    model = PSALMModel(psalm_config("psalm-tiny", deform_hidden=32, deform_heads=2, deform_points=2))
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected
    assert not any(k.startswith(("llm.", "mm_projector.", "deform_projector.")) for k in missing)
    # command line on safetensors files
    src, dst = tmp_path / "base.safetensors", tmp_path / "deform.safetensors"
    save_file({k: v.contiguous() for k, v in base.items()}, str(src))
    assert main([str(src), str(dst), "--report", str(tmp_path / "r.json")]) == 0
    written = set(load_file(str(dst)))
    assert set(base) < written and all(k.startswith(DEFORM_PREFIX) for k in written - set(base))

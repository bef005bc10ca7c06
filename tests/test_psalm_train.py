import json

import pytest
import torch

from maskloop.config import ConfigError
from maskloop.data.fixtures import write_shapes_psalm
from maskloop.eval.psalm_eval import evaluate_psalm, format_table, main_eval
from maskloop.model.psalm.model import PSALMOutput
from maskloop.model.psalm.postprocess import (
    instance_inference,
    panoptic_inference,
    postprocess,
    referring_inference,
    region_inference,
    semantic_inference,
)
from maskloop.recipes.psalm import PSALM_DEFAULTS, build_psalm, main_train, train_psalm

BIG = 10.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is latency-bound; one intra-op thread avoids OpenMP spin on shared CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _masks():
    """4 queries on 8x8: q0 left half, q1 top-right, q2 bottom-right, q3 everything (low score)."""
    m = torch.full((4, 8, 8), -BIG)
    m[0, :, :4] = BIG
    m[1, :4, 4:] = BIG
    m[2, 4:, 4:] = BIG
    m[3] = BIG
    return m


def test_panoptic_inference_known_result():
    # classes: 0 thing "rect", 1 stuff "sky", + no-object
    logits = torch.tensor([[BIG, 0, 0], [0, BIG, 0], [0, BIG, 0], [0.5, 0.4, 0.0]])
    pan, segs = panoptic_inference(logits, _masks(), isthing=[True, False])
    assert [(s["id"], s["category_id"], s["isthing"]) for s in segs] == [(1, 0, True), (2, 1, False)]
    expect = torch.zeros(8, 8, dtype=torch.int32)
    expect[:, :4] = 1
    expect[:, 4:] = 2  # the two stuff queries merged into one segment
    assert torch.equal(pan, expect)
    # a query mostly covered by a stronger one fails the overlap threshold
    logits2 = logits.clone()
    logits2[3] = torch.tensor([BIG, 0, 0])
    m = _masks()
    m[3] = -BIG
    m[3, :, :5] = BIG  # overlaps q0 almost entirely; q0 scores higher (tie broken by order)
    pan2, segs2 = panoptic_inference(logits2, m, isthing=[True, False])
    assert len([s for s in segs2 if s["category_id"] == 0]) == 1
    # everything "no object" -> empty
    pan3, segs3 = panoptic_inference(torch.tensor([[0, 0, BIG]] * 4), _masks(), isthing=[True, False])
    assert segs3 == [] and not pan3.any()


def test_semantic_and_instance_inference():
    logits = torch.tensor([[BIG, 0, 0], [0, BIG, 0], [0, BIG, 0], [0, 0, BIG]])
    sem = semantic_inference(logits, _masks(), size=(16, 16)).argmax(0)
    assert sem.shape == (16, 16) and (sem[:, :8] == 0).all() and (sem[:, 8:] == 1).all()
    res = instance_inference(logits, _masks(), topk=3)
    assert res["queries"].tolist()[:1] == [0] and set(res["queries"].tolist()) == {0, 1, 2}
    assert res["labels"].tolist() == [0, 1, 1] and bool((res["scores"][:-1] >= res["scores"][1:]).all())
    assert torch.equal(res["masks"][0], _masks()[0] > 0)
    things = instance_inference(logits, _masks(), topk=3, isthing=[True, False])
    assert things["labels"].tolist() == [0]


def test_referring_and_region_inference():
    seg = torch.tensor([-1.0, 3.0, 0.0, 1.0])
    assert torch.equal(referring_inference(_masks(), seg), _masks()[1] > 0)
    region_logits = torch.tensor([[0, BIG, 0], [BIG, 0, 0], [0, 0, BIG], [0, 0, BIG]])
    out = region_inference(region_logits, _masks(), 2, size=(8, 8))
    assert torch.equal(out[0], _masks()[1] > 0) and torch.equal(out[1], _masks()[0] > 0)
    po = PSALMOutput([_masks()[None]], None, [region_logits[None]], [seg[None]], None, None, None)
    assert postprocess("region", po, 0, meta={"masks": torch.zeros(2, 8, 8)}).shape == (2, 8, 8)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("psalm")
    p = write_shapes_psalm(root / "data", n=2)
    data = [
        {"kind": "coco_panoptic", "root": str(p["coco_root"]), "split": "train2017", "repeat": 2},
        {"kind": "refcoco", "root": str(p["refer_root"])},
        {"kind": "coco_interactive", "json_path": str(p["interactive_json"]), "image_dir": str(p["images"]),
         "prompt_type": "box", "repeat": 2},
    ]
    return root, data


def test_recipe_trains_tiny_and_checkpoints(shapes):
    root, data = shapes
    run = root / "run"
    cfg = dict(model="psalm-tiny", data=data, max_steps=12, batch_size=2, accumulation=1, lr=1e-3,
               warmup_ratio=0.0, num_workers=0, num_points=64, run_dir=str(run), progress=False, ckpt_every=6,
               keep_last=2, seed=0)
    hist = train_psalm(cfg)
    assert len(hist) == 12 and all(h["grad_norm"] == h["grad_norm"] for h in hist)
    first: dict[str, float] = {}  # tasks alternate, so compare each step with its task's first loss
    rel = []
    for h in hist:
        task = next(k for k in h if k.startswith("loss/"))
        first.setdefault(task, h[task])
        rel.append(h[task] / first[task])
    assert sum(rel[-4:]) / 4 < 0.9, rel
    refer = [h["loss/referring"] for h in hist if "loss/referring" in h]  # the most frequent task
    assert len(refer) >= 3 and refer[-1] < 0.8 * refer[0], refer
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12 and {"loss", "lr", "loss_mask", "loss_dice"} <= set(json.loads(lines[-1]))
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000006", "step_00000012"]
    assert list((run / "tb").glob("events.*"))
    # resume continues from the last step; eval reads the checkpoint through main_eval
    cfg.update(max_steps=13, resume=True)
    assert [h["step"] for h in main_train([f"{k}={json.dumps(v)}" for k, v in cfg.items()])] == [13]
    res = main_eval(["--model", "psalm-tiny", "--checkpoint", str(run / "checkpoints"), "--data", json.dumps(data[0]),
                     "--max-batches", "1"])
    assert "panoptic/coco_panoptic0/PQ" in res and "panoptic/coco_panoptic0/AP" in res  # seg_task: panoptic


def test_psalm_eval_end_to_end(shapes, capsys):
    _, data = shapes
    built = build_psalm(dict(model="psalm-tiny", data=data), eval_mode=True)
    res = evaluate_psalm(built["model"], built["dataset"], built["collator"], batch_size=3)
    for key in ("panoptic/coco_panoptic0/PQ", "panoptic/coco_panoptic0/PQ_th", "panoptic/coco_panoptic0/mIoU",
                "referring/refcoco1/cIoU", "referring/refcoco1/gIoU", "region/coco_interactive2/mIoU",
                "region/coco_interactive2/mIoU_box"):
        assert 0.0 <= res[key] <= 1.0, key
    assert res["panoptic/coco_panoptic0/n"] == 2
    assert "cIoU" in capsys.readouterr().out and "metric" in format_table(res)


def test_defaults_are_psalms():
    d = PSALM_DEFAULTS
    assert (d["lr"], d["batch_size"], d["accumulation"], d["epochs"], d["weight_decay"]) == (6e-5, 2, 2, 10, 0.0)
    assert d["precision"] == "auto" and d["warmup_ratio"] == 0.03 and d["schedule"] == "cosine"
    with pytest.raises(ConfigError, match="unknown PSALM recipe key"):
        build_psalm({"lrr": 1})


def test_cli_trains_psalm_like_any_recipe(shapes, tmp_path):
    """`maskloop train` reads a `recipe: psalm` config with its typed `psalm:` section (no separate loop)."""
    import yaml

    from maskloop.cli import main

    _, data = shapes
    cfg = tmp_path / "psalm.yaml"
    cfg.write_text(yaml.safe_dump({
        "recipe": "psalm", "model": "psalm-tiny", "steps": 2, "batch_size": 2, "accumulation": 1, "num_workers": 0,
        "warmup_ratio": 0.0, "progress": False, "ckpt_every": 2, "run_dir": str(tmp_path / "run"),
        "psalm": {"data": data[:1], "num_points": 64}}))
    assert main(["train", "--config", str(cfg), "--set", "lr=1e-3"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("loss/panoptic" in r for r in rows)
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()
    assert main(["train", "--config", str(cfg), "--set", "psalm.epochs=0"]) == 2  # checked like any section

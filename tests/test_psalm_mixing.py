"""PSALM's task mixing as its train.py builds it, and the recipe switches around it.

PSALM (zamling/PSALM, commit d5dbfda): psalm/train/train.py L333-L352 (make_unify_datamodule: the
``data_ratio`` 'a||b||c||d' repeats of panoptic || refcoco || region || mm_conv, then
``UnifyDatasetSingleDatasetForBatch(datasets, data_ratio, 16)``), L78 / L366 (``--seg_task`` ->
MASK_FORMER.SEG_TASK); psalm/train/train_datasets.py L721-L795 (UnifyDatasetSingleDatasetForBatch:
``cur_dataset_index`` advances round-robin after ``bs`` samples, ``idx % len(dataset)``);
psalm/model/language_model/llava_phi.py L268-L300 (SEG_TASK only sets the inference flags).
"""

from __future__ import annotations

import pytest
import torch

from maskloop.config import ConfigError, PsalmConfig
from maskloop.data.fixtures import write_shapes_psalm
from maskloop.data.psalm import SourceBatchSampler
from maskloop.recipes.psalm import build_psalm, train_psalm


def _psalm_unify_sources(sizes, n_samples, switch):
    """PSALM's UnifyDatasetSingleDatasetForBatch.__getitem__ walk: the sub-dataset of each sample."""
    cur, cnt, out = 0, 0, []
    for _ in range(n_samples):
        out.append(cur)
        cnt += 1
        if cnt == switch:
            cnt, cur = 0, (cur + 1) % len(sizes)
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_task_switch_takes_turns_like_psalm(world):
    sizes, bs, switch = [10, 6, 8], 2, 4
    offsets = [0, 10, 16]
    per_rank = []
    for rank in range(world):
        s = SourceBatchSampler(sizes, bs, seed=3, num_replicas=world, rank=rank, task_switch=switch)
        batches = list(s)
        assert len(batches) == len(s) == sum(n // bs for n in sizes) // world
        src = [max(i for i, o in enumerate(offsets) if b[0] >= o) for b in batches]
        for b, i in zip(batches, src):  # one source per batch
            assert all(offsets[i] <= x < offsets[i] + sizes[i] for x in b)
        # each rank walks the sources as PSALM's dataset does in each process
        assert src == _psalm_unify_sources(sizes, len(batches) * bs, switch)[::bs]
        per_rank.append(batches)
    if world == 2:  # within a turn the ranks read different samples
        a, b = per_rank[0][0] + per_rank[0][1], per_rank[1][0] + per_rank[1][1]
        assert not set(a) & set(b)
    # every sample of a source is read before any repeats (indices cycle like idx % len)
    first = [x for bt in per_rank[0] for x in bt if x < 10]  # fewer than 10 in one epoch here
    assert len(set(first)) == len(first)
    with pytest.raises(ValueError, match="multiple of batch_size"):
        SourceBatchSampler(sizes, 4, task_switch=6)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    p = write_shapes_psalm(tmp_path_factory.mktemp("mix") / "data", n=2)
    return [
        {"kind": "coco_panoptic", "root": str(p["coco_root"]), "split": "train2017"},
        {"kind": "refcoco", "root": str(p["refer_root"])},
        {"kind": "coco_interactive", "json_path": str(p["interactive_json"]), "image_dir": str(p["images"]),
         "prompt_type": "box"},
    ]


def test_data_ratio_sets_repeats_by_task(shapes):
    built = build_psalm({"model": "psalm-tiny", "data": shapes, "data_ratio": "2||1||3||0"})
    assert built["dataset"].repeats == [2, 1, 3]
    with pytest.raises(ConfigError, match="mm_conv"):
        build_psalm({"model": "psalm-tiny", "data": shapes, "data_ratio": "1||1||1||1"})
    with pytest.raises(ConfigError, match="a\\|\\|b\\|\\|c\\|\\|d"):
        build_psalm({"model": "psalm-tiny", "data": shapes, "data_ratio": "1,1,1"})
    with pytest.raises(ConfigError, match="give one"):
        build_psalm({"model": "psalm-tiny", "data": [{**shapes[0], "repeat": 2}], "data_ratio": "1||0||0||0"})
    with pytest.raises(ConfigError, match="seg_task"):
        PsalmConfig(seg_task="detection")
    assert PsalmConfig(seg_task="referring+region").seg_task == "referring+region"


def test_recipe_trains_in_psalms_turns(shapes, tmp_path):
    """task_switch through the Trainer: steps come from the sources in turn, task_switch / batch each."""
    torch.set_num_threads(1)
    cfg = dict(model="psalm-tiny", data=shapes, data_ratio="1||1||1||0", task_switch=4, max_steps=6, batch_size=2,
               accumulation=1, lr=1e-3, warmup_ratio=0.0, num_workers=0, num_points=32,
               run_dir=str(tmp_path / "run"), progress=False, ckpt_every=100, seed=0)
    hist = train_psalm(cfg)
    tasks = [next(k for k in h if k.startswith("loss/"))[5:] for h in hist]
    assert tasks == ["panoptic", "panoptic", "referring", "referring", "region", "region"], tasks


def _panoptic_case():
    """16x16: two thing instances of class 0 and the class-1 stuff around them; four queries, q0/q1 the
    things, q2 the stuff, q3 no object -- a perfect prediction."""
    from maskloop.model.psalm.model import PSALMOutput

    pan = torch.full((16, 16), 2)
    pan[2:6, 2:6], pan[10:14, 2:6] = 1, 3
    segs = [{"id": 1, "category_id": 0, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 0},
            {"id": 3, "category_id": 0, "iscrowd": 0}]
    sem = torch.where(pan == 2, 1, 0)
    masks = torch.stack([(pan == i).float() * 20 - 10 for i in (1, 3, 2)] + [torch.full((16, 16), -10.0)])
    cls = torch.tensor([[10.0, 0, 0], [10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    out = PSALMOutput([masks[None]], [cls[None]], None, [torch.zeros(1, 4)], None, None, None)
    meta = {"semantic_map": sem, "class_names": ["box", "ground"], "isthing": [True, False], "panoptic_map": pan,
            "segments": segs}
    return out, meta


@pytest.mark.parametrize("seg_task,want", [("panoptic", {"PQ", "mIoU", "AP"}), ("semantic", {"mIoU"}),
                                           ("instance", {"AP"}), ("instance+semantic", {"AP", "mIoU"})])
def test_seg_task_picks_the_panoptic_data_inferences(seg_task, want):
    """PSALM's SEG_TASK flags (llava_phi.py L268-L300): which inferences run on COCO panoptic data."""
    from maskloop.eval.psalm_eval import _Task

    out, meta = _panoptic_case()
    t = _Task("panoptic", seg_task)
    t.add(out, 0, meta, {})
    r = t.compute()
    assert {k for k in ("PQ", "mIoU", "AP") if k in r} == want, r
    for k in want:  # the perfect prediction scores 1 on each
        assert r[k] == pytest.approx(1.0), (k, r)
    with pytest.raises(ValueError, match="seg_task"):
        _Task("panoptic", "detection")


def test_psalm_layout_switches_train_and_evaluate(shapes, tmp_path):
    """model_overrides {class_name_tokens: span, no_object: background} (PSALM's class-name layout) through
    the recipe and the evaluation."""
    from maskloop.eval.psalm_eval import evaluate_psalm

    torch.set_num_threads(1)
    over = {"class_name_tokens": "span", "no_object": "background"}
    cfg = dict(model="psalm-tiny", data=shapes[:1], model_overrides=over, max_steps=3, batch_size=2,
               accumulation=1, lr=1e-3, warmup_ratio=0.0, num_workers=0, num_points=32,
               run_dir=str(tmp_path / "run"), progress=False, ckpt_every=100, seed=0)
    hist = train_psalm(cfg)
    assert len(hist) == 3 and all(h["loss"] == h["loss"] for h in hist)
    built = build_psalm({"model": "psalm-tiny", "data": shapes[:1], "model_overrides": over}, eval_mode=True)
    res = evaluate_psalm(built["model"], built["dataset"], built["collator"], max_batches=1, print_table=False,
                         seg_task="panoptic")
    assert {"panoptic/coco_panoptic0/PQ", "panoptic/coco_panoptic0/AP", "panoptic/coco_panoptic0/mIoU"} <= set(res)


# PSALM trains with both (zamling/PSALM, commit d5dbfda): psalm/train/train_datasets.py L67 / L276 / L397
#   (coco_class_name + ['background'], the last class the no-object target), psalm/model/language_model/
#   llava_phi.py L552-L574 (each class name's tokens + [SEG], hidden states pooled over the span)
def test_psalm_checkpoint_brings_psalms_class_name_inputs(shapes, monkeypatch):
    """Given psalm_checkpoint, the class-name switches default to PSALM's (the checkpoint was trained on
    them); an explicit model_overrides value wins."""
    import maskloop.model.psalm.checkpoints as ck

    loaded = []
    monkeypatch.setattr(ck, "load_pretrained_parts", lambda model, **kw: loaded.append(kw["psalm_checkpoint"]))
    built = build_psalm({"model": "psalm-tiny", "data": shapes[:1], "psalm_checkpoint": "psalm.bin"}, eval_mode=True)
    assert loaded == ["psalm.bin"]
    assert (built["model"].config.no_object, built["model"].config.class_name_tokens) == ("background", "span")
    built = build_psalm({"model": "psalm-tiny", "data": shapes[:1], "psalm_checkpoint": "psalm.bin",
                         "model_overrides": {"no_object": "embed"}}, eval_mode=True)
    assert (built["model"].config.no_object, built["model"].config.class_name_tokens) == ("embed", "span")
    built = build_psalm({"model": "psalm-tiny", "data": shapes[:1]}, eval_mode=True)  # from scratch: maskloop's
    assert (built["model"].config.no_object, built["model"].config.class_name_tokens) == ("embed", "token")

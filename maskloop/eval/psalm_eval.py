"""Evaluate a PSALM model over PSALM datasets: PQ / mIoU / mask AP / cIoU-gIoU / region mIoU.

:func:`evaluate_psalm` runs the model over a dataset (or a :class:`PSALMMixture` of several),
batched per task by :class:`~maskloop.data.psalm.PSALMCollator`, post-processes every sample
with :mod:`maskloop.model.psalm.postprocess` at the ground truth's resolution (the readers'
``mask_size``), and feeds the metric classes of :mod:`maskloop.eval.psalm_metrics`:

=============  =========================================================================
task           metrics (keys ``{task}/{dataset}/{name}``, fractions in [0, 1])
=============  =========================================================================
panoptic       PQ, SQ, RQ, PQ_th, PQ_st (panopticapi rules), mIoU of the semantic
               inference of the same outputs against ``semantic_map`` and, under
               ``seg_task: panoptic`` (PSALM's default) or ``instance``, mask AP of the instance
               inference against the thing segments (PSALM's SEG_TASK flags pick which)
semantic       mIoU, pixel_acc
instance       AP, AP50, AP75, APs, APm, APl (COCO mask AP; crowd regions as crowd)
referring      cIoU, gIoU
region         mIoU (over regions), also per prompt type ``mIoU_<type>``
=============  =========================================================================

Every key also gets ``.../n`` (samples evaluated).  Scoring is at the **original image size**
(``original_size=True``, the default, as Mask2Former's and PSALM's evaluations do): for the run, the
readers' :class:`~maskloop.data.psalm.PSALMTransform` keeps masks and id maps at each image's own size
(RefCOCO readers get the eval transform's ``gt_mask``), the model still sees its S x S inputs, and the
post-processing resizes the predictions to the ground truth; so COCO's area ranges (APs < 32², APl >
96²) apply to original pixels and no small object is lost to a resize.  mIoU averages the classes that
have ground-truth pixels (detectron2's ``SemSegEvaluator``).  Unreadable samples are skipped and counted
(``eval/n_scored``, ``eval/n_skipped``, ``eval/skipped/<reason>``), never replaced.
:func:`format_table` renders the dict.
Command line: :func:`main_eval` (``maskloop eval psalm ...`` once the CLI wires it).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from contextlib import contextmanager, nullcontext

import torch

from maskloop.data.psalm import PSALMCollator, group_to
from maskloop.eval.psalm_metrics import PQAccumulator, SemanticConfusion, instance_ap, refer_iou, region_miou
from maskloop.model.psalm.postprocess import (
    instance_inference,
    panoptic_inference,
    referring_inference,
    region_inference,
    semantic_inference,
)

__all__ = ["evaluate_psalm", "format_table", "main_eval"]


class _Task:
    """Accumulates one (task, dataset) pair."""

    def __init__(self, task: str, seg_task: str | None = None):
        self.task, self.n = task, 0
        # PSALM's SEG_TASK inference flags on panoptic data (semantic_on / instance_on / panoptic_on)
        self.panoptic_tasks = _panoptic_family(seg_task) if task == "panoptic" else ()
        self.pq: PQAccumulator | None = None
        self.conf: SemanticConfusion | None = None
        self.gts, self.preds, self.pred_masks, self.gt_masks = [], [], [], []
        self.region_by_type: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))

    def add(self, out, b: int, meta: dict, post: dict) -> None:
        task, self.n = self.task, self.n + 1
        masks = out.pred_masks[-1][b].float()
        if task in ("panoptic", "semantic"):
            size = tuple(meta["semantic_map"].shape[-2:])
            cls = out.class_logits[-1][b].float()
            K = len(meta["class_names"])
            if task == "semantic" or "semantic" in self.panoptic_tasks:
                if self.conf is None:
                    self.conf = SemanticConfusion(K, ignore_index=255)
                sem = semantic_inference(cls[:, list(range(K)) + [-1]], masks, size=size).argmax(0)
                self.conf.add(sem.cpu(), meta["semantic_map"])
            if "instance" in self.panoptic_tasks:  # thing segments of the panoptic ground truth; crowd as crowd
                self._add_instance_from_panoptic(cls[:, list(range(K)) + [-1]], masks, meta, size, post)
            if "panoptic" in self.panoptic_tasks:
                if self.pq is None:
                    self.pq = PQAccumulator(dict(enumerate(meta["isthing"])))
                pan, segs = panoptic_inference(cls[:, list(range(K)) + [-1]], masks, meta["isthing"], size=size,
                                               **post.get("panoptic", {}))
                self.pq.add(pan.cpu(), segs, meta["panoptic_map"], meta["segments"])
        elif task == "instance":
            gm, gl = meta["masks"], meta["labels"]
            size = tuple(gm.shape[-2:])
            crowd = meta.get("crowd_masks", torch.zeros(0, *size))
            self.gts.append({"masks": torch.cat([gm, crowd]).bool(),
                             "labels": torch.cat([gl, meta.get("crowd_labels", torch.zeros(0, dtype=torch.long))]),
                             "iscrowd": torch.cat([torch.zeros(len(gm)), torch.ones(len(crowd))]).long()})
            res = instance_inference(out.class_logits[-1][b], masks, size=size, **post.get("instance", {}))
            self.preds.append({k: res[k].cpu() for k in ("masks", "labels", "scores")})
        elif task == "referring":
            gt = meta["masks"][0]
            self.pred_masks.append(referring_inference(masks, out.seg_logits[-1][b], out.class_logits[-1][b],
                                                       size=tuple(gt.shape[-2:]),
                                                       **post.get("referring", {})).cpu())
            self.gt_masks.append(gt.bool())
        elif task in ("region", "cross_image"):
            gt = meta["masks"]
            pred = region_inference(out.region_logits[-1][b], masks, len(gt), size=tuple(gt.shape[-2:])).cpu()
            p, g = self.region_by_type[meta.get("prompt_type", "all")]
            p.extend(pred)
            g.extend(gt.bool())
        else:
            raise ValueError(f"no metric for task {task!r}")

    def _add_instance_from_panoptic(self, cls, masks, meta, size, post) -> None:
        isthing, pan = meta["isthing"], meta["panoptic_map"]
        segs = [sg for sg in meta["segments"] if isthing[sg["category_id"]]]
        gm = torch.stack([pan == sg["id"] for sg in segs]) if segs else torch.zeros(0, *size, dtype=torch.bool)
        self.gts.append({"masks": gm.bool(), "labels": torch.tensor([sg["category_id"] for sg in segs], dtype=torch.long),
                         "iscrowd": torch.tensor([int(sg["iscrowd"]) for sg in segs], dtype=torch.long)})
        res = instance_inference(cls, masks, isthing=isthing, size=size, **post.get("instance", {}))
        self.preds.append({k: res[k].cpu() for k in ("masks", "labels", "scores")})

    def compute(self) -> dict:
        r: dict = {"n": self.n}
        if self.pq is not None:
            pq = self.pq.compute()
            r.update(PQ=pq["All"]["pq"], SQ=pq["All"]["sq"], RQ=pq["All"]["rq"], PQ_th=pq["Things"]["pq"],
                     PQ_st=pq["Stuff"]["pq"])
        if self.conf is not None:
            c = self.conf.compute()
            r["mIoU"] = c["miou"]
            if self.task == "semantic":
                r["pixel_acc"] = c["pixel_acc"]
        if self.task == "instance" or (self.task == "panoptic" and self.gts):
            r.update(instance_ap(self.gts, self.preds))
        if self.task == "referring":
            iou = refer_iou(self.pred_masks, self.gt_masks)
            r.update(cIoU=iou["ciou"], gIoU=iou["giou"])
        if self.region_by_type:
            allp = [m for p, _ in self.region_by_type.values() for m in p]
            allg = [m for _, g in self.region_by_type.values() for m in g]
            r["mIoU"] = region_miou(allp, allg)
            r["regions"] = len(allp)
            for t, (p, g) in sorted(self.region_by_type.items()):
                r[f"mIoU_{t}"] = region_miou(p, g)
        return r


def _readers(ds):
    """Every dataset object reachable from ``ds`` (through ConcatDataset / Subset / views)."""
    seen, todo = [], [ds]
    while todo:
        d = todo.pop()
        if any(d is x for x in seen):
            continue
        seen.append(d)
        todo += list(getattr(d, "datasets", []) or []) + list(getattr(d, "sources", []) or [])
        if getattr(d, "dataset", None) is not None:
            todo.append(d.dataset)
    return seen


@contextmanager
def original_size_targets(dataset, collator=None):
    """For the block: targets at each image's original size (see the module docstring); restored after.
    The collator resizes the region prompts back to the readers' mask size, so the model's inputs do
    not change."""
    from maskloop.data.psalm import PSALMTransform
    from maskloop.data.transforms import SampleTransform
    from maskloop.eval.data import EvalTransform

    undo = []
    for d in _readers(dataset):
        t = getattr(d, "transform", None)
        if isinstance(t, PSALMTransform) and not t.original:
            t.original = True
            undo.append(lambda t=t: setattr(t, "original", False))
            if collator is not None and getattr(collator, "region_size", 0) is None:
                collator.region_size = t.mask_size
                undo.append(lambda: setattr(collator, "region_size", None))
        elif isinstance(t, SampleTransform) and not isinstance(t, EvalTransform):
            d.transform = EvalTransform(t.image_size, t.sam_size, t.prompt_grid, draft=t.draft)
            undo.append(lambda d=d, t=t: setattr(d, "transform", t))
    try:
        yield
    finally:
        for u in undo:
            u()


@torch.no_grad()
def evaluate_psalm(
    model,
    dataset,
    collator: PSALMCollator,
    batch_size: int = 2,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    precision: str = "auto",
    max_batches: int | None = None,
    postprocess: dict | None = None,
    print_table: bool = True,
    progress: bool = False,
    original_size: bool = True,
    seg_task: str | None = None,
) -> dict:
    """Run ``model`` over ``dataset``; returns ``{"{task}/{dataset}/{metric}": value}`` plus
    ``eval/n_scored``, ``eval/n_skipped`` and ``eval/skipped/<reason>``.

    ``seg_task``: PSALM's ``--seg_task`` (the recipe's ``psalm.seg_task``), which picks the inferences
    run on COCO panoptic data as PSALM's flags do: ``panoptic`` -> PQ + semantic mIoU + instance AP (of the
    thing segments), ``semantic`` -> mIoU, ``instance`` -> AP, ``+``-joined to combine. None: PQ + mIoU.
    Other tasks' data get their own metrics whatever it says.

    ``original_size``: score at each image's own size (default; False: at the readers' ``mask_size``).

    ``postprocess``: per-task keyword overrides, e.g. ``{"panoptic": {"object_mask_threshold":
    0.5}, "instance": {"topk": 50}, "referring": {"by": "class"}}``.
    """
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else next(model.parameters()).device
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    was_training = model.training
    model.eval()
    from maskloop.eval.data import EvalSplit, SkippingCollate

    loader = torch.utils.data.DataLoader(EvalSplit(dataset), batch_size=batch_size, shuffle=False,
                                         collate_fn=SkippingCollate(collator), num_workers=num_workers)
    _panoptic_family(seg_task)  # an unknown name fails before the run
    acc: dict[tuple[str, str], _Task] = {}
    post = postprocess or {}
    skipped: Counter = Counter()
    n_scored = 0
    with original_size_targets(dataset, collator) if original_size else nullcontext():
        for i, batch in enumerate(tqdm(loader, desc="psalm eval", disable=not progress, dynamic_ncols=True)):
            if max_batches is not None and i >= max_batches:
                break
            skipped.update(batch["eval_skipped"])
            n_scored += batch["eval_n"]
            _run_batch(model, batch, acc, post, device, autocast, seg_task)
    if was_training:
        model.train()
    results = {}
    for (task, name), a in sorted(acc.items()):
        for k, v in a.compute().items():
            results[f"{task}/{name}/{k}"] = v
    results["eval/n_scored"], results["eval/n_skipped"] = n_scored, int(sum(skipped.values()))
    for reason, n in sorted(skipped.items()):
        results[f"eval/skipped/{reason}"] = n
    if print_table:
        print(format_table(results))
    return results


def _panoptic_family(seg_task: str | None) -> tuple[str, ...]:
    """The panoptic / semantic / instance inferences ``seg_task`` switches on for panoptic data."""
    if seg_task is None:
        return ("semantic", "panoptic")
    from maskloop.model.psalm.model import seg_task_tasks

    tasks = tuple(t for t in seg_task_tasks(seg_task) if t in ("semantic", "instance", "panoptic"))
    return tasks


def _run_batch(model, batch, acc, post, device, autocast, seg_task=None) -> None:
    """One collated batch: the model per task group, each sample into its (task, dataset) accumulator."""
    for g in batch.get("groups", []):
        g = group_to(g, device)
        with autocast:
            out = model(g["task"], **g["inputs"])
        for b, meta in enumerate(g["meta"]):
            key = (g["task"], str(meta.get("dataset") or "data"))
            acc.setdefault(key, _Task(g["task"], seg_task)).add(out, b, meta, post)


def format_table(results: dict) -> str:
    """A plain-text table: task | dataset | metric | value (fractions shown as %)."""
    rows = [(k.split("/", 2) + ["", ""])[:3] + [v] for k, v in results.items()]
    head = ("task", "dataset", "metric", "value")
    cells = [head] + [(t, d, m, (f"{100 * v:.2f}" if m not in ("n", "regions") and isinstance(v, float)
                                 else str(v))) for t, d, m, v in rows]
    w = [max(len(str(r[i])) for r in cells) for i in range(4)]
    lines = [" | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) for r in cells]
    lines.insert(1, "-+-".join("-" * x for x in w))
    return "\n".join(lines)


def main_eval(argv: list[str] | None = None) -> dict:
    """``python -m maskloop.eval.psalm_eval --model psalm-tiny --checkpoint RUN_DIR --data '{...}'``.

    ``--data`` (repeatable) takes a JSON source spec as in the training recipe, e.g.
    ``'{"kind": "coco_panoptic", "root": "/data/coco", "split": "val2017"}'``; ``--config`` a
    JSON/YAML file with the recipe's keys (its ``eval_data`` or ``data`` list is used).
    """
    from maskloop.recipes.psalm import PSALM_DEFAULTS, build_psalm, load_config_file, load_trained

    p = argparse.ArgumentParser(prog="maskloop eval psalm", description=main_eval.__doc__.split("\n")[0])
    p.add_argument("--config", help="JSON / YAML file with the recipe's keys")
    p.add_argument("--model", help=f"preset name (default {PSALM_DEFAULTS['model']})")
    p.add_argument("--checkpoint", help="run directory or step_XXXXXXXX directory written by the recipe")
    p.add_argument("--data", action="append", default=[], help="JSON source spec (repeatable)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--image-size", type=int)
    p.add_argument("--mask-size", type=int)
    p.add_argument("--device")
    p.add_argument("--max-batches", type=int)
    p.add_argument("--seg-task", help="PSALM's --seg_task: the inferences on panoptic data (default: the config's "
                   "psalm.seg_task, panoptic = PQ + mIoU + AP)")
    p.add_argument("--out", help="write the metrics as JSON here")
    a = p.parse_args(argv)
    cfg = load_config_file(a.config) if a.config else {}
    if a.data:
        cfg["data"] = [json.loads(d) for d in a.data]
    elif cfg.get("eval_data"):
        cfg["data"] = cfg["eval_data"]
    for k, v in (("model", a.model), ("image_size", a.image_size), ("mask_size", a.mask_size),
                 ("seg_task", a.seg_task)):
        if v is not None:
            cfg[k] = v
    if not cfg.get("data"):
        p.error("no data: pass --data '{\"kind\": ..., ...}' or a --config with data / eval_data")
    cfg.pop("eval_data", None)
    built = build_psalm(cfg, eval_mode=True)
    model = built["model"]
    if a.checkpoint:
        load_trained(model, a.checkpoint)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    results = evaluate_psalm(model, built["dataset"], built["collator"], batch_size=a.batch_size, device=device,
                             num_workers=a.num_workers, max_batches=a.max_batches,
                             seg_task=built["config"].psalm.seg_task)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main_eval()

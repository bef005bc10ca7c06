"""The evaluation suite behind ``maskloop eval``: data set-up, the runs, the paper-layout table.

    refer, regions = eval_datasets(model, refcoco="/data/refer", refcoco_datasets=["refcoco", "refcocog"])
    res = run_eval(model, refer, regions, batch_size=8)
    print(format_table(res))

``res`` is ``{"refer": {split: metrics}, "caption": {name: metrics}, "cycle": {name: metrics},
"counts": {section/split: {"n_scored", "n_skipped"}}}``; every metrics dict carries ``n_scored``,
``n_skipped`` and ``skipped`` (per reason).  Referring splits are named ``{dataset}_{split}``
(``refcoco_val``, ``refcoco+_testA``, ``refcocog_test``); the table prints them in the layout of
the Sa2VA / LISA papers' table: refcoco and refcoco+ val testA testB, refcocog (umd) val test,
rows cIoU and gIoU in percent, then the no-``[SEG]`` rate and the counts.
"""

from __future__ import annotations

import math
from pathlib import Path

#: The papers' referring columns, in order: (dataset, split).
PAPER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("refcoco", "val"), ("refcoco", "testA"), ("refcoco", "testB"),
    ("refcoco+", "val"), ("refcoco+", "testA"), ("refcoco+", "testB"),
    ("refcocog", "val"), ("refcocog", "test"),
)
DEFAULT_SPLITS = {"refcoco": ("val", "testA", "testB"), "refcoco+": ("val", "testA", "testB"),
                  "refcocog": ("val", "test")}


def eval_datasets(model, refcoco: str | Path | None = None, refcoco_datasets=("refcoco",), splits=None,
                  image_dir: str | Path | None = None, dam: str | Path | None = None, dam_splits=None,
                  shapes: int = 0) -> tuple[dict, dict]:
    """({split: refer dataset}, {name: region-caption dataset}) built with the eval transform
    (original-size ground truth).  With no data given, ``shapes`` (default 200) held-out shapes scenes.

    ``splits``: RefCOCO splits for every dataset (default per dataset: val testA testB; refcocog val test).
    """
    from maskloop.eval.data import eval_transform

    tf = eval_transform(model.cfg)
    refer, regions = {}, {}
    if refcoco:
        from maskloop.data.sources.refcoco import RefCOCODataset

        root = Path(refcoco)
        if not root.exists():
            raise FileNotFoundError(f"RefCOCO root not found: {root}")
        for name in refcoco_datasets:
            for split in (splits or DEFAULT_SPLITS[name]):
                refer[f"{name}_{split}"] = RefCOCODataset(root, dataset=name, split=split, transform=tf,
                                                          image_dir=image_dir)
    if dam:
        from maskloop.data.sources.dam import DAMDataset

        if not Path(dam).exists():
            raise FileNotFoundError(f"DAM root not found: {dam}")
        regions["dam"] = DAMDataset(dam, splits=dam_splits, transform=tf)
    if shapes or not (refer or regions):
        from maskloop.data.sources.shapes import ShapesReferDataset, ShapesRegionCaptionDataset

        n = shapes or 200
        refer["shapes_val"] = ShapesReferDataset(n, seed="val", transform=tf)
        regions["shapes_val"] = ShapesRegionCaptionDataset(n, seed="val", transform=tf)
    return refer, regions


def run_eval(model, refer: dict, regions: dict, batch_size: int = 16, max_samples: int | None = None,
             max_new_tokens: int = 32, cycle: bool = True, progress: bool = True, protocol: str = "generate",
             no_seg: str = "sa2va", num_workers: int = 0) -> dict:
    """Referring cIoU/gIoU per split (Sa2VA's protocol by default); caption metrics and cycle IoU per
    region set.  Samples that cannot be read are skipped and counted, never replaced."""
    from maskloop.eval.caption import evaluate_captions
    from maskloop.eval.cycle import evaluate_cycle
    from maskloop.eval.refer import evaluate_refer

    out: dict = {"refer": evaluate_refer(model, refer, batch_size, max_samples, progress, num_workers,
                                         protocol=protocol, max_new_tokens=max_new_tokens, no_seg=no_seg)
                 if refer else {}}
    out["caption"], out["cycle"] = {}, {}
    for name, ds in regions.items():
        if cycle:
            r = evaluate_cycle(model, ds, batch_size, max_new_tokens, max_samples, progress=progress,
                               num_workers=num_workers)
            out["cycle"][name], out["caption"][name] = r["cycle"], r["caption"]
        else:
            out["caption"][name] = evaluate_captions(model, ds, batch_size, max_new_tokens, max_samples, progress,
                                                     num_workers)
    out["counts"] = {f"{section}/{split}": {"n_scored": m.get("n_scored", m.get("n")), "n_skipped": m.get("n_skipped", 0)}
                     for section in ("refer", "caption", "cycle") for split, m in out[section].items()}
    return out


def _pct(v) -> str:
    if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}"


def _grid(header: list[list[str]], rows: list[list[str]]) -> list[str]:
    cells = header + rows
    w = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)) for r in cells]


def refer_table(refer: dict) -> str:
    """The referring results in the papers' layout (cIoU / gIoU in %), other splits in a second block."""
    lines: list[str] = []
    protocol = next((m.get("protocol") for m in refer.values() if m.get("protocol")), None)
    title = "Referring segmentation" + (f" (protocol: {protocol})" if protocol else "")
    paper = [f"{d}_{s}" for d, s in PAPER_COLUMNS]
    others = [k for k in refer if k not in paper]
    blocks = [paper] + ([others] if others else [])  # the papers' columns always ('-' where not run)
    lines.append(title)
    for cols in blocks:
        if cols is paper:
            top = ["", "refcoco", "", "", "refcoco+", "", "", "refcocog (umd)", ""]
            sub = ["", *[s for _, s in PAPER_COLUMNS]]
        else:
            top, sub = ["", *cols], ["", *["" for _ in cols]]
        get = [refer.get(c, {}) for c in cols]
        rows = [["cIoU", *[_pct(m.get("cIoU")) for m in get]],
                ["gIoU", *[_pct(m.get("gIoU")) for m in get]],
                ["no-[SEG] %", *[_pct(m.get("no_seg_frac")) for m in get]],
                ["n_scored", *[str(m["n_scored"]) if "n_scored" in m else "-" for m in get]],
                ["n_skipped", *[str(m["n_skipped"]) if "n_skipped" in m else "-" for m in get]]]
        header = [top, sub] if cols is paper else [top]
        lines += _grid(header, rows)
    return "\n".join(lines)


def format_table(results: dict) -> str:
    """The whole result dict as text: the referring table, then caption and cycle metrics per set."""
    keys = {"cycle": ("cycle_mIoU", "cycle_cIoU", "empty_reseg_frac", "n_scored", "n_skipped"),
            "caption": ("CIDEr", "BLEU-4", "METEOR", "METEOR-nosyn", "ROUGE-L", "n_scored", "n_skipped")}
    lines = [refer_table(results.get("refer") or {})]
    for section in ("caption", "cycle"):
        for split, m in (results.get(section) or {}).items():
            cols = [k for k in keys[section] if k in m]
            vals = "  ".join(f"{k}={_fmt(m[k])}" for k in cols)
            lines.append(f"{section:<8} {split:<22} {vals}")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return str(v)


__all__ = ["DEFAULT_SPLITS", "PAPER_COLUMNS", "eval_datasets", "format_table", "refer_table", "run_eval"]

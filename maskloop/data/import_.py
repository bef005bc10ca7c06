"""``maskloop data import --from coco|folder|sa2va SRC --out DIR``: own data -> one layout.

The output is the ``coco`` kind's layout (:mod:`maskloop.data.sources.own_coco`), the one a
training config then names::

    {out}/annotations.json     # COCO instances: images, annotations, categories;
                               # each annotation: compressed-RLE "segmentation", "area", "bbox",
                               # "iscrowd": 0, and "expressions" (list) / "caption" when known
    {out}/images/<file name>   # the source image files, copied byte for byte

Every region of the source is read once (image decoded, mask decoded at the image's size,
checked non-empty); bad rows are skipped and counted, as in training, and reported at the
end. Reading the output with ``kind: coco`` gives the same samples, in the same order, as
reading the source with its own kind (tested).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from .robust import DataError, SampleError

__all__ = ["import_dataset", "OWN_READERS"]


def _readers() -> dict:
    from .sources.own_coco import OwnCOCODataset
    from .sources.own_folder import OwnFolderDataset
    from .sources.own_sa2va import OwnSa2VADataset

    return {"coco": OwnCOCODataset, "folder": OwnFolderDataset, "sa2va": OwnSa2VADataset}


OWN_READERS = ("coco", "folder", "sa2va")


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_util

    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def import_dataset(kind: str, src: str | Path, out: str | Path, progress: bool = True, overwrite: bool = False,
                   **reader_options) -> dict:
    """Convert own data of ``kind`` at ``src`` into the documented layout at ``out``.

    Returns ``{"out", "images", "annotations", "skipped": {"source/reason": n}, "bad": [(key, reason, detail)]}``.
    """
    from tqdm import tqdm

    if kind not in OWN_READERS:
        raise DataError(f"--from {kind!r}: choose one of {', '.join(OWN_READERS)}")
    out = Path(out)
    if (out / "annotations.json").exists() and not overwrite:
        raise DataError(f"{out}/annotations.json exists: choose an empty --out folder (or pass --overwrite)")
    ds = _readers()[kind](src, mode="masks", **reader_options)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images: list[dict] = []
    anns: list[dict] = []
    cat_ids: dict[str, int] = {}
    image_ids: dict[str, int] = {}  # source path -> output image id
    used_names: set[str] = set()
    for r in tqdm(range(len(ds.regions)), desc=f"import {kind}", unit="region", disable=not progress, file=sys.stderr):
        reg = ds.regions[r]
        if reg.image in ds._bad or reg.key in ds._bad:
            continue
        try:
            _, (w, h), mask = ds.read_region(r)
        except SampleError as e:
            ds.record_bad(e.reason, str(e.key or reg.key), e.detail)
            continue
        if reg.image not in image_ids:
            name = Path(str(reg.meta.get("file_name") or Path(reg.image).name)).as_posix()
            if name in used_names or name.startswith("/") or ".." in Path(name).parts:
                name = f"{len(images):06d}_{Path(reg.image).name}"
            used_names.add(name)
            dst = out / "images" / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(reg.image, dst)
            image_ids[reg.image] = len(images) + 1
            images.append({"id": len(images) + 1, "file_name": name, "height": int(h), "width": int(w)})
        cat = str(reg.meta.get("category") or "object")
        cat_ids.setdefault(cat, len(cat_ids) + 1)
        ann = {"id": len(anns) + 1, "image_id": image_ids[reg.image], "category_id": cat_ids[cat],
               "segmentation": _rle(mask), "area": int(mask.sum()), "bbox": _bbox(mask), "iscrowd": 0}
        if reg.expressions:
            ann["expressions"] = list(reg.expressions)
        if reg.caption:
            ann["caption"] = reg.caption
        anns.append(ann)
    cats = [{"id": i, "name": n} for n, i in cat_ids.items()]
    (out / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return {"out": str(out), "images": len(images), "annotations": len(anns), "skipped": ds.skip_counts(),
            "bad": ds.bad_items()}


def run_import(args) -> int:
    """The CLI verb (``maskloop data import``)."""
    from .check import parse_kind

    try:
        kind, opts = parse_kind(args.source_kind)
    except ValueError as e:
        raise DataError(str(e)) from None
    res = import_dataset(kind, args.src, args.out, progress=not args.no_progress, overwrite=args.overwrite, **opts)
    reasons = Counter(r for _, r, _ in res["bad"])
    print(f"wrote {res['annotations']} regions of {res['images']} images to {res['out']} "
          f"(read it with kind: coco, root: {res['out']})")
    print("skipped: " + (", ".join(f"{r}={n}" for r, n in reasons.most_common()) or "none"))
    for key, reason, detail in res["bad"][:20]:
        print(f"   - [{reason}] {key}" + (f": {detail}" if detail else ""))
    if len(res["bad"]) > 20:
        print(f"   ... {len(res['bad']) - 20} more (maskloop data check --source {kind} {args.src} lists all)")
    return 0 if res["annotations"] else 1

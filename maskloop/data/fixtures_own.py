"""Tiny own-data fixtures in the three accepted layouts (``coco``, ``folder``, ``sa2va``).

Each writer draws synthetic scenes (:func:`maskloop.data.fixtures.synthetic_scene`), writes
them in the layout its reader's docstring gives, and, with ``bad=True``, adds one bad row of
each kind the format can have (a missing image, a broken RLE / polygon / PNG, an empty
mask). It returns a manifest: the good regions ``[(image file, expressions, caption)]`` in
reading order and the expected skip counts ``{reason: n}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .fixtures import _rle, synthetic_scene

__all__ = ["write_own_coco", "write_own_folder", "write_own_sa2va"]


def _texts(shape: dict, i: int, k: int) -> tuple[list[str], str]:
    expr = [f"the {shape['color']} {shape['kind']}"]
    if (i + k) % 2 == 0:
        expr.append(f"{shape['kind']} number {k + 1}")
    return expr, shape["caption"]


def _scenes(n: int, size: tuple[int, int], per_image: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img, shapes = synthetic_scene(rng, size[0], size[1], per_image)
        out.append((img, [s for s in shapes if s["mask"].any()]))
    return out


def write_own_coco(root, num_images: int = 4, size: tuple[int, int] = (48, 64), per_image: int = 2,
                   bad: bool = True, seed: int = 0, polygons_every: int = 2) -> dict:
    """``root/annotations.json`` (COCO instances + expressions/caption) and ``root/images/``.
    Every ``polygons_every``-th annotation is a polygon list, the others compressed RLE."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    h, w = size
    images, anns, good = [], [], []
    for i, (img, shapes) in enumerate(_scenes(num_images, size, per_image, seed)):
        name = f"img_{i:03d}.jpg"
        img.save(root / "images" / name, quality=92)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for k, s in enumerate(shapes):
            exprs, cap = _texts(s, i, k)
            seg = [s["polygon"]] if (len(anns) % polygons_every == 0 and k == 0) else _rle(s["mask"])
            a = {"id": len(anns) + 1, "image_id": i + 1, "category_id": 1 + (s["kind"] == "ellipse"),
                 "segmentation": seg, "iscrowd": 0, "expressions": exprs}
            if k == 0:  # only some regions carry a caption
                a["caption"] = cap
            anns.append(a)
            good.append((name, exprs, cap if k == 0 else None))
    expected = {}
    if bad:
        images.append({"id": 900, "file_name": "not_there.jpg", "height": h, "width": w})
        anns.append({"id": 901, "image_id": 900, "category_id": 1, "segmentation": _rle(np.ones((h, w), bool)),
                     "expressions": ["a ghost"], "caption": "Nothing."})
        anns.append({"id": 902, "image_id": 1, "category_id": 1, "expressions": ["broken"], "caption": "Broken.",
                     "segmentation": {"size": [h, w], "counts": "!!not-an-rle"}})
        anns.append({"id": 903, "image_id": 1, "category_id": 1, "expressions": ["nothing"], "caption": "Empty.",
                     "segmentation": _rle(np.zeros((h, w), bool))})
        expected = {"missing_file": 1, "bad_rle": 1, "empty_mask": 1}
    cats = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}]
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return {"root": str(root), "good": good, "expected_bad": expected}


def write_own_folder(root, num_images: int = 4, size: tuple[int, int] = (48, 64), per_image: int = 2,
                     bad: bool = True, seed: int = 0, style: str = "mixed") -> dict:
    """``root/images/``, ``root/masks/`` (``style``: "ids" = one instance-id PNG per image,
    "pngs" = a folder of binary PNGs, "mixed" = alternate) and ``root/texts.json``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    texts: dict = {}
    good = []
    for i, (img, shapes) in enumerate(_scenes(num_images, size, per_image, seed)):
        stem = f"photo{i:02d}"
        img.save(root / "images" / f"{stem}.png")
        use_ids = style == "ids" or (style == "mixed" and i % 2 == 0)
        entry = {}
        if use_ids:
            ids = np.zeros(size, np.uint8)
            for k, s in enumerate(shapes):
                ids[s["mask"]] = 10 * (k + 1)  # any non-zero values, not only 1..N
            Image.fromarray(ids).save(root / "masks" / f"{stem}.png")
            order = [(str(10 * (k + 1)), k) for k in range(len(shapes))]
        else:
            (root / "masks" / stem).mkdir(exist_ok=True)
            order = []
            for k, s in enumerate(shapes):
                mid = f"obj{k}"
                Image.fromarray(s["mask"].astype(np.uint8) * 255).save(root / "masks" / stem / f"{mid}.png")
                order.append((mid, k))
            order.sort()
        for mid, k in order:
            exprs, cap = _texts(shapes[k], i, k)
            entry[mid] = {"expressions": exprs, "caption": cap}
            good.append((f"{stem}.png", exprs, cap))
        texts[f"{stem}.png" if i % 2 else stem] = entry  # both keyings are accepted
    expected = {}
    if bad:
        # masks without an image
        Image.fromarray(np.full(size, 1, np.uint8)).save(root / "masks" / "lost.png")
        # a corrupt mask PNG (in an image's mask folder) and an empty binary mask
        img, _ = _scenes(1, size, 1, seed + 99)[0]
        img.save(root / "images" / "damaged.png")
        (root / "masks" / "damaged").mkdir()
        (root / "masks" / "damaged" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        Image.fromarray(np.zeros(size, np.uint8)).save(root / "masks" / "damaged" / "b.png")
        expected = {"missing_file": 1, "corrupt_mask": 1, "empty_mask": 1}
    (root / "texts.json").write_text(json.dumps(texts))
    good.sort(key=lambda g: g[0])  # the reader goes through images by name
    return {"root": str(root), "good": good, "expected_bad": expected}


def write_own_sa2va(root, num_images: int = 4, size: tuple[int, int] = (48, 64), per_image: int = 2,
                    bad: bool = True, seed: int = 0) -> dict:
    """Sa2VA's fine-tuning layout: ``root/annotations.json`` (a list of {image, mask, text}) + ``root/images/``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    h, w = size
    items, good = [], []
    for i, (img, shapes) in enumerate(_scenes(num_images, size, per_image, seed)):
        name = f"{i:04d}.jpg"
        img.save(root / "images" / name, quality=92)
        masks, text = [], []
        for s in shapes:
            masks.append([s["polygon"]])  # one polygon per object (a list of polygons in general)
            t = f"The {s['color']} {s['kind']}."  # Sa2VA lower-cases and drops the final '.'
            text.append(t)
            good.append((name, [t.lower()[:-1]], None))
        items.append({"image": name, "mask": masks, "text": text})
    expected = {}
    if bad:
        square = [2.0, 2.0, 20.0, 2.0, 20.0, 20.0, 2.0, 20.0]
        items.append({"image": "missing.jpg", "mask": [[square]], "text": ["a square"]})
        items.append({"image": "0000.jpg", "mask": [[[1.0, 2.0, 3.0]]], "text": ["a broken polygon"]})
        items.append({"image": "0000.jpg", "mask": [[{"size": [h, w], "counts": "}}}garbage"}]], "text": ["broken rle"]})
        items.append({"image": "0000.jpg", "mask": [[]], "text": ["no mask"]})
        items.append({"image": "0000.jpg", "mask": [[square]], "text": ["one", "two"]})
        expected = {"missing_file": 1, "bad_rle": 2, "empty_mask": 1, "bad_json": 1}
    (root / "annotations.json").write_text(json.dumps(items))
    return {"root": str(root), "good": good, "expected_bad": expected}

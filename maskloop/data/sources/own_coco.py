"""Own data as a COCO-format instances JSON (data kind ``coco``).

Layout::

    {root}/annotations.json          # or pass root= the .json file itself (json_path=)
    {root}/images/<file_name>        # or image_dir= (default: images/ beside the json, else the json's folder)

The JSON is the COCO detection format (what CVAT, Label Studio, Roboflow... export)::

    {"images": [{"id": 1, "file_name": "cat.jpg", "height": 480, "width": 640}, ...],
     "annotations": [{"id": 7, "image_id": 1, "category_id": 3,
                      "segmentation": [[x1, y1, x2, y2, ...], ...]      # polygons, or
                                      | {"size": [h, w], "counts": "..."},  # COCO RLE (compressed or list)
                      "expressions": ["the cat on the sofa", ...],    # optional: referring expressions
                      "caption": "A grey cat curled up ..."},         # optional: region caption
                     ...],
     "categories": [{"id": 3, "name": "cat"}, ...]}                    # optional

``expressions`` may also be one string. Crowd annotations (``iscrowd: 1``) are skipped
(they are not one object). ``category_expressions: true`` adds the category name as one
more expression of each annotation. This is also the layout ``maskloop data import``
writes (compressed RLE, images copied under ``images/``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..io import read_json
from ..robust import DataError, SampleError
from ..transforms import SampleTransform
from .own_common import OwnDataset, Region, clean_texts

__all__ = ["OwnCOCODataset"]


def _find_json(root: Path) -> Path:
    if root.is_file():
        return root
    cands = [root / "annotations.json", root / "instances.json"]
    cands += sorted((root / "annotations").glob("*.json")) if (root / "annotations").is_dir() else []
    for c in cands:
        if c.is_file():
            return c
    raise DataError(f"no COCO json under {root}: expected {root}/annotations.json (or pass the .json file as root)")


class OwnCOCODataset(OwnDataset):
    def __init__(self, root: str | os.PathLike, mode: str = "masks", image_dir: str | os.PathLike | None = None,
                 transform: SampleTransform | None = None, as_pair: bool = False,
                 category_expressions: bool = False, max_retries: int = 16, name: str = "coco"):
        super().__init__(mode, transform, as_pair, max_retries, name)
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"COCO json or folder not found: {root}")
        self.json_path = _find_json(root)
        base = self.json_path.parent if self.json_path.parent.name != "annotations" else self.json_path.parent.parent
        if image_dir is None:
            image_dir = base / "images" if (base / "images").is_dir() else base
        self.image_dir = Path(image_dir)
        jkey = self.json_path.name
        try:
            data = read_json(self.json_path)
            images, anns = data["images"], data["annotations"]
            cats = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
        except (SampleError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"cannot use {self.json_path}: {e}; expected a COCO json with images and annotations") from e
        self.categories = cats
        by_id: dict[int, dict] = {}
        for im in images:
            try:
                by_id[int(im["id"])] = {"file_name": str(im["file_name"]), "hw": (int(im["height"]), int(im["width"]))}
            except (KeyError, TypeError, ValueError) as e:
                self.record_bad("bad_json", f"{jkey}#image{im.get('id', '?') if isinstance(im, dict) else '?'}",
                                f"malformed image entry: {e}")
        for a in anns:
            key = f"{jkey}#ann{a.get('id', '?') if isinstance(a, dict) else '?'}"
            try:
                if a.get("iscrowd", 0):
                    continue
                im = by_id[int(a["image_id"])]
                seg = a["segmentation"]
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                self.record_bad("bad_json", key, f"malformed annotation (needs image_id of a listed image and "
                                f"segmentation): {e}")
                continue
            exprs = clean_texts(a.get("expressions"))
            cat = cats.get(a.get("category_id")) if isinstance(a.get("category_id"), int) else None
            if category_expressions and cat and cat not in exprs:
                exprs.append(cat)
            caption = a.get("caption") if isinstance(a.get("caption"), str) and a["caption"].strip() else None
            self.add_region(Region(
                image=str(self.image_dir / im["file_name"]), key=key, mask=("coco", seg), hw=im["hw"],
                expressions=exprs, caption=caption.strip() if caption else None,
                meta={"file_name": im["file_name"], "category": cat}))
        self._finish_index()

"""COCO panoptic reader (panoptic and semantic targets for PSALM): one image = one sample.

Released layout (``panopticapi`` / detectron2), read as is::

    {root}/annotations/panoptic_{split}.json
    {root}/panoptic_{split}/<file_name>.png        # or {root}/annotations/panoptic_{split}/
    {root}/{split}/<image file_name>.jpg           # split e.g. train2017 / val2017

``panoptic_{split}.json``::

    {"images": [{"id", "file_name", "height", "width"}],
     "annotations": [{"image_id", "file_name": "<png>",
                      "segments_info": [{"id", "category_id", "iscrowd", "bbox", "area"}]}],
     "categories": [{"id", "name", "supercategory", "isthing", "color"}]}

Each PNG is an RGB segment-id map: ``id = R + 256 G + 256^2 B``; 0 (and any id not listed
in ``segments_info``) is void. Class indices follow the order of ``categories``.

Targets (see :mod:`maskloop.data.psalm`): ``task="panoptic"`` gives one mask per non-crowd
segment (crowd segments are left out of the targets, as Mask2Former's mapper does, but
kept in ``segments`` for PQ); ``task="semantic"`` gives one mask per category present
(the union of its non-crowd segments). Both carry ``panoptic_map`` / ``segments`` (PQ) and
``semantic_map`` (mIoU; void = 255, crowd pixels keep their category, as detectron2's
``prepare_coco_semantic_annos_from_panoptic_annos`` does).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import open_image, read_json
from ..psalm import PSALMTransform
from ..robust import DataError, RobustDataset, SampleError

__all__ = ["COCOPanopticDataset", "rgb_to_id", "id_to_rgb"]


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int64 segment ids (panopticapi's ``rgb2id``)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8 (panopticapi's ``id2rgb``)."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def read_panoptic_png(path: str) -> np.ndarray:
    """Segment-id map of a panoptic PNG; ``missing_file`` / ``corrupt_mask`` on failure."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise SampleError("missing_file", key=path, detail="panoptic PNG not found") from e
    try:
        with Image.open(io.BytesIO(raw)) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise SampleError("corrupt_mask", key=path, detail=f"cannot decode panoptic PNG: {e}") from e
    return rgb_to_id(arr)


def _first_dir(*cands: Path) -> Path | None:
    return next((c for c in cands if c.is_dir()), None)


class COCOPanopticDataset(RobustDataset):
    """COCO panoptic as PSALM panoptic / semantic samples.

    ``root`` + ``split`` find the released layout; ``json_path`` / ``png_dir`` /
    ``image_dir`` override single paths.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "val2017",
        task: str = "panoptic",
        json_path: str | os.PathLike | None = None,
        png_dir: str | os.PathLike | None = None,
        image_dir: str | os.PathLike | None = None,
        transform: PSALMTransform | None = None,
        max_images: int | None = None,
        max_retries: int = 16,
        name: str = "coco_panoptic",
    ):
        super().__init__(max_retries=max_retries)
        if task not in ("panoptic", "semantic"):
            raise ValueError(f"task must be 'panoptic' or 'semantic', got {task!r}")
        self.name, self.psalm_task = name, task
        self.transform = transform or PSALMTransform()
        r = Path(root) if root is not None else None
        if json_path is None:
            if r is None:
                raise ValueError("COCOPanopticDataset needs root= (the coco folder) or json_path=")
            json_path = r / "annotations" / f"panoptic_{split}.json"
        json_path = Path(json_path)
        if not json_path.is_file():
            raise DataError(f"COCO panoptic json {json_path} not found: expected {{root}}/annotations/"
                            f"panoptic_{split}.json (pass json_path= for another layout)")
        self.png_dir = Path(png_dir) if png_dir is not None else _first_dir(
            *( [r / f"panoptic_{split}", r / "annotations" / f"panoptic_{split}"] if r is not None else []),
            json_path.parent / f"panoptic_{split}", json_path.with_suffix(""))
        self.image_dir = Path(image_dir) if image_dir is not None else _first_dir(
            *([r / split, r / "images" / split] if r is not None else []), json_path.parent.parent / split)
        if self.png_dir is None or self.image_dir is None:
            raise DataError(f"COCO panoptic: PNG folder ({self.png_dir}) or image folder ({self.image_dir}) not "
                            f"found next to {json_path}; pass png_dir= and image_dir=")
        try:
            data = read_json(json_path)
            cats = data["categories"]
            self.category_ids = [int(c["id"]) for c in cats]
            self.class_names = [str(c["name"]) for c in cats]
            self.isthing = [bool(c.get("isthing", 1)) for c in cats]
            images = {int(im["id"]): im for im in data["images"]}
            anns = data["annotations"]
        except (SampleError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"cannot use {json_path}: {e}; expected the panopticapi json "
                            "(images / annotations / categories)") from e
        self._cat_index = {c: i for i, c in enumerate(self.category_ids)}
        self.json_key = json_path.name
        self.items: list[tuple[dict, dict]] = []
        for a in anns:
            if max_images is not None and len(self.items) >= max_images:
                break
            try:
                info = images[int(a["image_id"])]
                segs = a["segments_info"]
                for s in segs:
                    int(s["id"])
                    if int(s["category_id"]) not in self._cat_index:
                        raise KeyError(f"category {s['category_id']} not in categories")
                a["file_name"], info["file_name"]
            except (KeyError, TypeError, ValueError) as e:
                self.record_bad("bad_json", f"{self.json_key}#image{a.get('image_id', '?')}",
                                f"malformed annotation: {e}")
                continue
            self.items.append((info, a))
        self.check_not_empty()

    def __len__(self) -> int:
        return len(self.items)

    def _paths(self, index: int) -> tuple[str, str]:
        info, ann = self.items[index]
        return str(self.image_dir / info["file_name"]), str(self.png_dir / ann["file_name"])

    def item_keys(self, index: int):
        return self._paths(index)

    def load(self, index: int) -> dict:
        info, ann = self.items[index]
        img_path, png_path = self._paths(index)
        ids = read_panoptic_png(png_path)
        image, (w, h) = open_image(img_path, self.transform.draft_size)
        if ids.shape != (h, w):
            raise SampleError("corrupt_mask", key=png_path, detail=f"PNG is {ids.shape[0]}x{ids.shape[1]}, "
                              f"image is {h}x{w}")
        segs = [{"id": int(s["id"]), "category_id": self._cat_index[int(s["category_id"])],
                 "iscrowd": int(s.get("iscrowd", 0))} for s in ann["segments_info"]]
        known = np.isin(ids, [s["id"] for s in segs])
        ids = np.where(known, ids, 0)  # unlisted ids are void
        semantic = np.full(ids.shape, 255, dtype=np.int64)
        for s in segs:
            semantic[ids == s["id"]] = s["category_id"]
        t = self.transform
        pan_map = t.label_map(ids)
        present = set(torch.unique(pan_map).tolist())
        segs = [s for s in segs if s["id"] in present]  # segments lost by the resize are gone
        things = [s for s in segs if not s["iscrowd"]]
        if self.psalm_task == "panoptic":
            masks = torch.stack([(pan_map == s["id"]) for s in things]).float() if things else \
                torch.zeros(0, t.mask_size, t.mask_size)
            labels = torch.tensor([s["category_id"] for s in things], dtype=torch.long)
        else:
            classes = sorted({s["category_id"] for s in things})
            masks = torch.stack([sum((pan_map == s["id"]) for s in things if s["category_id"] == c).bool()
                                 for c in classes]).float() if classes else torch.zeros(0, t.mask_size, t.mask_size)
            labels = torch.tensor(classes, dtype=torch.long)
        return {
            "task": self.psalm_task, "pixel_values": t.image(image), "masks": masks, "labels": labels,
            "class_names": list(self.class_names), "isthing": list(self.isthing),
            "category_ids": list(self.category_ids), "panoptic_map": pan_map, "segments": segs,
            "semantic_map": t.label_map(semantic), "image_id": int(info["id"]), "caption": None,
        }

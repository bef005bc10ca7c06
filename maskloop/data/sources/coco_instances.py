"""COCO instances reader (instance segmentation for PSALM): one image = one sample.

Released layout, read as is::

    {root}/annotations/instances_{split}.json      # split e.g. train2017 / val2017
    {root}/{split}/<file_name>.jpg

``instances_{split}.json`` is the COCO detection format: ``images [{id, file_name, height,
width}]``, ``annotations [{id, image_id, category_id, segmentation, area, bbox,
iscrowd}]``, ``categories [{id, name, supercategory}]``. ``segmentation`` is a list of
polygons ``[[x1, y1, x2, y2, ...], ...]`` (``iscrowd`` 0) or a COCO RLE (crowd regions,
uncompressed ``counts`` list or compressed string), decoded with ``pycocotools``.

Targets: one mask per non-crowd annotation (crowd ones are dropped from the training
targets, as Mask2Former's instance mapper does, and returned separately as
``crowd_masks`` for AP). Images without any annotation are not indexed (Mask2Former's
``filter_empty_annotations``). A malformed polygon / RLE makes the whole image a bad
sample (``bad_rle``, keyed ``instances_{split}.json#ann<id>``): its targets would be
incomplete otherwise. Class indices follow the order of ``categories``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..io import decode_segmentation, open_image, read_json
from ..psalm import PSALMTransform
from ..robust import DataError, RobustDataset, SampleError

__all__ = ["COCOInstancesDataset"]


class COCOInstancesDataset(RobustDataset):
    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "val2017",
        json_path: str | os.PathLike | None = None,
        image_dir: str | os.PathLike | None = None,
        transform: PSALMTransform | None = None,
        min_area: float = 0.0,
        max_images: int | None = None,
        max_retries: int = 16,
        name: str = "coco_instances",
    ):
        super().__init__(max_retries=max_retries)
        self.name, self.psalm_task = name, "instance"
        self.transform = transform or PSALMTransform()
        r = Path(root) if root is not None else None
        if json_path is None:
            if r is None:
                raise ValueError("COCOInstancesDataset needs root= (the coco folder) or json_path=")
            json_path = r / "annotations" / f"instances_{split}.json"
        json_path = Path(json_path)
        if not json_path.is_file():
            raise DataError(f"COCO instances json {json_path} not found: expected {{root}}/annotations/"
                            f"instances_{split}.json (pass json_path= for another layout)")
        if image_dir is None:
            cands = ([r / split, r / "images" / split] if r is not None else []) + [json_path.parent.parent / split]
            image_dir = next((c for c in cands if c.is_dir()), None)
            if image_dir is None:
                raise DataError(f"COCO images not found under {[str(c) for c in cands]}; pass image_dir=")
        self.image_dir = Path(image_dir)
        try:
            data = read_json(json_path)
            cats = data["categories"]
            self.category_ids = [int(c["id"]) for c in cats]
            self.class_names = [str(c["name"]) for c in cats]
            images = data["images"]
            anns = data["annotations"]
        except (SampleError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"cannot use {json_path}: {e}; expected COCO images / annotations / categories") from e
        self.isthing = [True] * len(self.category_ids)
        self._cat_index = {c: i for i, c in enumerate(self.category_ids)}
        self.json_key = json_path.name
        by_image: dict[int, list[dict]] = defaultdict(list)
        for a in anns:
            try:
                if int(a["category_id"]) not in self._cat_index:
                    raise KeyError(f"category {a['category_id']} not in categories")
                if float(a.get("area", 1.0)) < min_area and not a.get("iscrowd", 0):
                    continue
                a["segmentation"]
                by_image[int(a["image_id"])].append(a)
            except (KeyError, TypeError, ValueError) as e:
                self.record_bad("bad_json", f"{self.json_key}#ann{a.get('id', '?') if isinstance(a, dict) else '?'}",
                                f"malformed annotation: {e}")
        self.items: list[tuple[dict, list[dict]]] = []
        for im in images:
            if max_images is not None and len(self.items) >= max_images:
                break
            try:
                iid = int(im["id"])
                im["file_name"], int(im["height"]), int(im["width"])
            except (KeyError, TypeError, ValueError) as e:
                self.record_bad("bad_json", f"{self.json_key}#image{im.get('id', '?')}", f"malformed image: {e}")
                continue
            if by_image.get(iid):
                self.items.append((im, by_image[iid]))
        self.check_not_empty()

    def __len__(self) -> int:
        return len(self.items)

    def item_keys(self, index: int):
        return (str(self.image_dir / self.items[index][0]["file_name"]),)

    def load(self, index: int) -> dict:
        info, anns = self.items[index]
        h, w = int(info["height"]), int(info["width"])
        masks, labels, crowd = [], [], []
        for a in anns:
            try:
                m = decode_segmentation(a["segmentation"], h, w)
            except SampleError as e:
                e.key = f"{self.json_key}#ann{a.get('id', '?')}"
                raise
            (crowd if a.get("iscrowd", 0) else masks).append(m)
            if not a.get("iscrowd", 0):
                labels.append(self._cat_index[int(a["category_id"])])
        crowd_labels = [self._cat_index[int(a["category_id"])] for a in anns if a.get("iscrowd", 0)]
        path = str(self.image_dir / info["file_name"])
        image, size = open_image(path, self.transform.draft_size)
        if size != (w, h):
            raise SampleError("corrupt_image", key=path, detail=f"image is {size[1]}x{size[0]}, json says {h}x{w}")
        t = self.transform
        none = np.zeros((0, h, w), dtype=bool)
        tm = t.masks(np.stack(masks) if masks else none)
        keep = tm.flatten(1).any(1)  # objects that vanished in the resize cannot be targets
        return {
            "task": "instance", "pixel_values": t.image(image), "masks": tm[keep],
            "labels": torch.tensor(labels, dtype=torch.long)[keep],
            "crowd_masks": t.masks(np.stack(crowd) if crowd else none),
            "crowd_labels": torch.tensor(crowd_labels, dtype=torch.long),
            "class_names": list(self.class_names), "isthing": list(self.isthing),
            "category_ids": list(self.category_ids), "image_id": int(info["id"]), "caption": None,
        }

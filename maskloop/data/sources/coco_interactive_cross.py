"""Cross-image region segmentation reader (data kind ``coco_interactive_cross``).

Reads PSALM's cross-image json as its ``datasets/build_DAVIS.py`` writes it (layout in
:mod:`maskloop.data.fixtures_cross`): a **list** of rows ``{image, image_info{file_name,
height, width}, anns, first_frame_image, first_frame_anns, new_img_id, video_name}``, every
annotation ``{segmentation (COCO RLE or polygons), area, category_id}``, paths relative to
``image_dir``. As PSALM's ``DAVIS_Dataset`` reads it: the regions are the *mask* visual
prompts ``first_frame_anns`` on the prompt image (``first_frame_image``), the targets the
``anns`` of the same objects in ``image``. Regions and targets are paired by ``category_id``
(the object id; the release keeps them in the same order).

Sample (task ``cross_image``): ``pixel_values`` the target image, ``prompt_pixel_values`` the
prompt image, ``region_masks`` (R, M, M) on the prompt image, ``masks`` (R, M, M) in the target
image, ``labels`` = region index, ``category_ids``, ``video_name``, ``image_id``.

Bad rows are skipped and counted (:class:`~maskloop.data.robust.RobustDataset`): malformed
rows (missing fields, no annotations, region / target objects that do not pair up) at
indexing as ``bad_json``; undecodable RLEs (``bad_rle``), missing or corrupt images,
images whose size is not the json's (``corrupt_image``) and rows left with no non-empty
region (``empty_mask``) when read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..io import decode_segmentation, open_image
from ..psalm import PSALMTransform
from ..robust import RobustDataset, SampleError
from .coco_interactive import read_psalm_rows

__all__ = ["COCOInteractiveCrossDataset"]


def _cat(a) -> int:
    c = float(a["category_id"])
    if not c.is_integer():
        raise ValueError(f"category_id {a['category_id']!r} is not an object id")
    return int(c)


class COCOInteractiveCrossDataset(RobustDataset):
    def __init__(
        self,
        json_path: str | os.PathLike,
        image_dir: str | os.PathLike,
        transform: PSALMTransform | None = None,
        max_regions: int | None = None,
        max_rows: int | None = None,
        max_retries: int = 16,
        name: str = "coco_interactive_cross",
    ):
        super().__init__(max_retries=max_retries)
        self.name, self.psalm_task = name, "cross_image"
        self.transform = transform or PSALMTransform()
        self.max_regions = max_regions
        json_path, self.image_dir = Path(json_path), Path(image_dir)
        data = read_psalm_rows(
            json_path, self.image_dir,
            f"cross-image json {json_path} not found (PSALM's datasets/build_DAVIS.py writes "
            "2017/trainval_val_psalm.json)",
            f"image folder {self.image_dir} not found; point image_dir at the folder the json's "
            "paths are relative to (PSALM: datasets/DAVIS)",
            "{image, anns, first_frame_image, first_frame_anns} rows")
        self.json_key = json_path.name
        self.items: list[dict] = []
        for k, row in enumerate(data):
            if max_rows is not None and len(self.items) >= max_rows:
                break
            try:
                info = row["image_info"]
                int(info["height"]), int(info["width"]), str(row["image"]), str(row["first_frame_image"])
                anns, vps = row["anns"], row["first_frame_anns"]
                if not isinstance(anns, list) or not isinstance(vps, list) or not anns:
                    raise ValueError("no annotations")
                for a in anns + vps:
                    a["segmentation"]
                tgt, reg = [_cat(a) for a in anns], [_cat(a) for a in vps]
                if len(set(tgt)) != len(tgt) or sorted(tgt) != sorted(reg):
                    raise ValueError(f"target objects {tgt} do not pair with prompt regions {reg}")
            except (KeyError, TypeError, ValueError) as err:
                self.record_bad("bad_json", f"{self.json_key}#row{k}", f"malformed row: {err}")
                continue
            self.items.append(row)
        self.check_not_empty()

    def __len__(self) -> int:
        return len(self.items)

    def item_keys(self, index: int):
        r = self.items[index]
        return (str(self.image_dir / r["image"]), str(self.image_dir / r["first_frame_image"]))

    def _open(self, rel: str, h: int, w: int):
        path = str(self.image_dir / rel)
        image, size = open_image(path, self.transform.draft_size)
        if size != (w, h):
            raise SampleError("corrupt_image", key=path, detail=f"image is {size[1]}x{size[0]}, json says {h}x{w}")
        return image

    def load(self, index: int) -> dict:
        r = self.items[index]
        info = r["image_info"]
        h, w = int(info["height"]), int(info["width"])
        key = f"{self.json_key}#{r.get('video_name', '?')}/{r.get('new_img_id', index)}"
        by_cat = {_cat(a): a for a in r["anns"]}
        prompts, targets, cats = [], [], []
        for vp in r["first_frame_anns"][: self.max_regions]:
            c = _cat(vp)
            try:
                p = decode_segmentation(vp["segmentation"], h, w)
                m = decode_segmentation(by_cat[c]["segmentation"], h, w)
            except SampleError as err:
                err.key = err.key or key
                raise
            if p.any() and m.any():
                prompts.append(p)
                targets.append(m)
                cats.append(c)
        if not prompts:
            raise SampleError("empty_mask", key=key, detail="no object has both a prompt region and a target")
        target_img = self._open(r["image"], h, w)
        prompt_img = self._open(r["first_frame_image"], h, w)
        t = self.transform
        region_masks, masks = t.masks(np.stack(prompts)), t.masks(np.stack(targets))
        keep = region_masks.flatten(1).any(1) & masks.flatten(1).any(1)
        if not bool(keep.any()):
            raise SampleError("empty_mask", key=key, detail="every region vanished when resized")
        return {
            "task": "cross_image", "pixel_values": t.image(target_img), "prompt_pixel_values": t.image(prompt_img),
            "region_masks": region_masks[keep], "masks": masks[keep], "labels": torch.arange(int(keep.sum())),
            "category_ids": [c for c, k in zip(cats, keep.tolist()) if k], "prompt_type": "mask",
            "video_name": r.get("video_name"), "image_id": int(r.get("new_img_id", index)), "caption": None,
        }

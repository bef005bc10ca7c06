"""COCO-Interactive reader (PSALM's region / visual-prompt segmentation): one image = one sample.

Released files (PSALM's ``datasets/bulid_COCO_Interactivate.py``, also downloadable as
``coco_interactive_{train,val}_psalm.json``), read as is::

    coco_interactive_{split}_psalm.json
    {image_dir}/<file_name>.jpg                     # COCO train2017 / val2017

The json is a **list**, one entry per COCO image that has annotations::

    [{"image": "<file_name>", "new_img_id": int,
      "image_info": {COCO image dict: id, file_name, height, width, ...},
      "anns": [{COCO instance annotation: id, image_id, category_id, segmentation
                (polygons or RLE), area, bbox, iscrowd,
                "point_visual_prompt_mask":    {"counts": str, "size": [h, w]},
                "scribble_visual_prompt_mask": {...},
                "box_visual_prompt_mask":      {...},
                "mask_visual_prompt_mask":     {...}}, ...]}, ...]

Each ``*_visual_prompt_mask`` is a COCO compressed RLE at the image's size: the point
prompt is one pixel per connected component of the object, the scribble a one-pixel
sine-wobbled diagonal through a jittered box, the box a filled (scaled 0.9-1.1) box, the
mask a Gaussian-blurred, re-thresholded copy of the object mask.

Sample: every annotation of the image is one region (``max_regions`` caps them, in file
order); ``region_masks`` are the chosen prompt type's masks, points thickened to discs of
radius ``point_radius`` (10 px) and scribbles to ``scribble_radius`` (5 px) at the
original resolution (docs/recipes.md, "PSALM"); ``masks`` the objects; ``labels`` = region index.
``prompt_type``: one of ``point / scribble / box / mask``, or ``"random"`` (a type drawn
per sample from ``random_types`` -- PSALM trains with box / scribble / point --
deterministically from ``(seed, epoch, index)``). A region whose prompt of that type is
empty (the release has a few empty scribbles) is left out; an image left with no region
is skipped as ``empty_mask``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from ..io import decode_segmentation, open_image, read_json_list
from ..psalm import PSALMTransform
from ..robust import DataError, RobustDataset, SampleError

__all__ = ["COCOInteractiveDataset", "PROMPT_TYPES", "thicken"]

PROMPT_TYPES = ("point", "scribble", "box", "mask")


def read_psalm_rows(json_path: Path, image_dir: Path, missing_json: str, missing_dir: str, rows: str) -> list:
    """The row list of one of PSALM's json files (COCO-Interactive, the cross-image json), with one
    :class:`DataError` for a missing file or folder (``missing_json`` / ``missing_dir``), an unparsable file,
    or a top level that is not a list (``rows`` names what it should hold)."""
    if not json_path.is_file():
        raise DataError(missing_json)
    if not image_dir.is_dir():
        raise DataError(missing_dir)
    return read_json_list(json_path, rows)


def thicken(mask: np.ndarray, radius: float) -> np.ndarray:
    """Every foreground pixel grown to a disc of ``radius`` px (exact Euclidean dilation)."""
    if radius <= 0 or not mask.any():
        return mask.astype(bool)
    return ndimage.distance_transform_edt(~mask.astype(bool)) <= radius


class COCOInteractiveDataset(RobustDataset):
    def __init__(
        self,
        json_path: str | os.PathLike,
        image_dir: str | os.PathLike,
        prompt_type: str = "random",
        random_types: Sequence[str] = ("box", "scribble", "point"),
        transform: PSALMTransform | None = None,
        max_regions: int | None = None,
        point_radius: float = 10.0,
        scribble_radius: float = 5.0,
        seed: int = 0,
        max_images: int | None = None,
        max_retries: int = 16,
        name: str = "coco_interactive",
    ):
        super().__init__(max_retries=max_retries)
        if prompt_type != "random" and prompt_type not in PROMPT_TYPES:
            raise ValueError(f"prompt_type must be 'random' or one of {PROMPT_TYPES}, got {prompt_type!r}")
        bad = [t for t in random_types if t not in PROMPT_TYPES]
        if bad:
            raise ValueError(f"random_types {bad} not in {PROMPT_TYPES}")
        self.name, self.psalm_task = name, "region"
        self.transform = transform or PSALMTransform()
        self.prompt_type, self.random_types = prompt_type, tuple(random_types)
        self.max_regions = max_regions
        self.radius = {"point": float(point_radius), "scribble": float(scribble_radius), "box": 0.0, "mask": 0.0}
        self.seed, self.epoch = int(seed), 0
        json_path, self.image_dir = Path(json_path), Path(image_dir)
        data = read_psalm_rows(
            json_path, self.image_dir,
            f"COCO-Interactive json {json_path} not found (coco_interactive_{{split}}_psalm.json "
            "from PSALM's release or datasets/bulid_COCO_Interactivate.py)",
            f"image folder {self.image_dir} not found; point image_dir at COCO train2017 / val2017",
            "{image, image_info, anns} entries")
        self.json_key = json_path.name
        self.items: list[dict] = []
        for k, e in enumerate(data):
            if max_images is not None and len(self.items) >= max_images:
                break
            try:
                info = e["image_info"]
                int(info["height"]), int(info["width"]), str(e["image"])
                anns = e["anns"]
                if not isinstance(anns, list) or not anns:
                    raise ValueError("no annotations")
                for a in anns:
                    a["segmentation"]
            except (KeyError, TypeError, ValueError) as err:
                self.record_bad("bad_json", f"{self.json_key}#entry{k}", f"malformed entry: {err}")
                continue
            self.items.append(e)
        self.check_not_empty()

    def set_epoch(self, epoch: int) -> None:
        """Draw new random prompt types (``prompt_type="random"``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def item_keys(self, index: int):
        return (str(self.image_dir / self.items[index]["image"]),)

    def type_for(self, index: int) -> str:
        if self.prompt_type != "random":
            return self.prompt_type
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return self.random_types[int(rng.integers(len(self.random_types)))]

    def load(self, index: int) -> dict:
        e = self.items[index]
        info = e["image_info"]
        h, w = int(info["height"]), int(info["width"])
        ptype = self.type_for(index)
        key = f"{ptype}_visual_prompt_mask"
        prompts, targets = [], []
        for a in e["anns"][: self.max_regions]:
            akey = f"{self.json_key}#ann{a.get('id', '?')}"
            try:
                if key not in a:
                    raise SampleError("bad_json", key=akey, detail=f"annotation has no {key}")
                p = decode_segmentation(a[key], h, w)
                m = decode_segmentation(a["segmentation"], h, w)
            except SampleError as err:
                err.key = err.key or akey
                raise
            if not p.any() or not m.any():
                continue  # an empty prompt (or object) cannot be a region
            prompts.append(thicken(p, self.radius[ptype]))
            targets.append(m)
        path = str(self.image_dir / e["image"])
        if not prompts:
            raise SampleError("empty_mask", key=f"{self.json_key}#image{info.get('id', '?')}",
                              detail=f"no annotation has a non-empty {ptype} prompt")
        image, size = open_image(path, self.transform.draft_size)
        if size != (w, h):
            raise SampleError("corrupt_image", key=path, detail=f"image is {size[1]}x{size[0]}, json says {h}x{w}")
        t = self.transform
        region_masks, masks = t.masks(np.stack(prompts)), t.masks(np.stack(targets))
        keep = region_masks.flatten(1).any(1) & masks.flatten(1).any(1)
        if not bool(keep.any()):
            raise SampleError("empty_mask", key=path, detail="every region vanished when resized")
        return {
            "task": "region", "pixel_values": t.image(image), "region_masks": region_masks[keep],
            "masks": masks[keep], "labels": torch.arange(int(keep.sum())), "prompt_type": ptype,
            "image_id": int(e.get("new_img_id", info.get("id", index))), "caption": None,
        }

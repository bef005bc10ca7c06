"""SA-1B (Segment Anything 1B) reader: one annotation = one sample.

Released layout (read as is, nothing to preprocess):

* ``sa_NNNNNN.tar`` shards, each holding pairs ``sa_<id>.jpg`` + ``sa_<id>.json``; or the
  same pairs extracted into folders. ``root`` may be a folder (searched recursively for
  ``sa_*.json`` and ``sa_*.tar``), a single ``.tar``, or a list of those.
* ``sa_<id>.json``::

      {"image": {"image_id": int, "width": int, "height": int, "file_name": "sa_<id>.jpg"},
       "annotations": [{"id": int, "segmentation": {"size": [h, w], "counts": "<COCO RLE>"},
                        "area": int, "bbox": [x, y, w, h], "predicted_iou": float,
                        "point_coords": [[x, y]], "crop_box": [x, y, w, h],
                        "stability_score": float}, ...]}

Images are about 1500 px on the short side; masks are at the image's stored size.
Tar members are read directly by (offset, size) recorded while indexing, through a small
per-process LRU of open shard files. ``min_area`` (pixels, from the ``area`` field)
filters annotations at index time; ``max_images`` caps the number of images indexed.
"""

from __future__ import annotations

import bisect
import os
import re
from pathlib import Path
from typing import Sequence

from ...lru import SmallCache
from ..io import FileLRU, decode_segmentation, open_image, read_json, scan_tar
from ..robust import RobustDataset, SampleError
from ..transforms import SampleTransform
from .common import default_transform, make_sample

_NUM = re.compile(r"(\d+)")


def _natural(p: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in _NUM.split(os.path.basename(p)))


class SA1BDataset(RobustDataset):
    """SA-1B from folders of ``sa_*.jpg``/``sa_*.json`` or the released ``.tar`` shards."""

    def __init__(
        self,
        root: str | os.PathLike | Sequence[str | os.PathLike],
        transform: SampleTransform | None = None,
        min_area: float = 0.0,
        max_images: int | None = None,
        as_pair: bool = False,
        max_retries: int = 16,
        max_open_tars: int = 8,
        name: str = "sa1b",
    ):
        super().__init__(max_retries=max_retries, as_pair=as_pair)
        self.name = name
        self.transform = default_transform(transform)
        self.min_area = float(min_area)
        self.max_images = max_images
        self._tars = FileLRU(max_open_tars)
        self._json_cache = SmallCache(4)
        # per image: (image_loc, json_loc, [annotation indices], [annotation ids], (h, w))
        self.images: list[tuple] = []
        self._cum: list[int] = []

        roots = [root] if isinstance(root, (str, os.PathLike)) else list(root)
        if not roots:
            raise ValueError("SA1BDataset needs at least one folder or .tar path")
        for r in roots:
            if self._full():
                break
            r = Path(r)
            if not r.exists():
                raise FileNotFoundError(f"SA-1B path {r} does not exist; point it at the extracted folder or the sa_*.tar shards")
            if r.is_file():
                self._index_tar(str(r))
                continue
            tars = sorted((str(p) for p in r.rglob("sa_*.tar")), key=_natural)
            jsons = sorted((str(p) for p in r.rglob("sa_*.json")), key=_natural)
            jpgs = {str(p)[:-4] for p in r.rglob("sa_*.jpg")}
            for stem in sorted(jpgs - {j[:-5] for j in jsons}, key=_natural):
                self.record_bad("missing_file", stem + ".json", "image has no annotation json")
            for j in jsons:
                if self._full():
                    break
                self._add_image(("file", j[:-5] + ".jpg"), ("file", j), j)
            for t in tars:
                if self._full():
                    break
                self._index_tar(t)
        self.check_not_empty()

    # ---- indexing -----------------------------------------------------------------------
    def _full(self) -> bool:
        return self.max_images is not None and len(self.images) >= self.max_images

    def _index_tar(self, tar: str) -> None:
        try:
            members = scan_tar(tar)
        except Exception as e:  # noqa: BLE001
            self.record_bad("corrupt_image", tar, f"cannot read tar shard: {e}")
            return
        stems = sorted({m[:-5] for m in members if m.startswith("sa_") and m.endswith(".json")}, key=_natural)
        for stem in sorted({m[:-4] for m in members if m.startswith("sa_") and m.endswith(".jpg")} - set(stems)):
            self.record_bad("missing_file", f"{tar}:{stem}.json", "image has no annotation json")
        for stem in stems:
            if self._full():
                return
            jpg = members.get(stem + ".jpg")
            if jpg is None:
                self.record_bad("missing_file", f"{tar}:{stem}.jpg", "annotation json has no image")
                continue
            self._add_image(
                ("tar", tar, *jpg, stem + ".jpg"), ("tar", tar, *members[stem + ".json"], stem + ".json"), f"{tar}:{stem}.json"
            )

    def _read_json(self, loc: tuple, key: str) -> dict:
        raw = self._tars.read(loc[1], loc[2], loc[3]) if loc[0] == "tar" else loc[1]
        data = read_json(raw, key=key)
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) or not isinstance(data.get("image"), dict):
            raise SampleError("bad_json", key=key, detail="expected {'image': {...}, 'annotations': [...]}")
        return data

    def _add_image(self, img_loc: tuple, json_loc: tuple, json_key: str) -> None:
        try:
            data = self._read_json(json_loc, json_key)
            info = data["image"]
            hw = (int(info["height"]), int(info["width"]))
            keep, ids = [], []
            for k, ann in enumerate(data["annotations"]):
                area = ann.get("area")
                if area is None or float(area) >= max(self.min_area, 1e-9):
                    keep.append(k)
                    ids.append(ann.get("id", k))
        except SampleError as e:
            self.record_bad(e.reason, json_key, e.detail)
            return
        except (KeyError, TypeError, ValueError) as e:
            self.record_bad("bad_json", json_key, f"missing or malformed field: {e}")
            return
        if img_loc[0] == "file" and not os.path.exists(img_loc[1]):
            self.record_bad("missing_file", img_loc[1], "annotation json has no image")
            return
        if not keep:
            return
        self.images.append((img_loc, json_loc, json_key, keep, ids, hw))
        self._cum.append((self._cum[-1] if self._cum else 0) + len(keep))

    # ---- access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._cum[-1] if self._cum else 0

    def _locate(self, index: int) -> tuple[tuple, int]:
        i = bisect.bisect_right(self._cum, index)
        start = self._cum[i - 1] if i else 0
        return self.images[i], index - start

    @staticmethod
    def _img_key(loc: tuple) -> str:
        return loc[1] if loc[0] == "file" else f"{loc[1]}:{loc[4]}"  # shard:member

    def item_keys(self, index: int):
        entry, j = self._locate(index)
        img_loc, _, json_key, _, ids, _ = entry
        return (self._img_key(img_loc), json_key, f"{json_key}#{ids[j]}")

    def load(self, index: int) -> dict:
        (img_loc, json_loc, json_key, keep, ids, hw), j = self._locate(index)
        data = self._json_cache.get(json_key, lambda: self._read_json(json_loc, json_key))
        ann_key = f"{json_key}#{ids[j]}"
        try:
            seg = data["annotations"][keep[j]]["segmentation"]
        except (KeyError, IndexError, TypeError) as e:
            raise SampleError("bad_json", key=json_key, detail=f"annotation {ids[j]} has no segmentation") from e
        try:
            mask = decode_segmentation(seg, *hw)
        except SampleError as e:
            e.key = ann_key
            raise
        img_key = self._img_key(img_loc)
        src = self._tars.read(img_loc[1], img_loc[2], img_loc[3]) if img_loc[0] == "tar" else img_loc[1]
        image, size = open_image(src, self.transform.draft_size, key=img_key)
        sample = make_sample(self.transform, image, size, mask, ann_key)
        sample["caption"] = None
        return sample

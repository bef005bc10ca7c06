"""The shared part of the three "own data" readers (``coco``, ``folder``, ``sa2va``).

Each reader turns its on-disk format into a list of :class:`Region` records (one object
mask of one image, with the texts that come with it) at index time; this base class makes
the samples from them. What a sample is depends on ``mode``:

* ``masks`` (default): one sample per region, no text -- what Loop 1 needs (with
  ``as_pair: true`` the sample is a single-image pair, image2 = image1, mask2 = mask1);
* ``refer``: one sample per (region, expression), ``sample["expression"]`` set -- the
  supervised referring stream;
* ``caption``: one sample per region that has a caption, ``sample["caption"]`` set -- the
  region-caption stream (SFT / Loop 2).

Bad rows are skipped and counted (:mod:`maskloop.data.robust`): an image that does not
exist is found at index time (``missing_file``); a malformed RLE / polygon (``bad_rle``),
an undecodable image or mask PNG, and a mask with no foreground pixels (``empty_mask``)
when the sample is read.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..io import decode_segmentation, open_image
from ..robust import RobustDataset, SampleError
from ..transforms import SampleTransform
from .common import check_image_mask, default_transform, make_sample

__all__ = ["Region", "OwnDataset", "MODES", "clean_texts"]

MODES = ("masks", "refer", "caption")


@dataclass
class Region:
    """One object of one image.

    ``mask`` says how to get the (H, W) bool mask: ``("coco", segmentation)`` (COCO RLE dict
    or polygon list), ``("segments", [segmentation, ...])`` (their union: Sa2VA's per-object
    list), ``("png", path)`` (a binary PNG, non-zero = inside) or ``("ids", path, value)``
    (the pixels of an instance-id PNG equal to ``value``).
    """

    image: str  # path of the image file
    key: str  # names the region in skip reports, e.g. "annotations.json#ann12"
    mask: tuple
    hw: tuple[int, int] | None = None  # (H, W) the annotation says, when it says one
    expressions: list[str] = field(default_factory=list)
    caption: str | None = None
    meta: dict = field(default_factory=dict)  # what an importer keeps (category name, ids)


def clean_texts(value: Any) -> list[str]:
    """A string or list of strings -> non-empty stripped strings (anything else -> [])."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return []
    return [v.strip() for v in value if isinstance(v, str) and v.strip()]


def _read_png(path: str, key: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise SampleError("missing_file", key=path, detail="mask PNG not found") from e
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            arr = np.asarray(im if im.mode in ("1", "L", "P", "I", "I;16") else im.convert("L"))
    except (OSError, SyntaxError, ValueError) as e:
        raise SampleError("corrupt_mask", key=path, detail=f"cannot decode mask PNG: {e}") from e
    if arr.ndim != 2:
        raise SampleError("corrupt_mask", key=path, detail=f"mask PNG must be single-channel, got shape {arr.shape}")
    return arr


def region_mask(region: Region, size: tuple[int, int]) -> np.ndarray:
    """The region's (H, W) bool mask for an image of ``size`` = (W, H); raises SampleError."""
    w, h = size
    kind = region.mask[0]
    try:
        if kind == "coco":
            return decode_segmentation(region.mask[1], h, w)
        if kind == "segments":
            segs = region.mask[1]
            if not isinstance(segs, (list, tuple)) or not segs:
                raise SampleError("empty_mask", detail="the object has no mask segments")
            out = np.zeros((h, w), bool)
            for seg in segs:
                # one segment = one flat polygon [x1, y1, ...] (Sa2VA's format), a list of them, or an RLE dict
                nested = isinstance(seg, (list, tuple)) and bool(seg) and isinstance(seg[0], (list, tuple))
                out |= decode_segmentation(seg if isinstance(seg, dict) or nested else [seg], h, w)
            return out
        if kind in ("png", "ids"):
            arr = _read_png(region.mask[1], region.key)
            m = arr > 0 if kind == "png" else arr == region.mask[2]
            if m.shape != (h, w):
                raise SampleError("bad_rle", detail=f"mask PNG is {m.shape[0]}x{m.shape[1]}, the image {h}x{w}")
            return m
    except SampleError as e:
        e.key = region.key
        raise
    raise ValueError(f"unknown region mask kind {kind!r}")


class OwnDataset(RobustDataset):
    """Base of the own-data readers: subclasses fill ``self.regions`` and call :meth:`_finish_index`."""

    def __init__(self, mode: str = "masks", transform: SampleTransform | None = None, as_pair: bool = False,
                 max_retries: int = 16, name: str = "own"):
        super().__init__(max_retries=max_retries, as_pair=as_pair)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
        self.mode, self.name = mode, name
        self.transform = default_transform(transform)
        self.regions: list[Region] = []
        self.items: list[tuple[int, int]] = []  # (region index, expression index or -1)
        self._exists: dict[str, bool] = {}

    def add_region(self, region: Region) -> None:
        """Index one region, counting a missing image (the file check is cheap; reading waits)."""
        exists = self._exists.get(region.image)
        if exists is None:  # one stat per image, however many regions it has
            exists = self._exists[region.image] = os.path.isfile(region.image)
        if not exists:
            self.record_bad("missing_file", region.image, f"image of {region.key} not found")
            return
        self.regions.append(region)

    def _finish_index(self) -> None:
        for r, reg in enumerate(self.regions):
            if self.mode == "masks":
                self.items.append((r, -1))
            elif self.mode == "refer":
                self.items.extend((r, k) for k in range(len(reg.expressions)))
            elif reg.caption:
                self.items.append((r, -1))
        self._exists = {}
        what = {"masks": "regions", "refer": "regions with expressions", "caption": "regions with a caption"}
        self.check_not_empty(f"no {what[self.mode]} were found while indexing")

    def __len__(self) -> int:
        return len(self.items)

    def item_keys(self, index: int):
        reg = self.regions[self.items[index][0]]
        return (reg.image, reg.key)

    def text_length(self, index: int) -> int:
        r, k = self.items[index]
        reg = self.regions[r]
        return len(reg.expressions[k]) if k >= 0 else len(reg.caption or "")

    def read_region(self, r: int) -> tuple[Image.Image, tuple[int, int], np.ndarray]:
        """(RGB image, stored (W, H), (H, W) bool mask) of region ``r``, validated (non-empty,
        the annotation's size matching the image's). Raises SampleError."""
        reg = self.regions[r]
        image, size = open_image(reg.image, self.transform.draft_size)
        if reg.hw is not None and tuple(reg.hw) != (size[1], size[0]):
            raise SampleError("bad_rle", key=reg.key,
                              detail=f"annotation says {reg.hw[0]}x{reg.hw[1]}, the image is {size[1]}x{size[0]}")
        mask = region_mask(reg, size)
        check_image_mask(size, mask, reg.key)
        return image, size, mask

    def load(self, index: int) -> dict:
        r, k = self.items[index]
        reg = self.regions[r]
        image, size, mask = self.read_region(r)
        sample = make_sample(self.transform, image, size, mask, reg.key)
        sample["caption"] = reg.caption if self.mode == "caption" else None
        if self.mode == "refer":
            sample["expression"] = reg.expressions[k]
        return sample

"""Own data as a plain folder of images and masks (data kind ``folder``).

Layout::

    {root}/images/<stem>.jpg|.jpeg|.png|.bmp|.webp
    {root}/masks/<stem>.png          # EITHER one instance-id PNG: 0 = background, each other
                                     #   value one object (8- or 16-bit grey, or palette);
    {root}/masks/<stem>/<id>.png     # OR a folder of binary PNGs, one object each (non-zero = inside)
    {root}/texts.json                # optional: texts per image and mask
        {"<stem or image file name>": {"<id>": {"expressions": ["the dog", ...], "caption": "A brown dog ..."}}}

The mask ``<id>`` is the instance value (``"1"``, ``"2"``, ...) of an id PNG, or the file
stem of a binary PNG. A mask entry may also be a list of strings (its expressions). Masks
must have the image's size. Every image needs masks (an image without them, or masks
without an image, is counted as ``missing_file``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..io import read_json
from ..robust import DataError, SampleError
from ..transforms import SampleTransform
from .own_common import OwnDataset, Region, _read_png, clean_texts

__all__ = ["OwnFolderDataset", "IMAGE_EXTS"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _texts_for(texts: dict, image_name: str, stem: str) -> dict:
    entry = texts.get(image_name, texts.get(stem, {}))
    return entry if isinstance(entry, dict) else {}


def _mask_texts(entry) -> tuple[list[str], str | None]:
    if isinstance(entry, dict):
        cap = entry.get("caption")
        return clean_texts(entry.get("expressions")), (cap.strip() if isinstance(cap, str) and cap.strip() else None)
    return clean_texts(entry), None


class OwnFolderDataset(OwnDataset):
    def __init__(self, root: str | os.PathLike, mode: str = "masks", transform: SampleTransform | None = None,
                 as_pair: bool = False, images_dir: str | os.PathLike | None = None,
                 masks_dir: str | os.PathLike | None = None, max_retries: int = 16, name: str = "folder"):
        super().__init__(mode, transform, as_pair, max_retries, name)
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder not found: {root}")
        self.images_dir = Path(images_dir) if images_dir else root / "images"
        self.masks_dir = Path(masks_dir) if masks_dir else root / "masks"
        for d, what in ((self.images_dir, "images"), (self.masks_dir, "masks")):
            if not d.is_dir():
                raise DataError(f"no {what}/ folder in {root}: the folder layout is {root}/images/ + {root}/masks/ "
                                "(see `maskloop data import --help`)")
        texts: dict = {}
        if (root / "texts.json").is_file():
            try:
                texts = read_json(root / "texts.json")
                if not isinstance(texts, dict):
                    raise SampleError("bad_json", key="texts.json", detail="expected {image: {mask id: texts}}")
            except SampleError as e:
                self.record_bad("bad_json", "texts.json", e.detail)
                texts = {}
        images = {p.stem: p for p in sorted(self.images_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTS}
        mask_stems = {p.stem if p.is_file() else p.name for p in self.masks_dir.iterdir()
                      if p.is_dir() or p.suffix.lower() == ".png"}
        for stem in sorted(mask_stems - set(images)):
            self.record_bad("missing_file", str(self.images_dir / f"{stem}.*"), "masks without an image")
        for stem, img in images.items():
            entry = _texts_for(texts, img.name, stem)
            one = self.masks_dir / f"{stem}.png"
            many = self.masks_dir / stem
            if many.is_dir():
                for png in sorted(many.glob("*.png")):
                    exprs, cap = _mask_texts(entry.get(png.stem))
                    self.add_region(Region(image=str(img), key=f"masks/{stem}/{png.name}", mask=("png", str(png)),
                                           expressions=exprs, caption=cap, meta={"file_name": img.name, "id": png.stem}))
            elif one.is_file():
                try:
                    ids = np.unique(_read_png(str(one), str(one)))
                except SampleError as e:
                    self.record_bad(e.reason, str(one), e.detail)
                    continue
                ids = [int(v) for v in ids if v != 0]
                if not ids:
                    self.record_bad("empty_mask", str(one), "instance-id PNG has no non-zero pixel")
                for v in ids:
                    exprs, cap = _mask_texts(entry.get(str(v)))
                    self.add_region(Region(image=str(img), key=f"masks/{one.name}#{v}", mask=("ids", str(one), v),
                                           expressions=exprs, caption=cap, meta={"file_name": img.name, "id": str(v)}))
            else:
                self.record_bad("missing_file", str(one), f"image {img.name} has no masks/{stem}.png nor masks/{stem}/")
        self._finish_index()

"""Open Images V7 instance segmentation reader: one mask = one sample, caption = class name.

Released files (read as downloaded)::

    {root}/{split}-annotations-object-segmentation.csv
        MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks
        e.g. 0a1b..._m0k4j_3f9c2e1d.png,0a1b...,/m/0k4j,3f9c2e1d,0.12,0.55,0.30,0.81,0.86,
    {root}/{split}-masks-[0-9a-f].zip        # 16 zips, by the first hex digit of ImageID,
                                             # PNGs named by MaskPath at the zip's top level
    {root}/{split}/{ImageID}.jpg             # the images (or pass images_dir=)
    {root}/oidv7-class-descriptions.csv      # LabelName,DisplayName  (caption = DisplayName)

The mask PNGs are found, without settings, in any of these layouts (first hit wins):

* left in the zips: ``{root}/{split}-masks-{c}.zip`` (or inside ``{root}/{split}-masks/``);
* unzipped into one folder: ``{root}/{split}-masks/<MaskPath>``;
* unzipped into per-zip folders (what unzipping each zip into a folder of its own name gives):
  ``{root}/{split}-masks-{c}/<MaskPath>`` (or inside ``{root}/{split}-masks/``);
* FiftyOne's zoo downloader (``foz.load_zoo_dataset("open-images-v7", ...)``), with ``root``
  the zoo folder (``.../open-images-v7``, then ``{root}/{split}/``) or its split folder::

      {split dir}/data/{ImageID}.jpg
      {split dir}/labels/segmentations.csv          # the segmentation csv, renamed
      {split dir}/labels/masks/{C}/<MaskPath>       # C = ImageID[0].upper(), each zip extracted
      {split dir}/metadata/classes.csv              # class-descriptions-boxable.csv, no header

A mask that is in none of them is a ``missing_file`` whose detail lists every place looked
at; when no mask location exists at all the reader refuses to start with that list.
(``annotations/`` sub-folders are searched for the csvs too, and ``class-descriptions-boxable.csv``,
which has no header, is accepted.) Box coordinates are normalised to [0, 1]. A mask PNG
is binary (non-zero = object). When its size differs from the image's but the aspect ratio
is the same (up to whole-pixel rounding, :func:`~maskloop.data.sources.common.aspect_matches`)
it is resized to the image size with nearest-neighbour, with a warning (once per process;
``resized_masks`` counts them); when the aspect ratio differs too the mask cannot be this
image's and the sample is skipped and counted as ``mask_size``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import FileLRU, open_image
from ..robust import DataError, RobustDataset, SampleError
from ..transforms import SampleTransform
from .common import aspect_matches, default_transform, make_sample

logger = logging.getLogger("maskloop.data")

__all__ = ["OpenImagesDataset", "read_class_descriptions"]

_COLUMNS = ("MaskPath", "ImageID", "LabelName", "BoxID", "BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax",
            "PredictedIoU", "Clicks")
_CLASS_FILES = ("oidv7-class-descriptions.csv", "oidv6-class-descriptions.csv", "class-descriptions-boxable.csv",
                "class-descriptions.csv")


def read_class_descriptions(path: str | os.PathLike) -> dict[str, str]:
    """LabelName -> DisplayName from a class-descriptions csv (with or without header)."""
    out: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if len(row) >= 2 and row[0] != "LabelName":
                out[row[0]] = row[1]
    return out


def _first_existing(paths) -> Path | None:
    for p in paths:
        if p is not None and Path(p).exists():
            return Path(p)
    return None


class OpenImagesDataset(RobustDataset):
    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        annotations_csv: str | os.PathLike | None = None,
        masks_dir: str | os.PathLike | None = None,
        images_dir: str | os.PathLike | None = None,
        class_descriptions: str | os.PathLike | None = None,
        transform: SampleTransform | None = None,
        min_predicted_iou: float = 0.0,
        as_pair: bool = False,
        max_retries: int = 16,
        max_open_zips: int = 16,
        name: str = "openimages",
    ):
        super().__init__(max_retries=max_retries, as_pair=as_pair)
        self.name = name
        self.resized_masks = 0  # masks of another size but the same aspect ratio, resized (per process)
        self.transform = default_transform(transform)
        root = Path(root)
        self.split = split
        # FiftyOne's zoo layout: root is the split folder (labels/ inside) or the zoo folder ({split}/labels/)
        fo = next((d for d in (root, root / split) if (d / "labels" / "segmentations.csv").is_file()
                   or (d / "labels" / "masks").is_dir()), None)
        self._fiftyone_dir = fo
        csv_path = _first_existing([
            annotations_csv,
            root / f"{split}-annotations-object-segmentation.csv",
            root / "annotations" / f"{split}-annotations-object-segmentation.csv",
            fo / "labels" / "segmentations.csv" if fo else None,
        ])
        if csv_path is None:
            raise DataError(f"no {split}-annotations-object-segmentation.csv under {root} (or {root}/annotations, "
                            f"or FiftyOne's {root}/[{split}/]labels/segmentations.csv); pass annotations_csv=")
        meta = [fo / "metadata" / n for n in ("classes.csv",) + _CLASS_FILES] if fo else []
        cls_path = _first_existing([class_descriptions] + [root / n for n in _CLASS_FILES]
                                   + [root / "annotations" / n for n in _CLASS_FILES] + meta)
        if cls_path is None:
            raise DataError(f"no oidv7-class-descriptions.csv under {root}; pass class_descriptions= "
                            "(it maps LabelName to the DisplayName used as caption)")
        self.class_names = read_class_descriptions(cls_path)
        self.images_dir = Path(images_dir) if images_dir else (
            _first_existing(([fo / "data"] if fo else []) + [root / split, root / "images" / split]) or root / split)
        self.masks_dir = Path(masks_dir) if masks_dir else root / f"{split}-masks"
        self.root = root
        self._zips = FileLRU(max_open_zips, opener=zipfile.ZipFile)
        self._places: dict[str, tuple[list[Path], list[Path]]] = {}
        self._csv_name = csv_path.name
        if not any(p.exists() for c in "0123456789abcdef" for group in self._mask_places(c) for p in group):
            looked = [str(p) for group in self._mask_places("0") for p in group]
            raise DataError(f"no Open Images mask PNGs found for {root}: looked for (shown for digit 0, likewise "
                            f"1..f) {', '.join(looked)}; pass masks_dir= for another layout")

        self.items: list[tuple[str, str, str]] = []  # (MaskPath, ImageID, DisplayName)
        self._lines: list[int] = []
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or any(c not in header for c in _COLUMNS[:3]):
                raise DataError(f"{csv_path} does not have the V7 segmentation columns {','.join(_COLUMNS)}")
            col = {c: header.index(c) for c in _COLUMNS if c in header}
            for lineno, row in enumerate(reader, start=2):
                key = f"{self._csv_name}#line{lineno}"
                try:
                    mask_path, image_id, label = (row[col[c]] for c in ("MaskPath", "ImageID", "LabelName"))
                    iou = float(row[col["PredictedIoU"]]) if "PredictedIoU" in col and row[col["PredictedIoU"]] else 1.0
                    for c in ("BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax"):
                        if c in col:
                            float(row[col[c]])
                    if not mask_path.endswith(".png") or not image_id:
                        raise ValueError("MaskPath must be a .png and ImageID non-empty")
                except (IndexError, ValueError) as e:
                    self.record_bad("bad_csv", key, f"malformed row: {e}")
                    continue
                if label not in self.class_names:
                    self.record_bad("bad_csv", key, f"label {label} is not in {cls_path.name}")
                    continue
                if iou < min_predicted_iou:
                    continue
                self.items.append((mask_path, image_id, self.class_names[label]))
                self._lines.append(lineno)
        self.check_not_empty()

    def __len__(self) -> int:
        return len(self.items)

    def text_length(self, index: int) -> int:
        return len(self.items[index][2])

    def _image_path(self, image_id: str) -> str:
        return str(self.images_dir / f"{image_id}.jpg")

    def item_keys(self, index: int):
        mask_path, image_id, _ = self.items[index]
        return (self._image_path(image_id), mask_path)

    def _mask_places(self, c: str) -> tuple[list[Path], list[Path]]:
        """(folders, zips) that may hold the masks of images whose id starts with hex digit ``c``."""
        c = c.lower()
        if c not in self._places:
            sp, m, r = self.split, self.masks_dir, self.root
            dirs = [m, m / f"{sp}-masks-{c}", r / f"{sp}-masks-{c}"]
            zips = [m / f"{sp}-masks-{c}.zip", r / f"{sp}-masks-{c}.zip"]
            if self._fiftyone_dir is not None:
                fo = self._fiftyone_dir / "labels" / "masks"
                dirs += [fo / c.upper(), fo / c]
                zips += [fo / f"{c.upper()}.zip"]
            self._places[c] = (list(dict.fromkeys(dirs)), list(dict.fromkeys(zips)))
        return self._places[c]

    def _read_mask_bytes(self, mask_path: str) -> bytes:
        dirs, zips = self._mask_places(mask_path[0])
        for d in dirs:
            p = d / mask_path
            if p.is_file():
                return p.read_bytes()
        for z in zips:
            if z.is_file():
                try:
                    return self._zips.get(str(z)).read(mask_path)
                except KeyError:
                    continue
                except (zipfile.BadZipFile, OSError) as e:
                    raise SampleError("corrupt_mask", key=mask_path, detail=f"{z}: {e}") from e
        raise SampleError("missing_file", key=mask_path, detail="mask PNG not found; looked in "
                          + ", ".join(str(d) + "/" for d in dirs) + " and in the zips " + ", ".join(map(str, zips)))

    def load(self, index: int) -> dict:
        mask_path, image_id, caption = self.items[index]
        raw = self._read_mask_bytes(mask_path)
        try:
            with Image.open(io.BytesIO(raw)) as m:
                m.load()
                m = m if m.mode in ("1", "L", "P", "I", "I;16") else m.convert("L")
                mask_img = m.copy()
        except (OSError, SyntaxError, ValueError) as e:
            raise SampleError("corrupt_mask", key=mask_path, detail=f"cannot decode mask PNG: {e}") from e
        image, size = open_image(self._image_path(image_id), self.transform.draft_size)
        if mask_img.size != size:
            (mw, mh), (w, h) = mask_img.size, size
            if not aspect_matches(mask_img.size, size):
                raise SampleError("mask_size", key=mask_path, detail=f"mask PNG is {mw}x{mh} (w x h) but image {image_id} "
                                  f"is {w}x{h}: another aspect ratio, so it is not this image's mask")
            if not self.resized_masks:
                logger.warning("%s: mask PNG %s is %dx%d but image %s is %dx%d (same aspect ratio): resized with "
                               "nearest neighbour; further resized masks are not reported", self.name, mask_path,
                               mw, mh, image_id, w, h)
            self.resized_masks += 1
            mask_img = mask_img.resize(size, Image.Resampling.NEAREST)
        mask = np.asarray(mask_img) > 0
        sample = make_sample(self.transform, image, size, mask, mask_path)
        sample["caption"] = caption
        return sample

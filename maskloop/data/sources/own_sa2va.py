"""Own data in Sa2VA's fine-tuning format (data kind ``sa2va``), read as Sa2VA reads it.

Sa2VA's ``Sa2VAFinetuneDataset`` (projects/sa2va/datasets) is configured with
``data_root=ROOT, data_prefix=dict(img_path='images/'), ann_file='annotations.json'``::

    {root}/annotations.json
    {root}/images/<image>

``annotations.json`` is a list, one entry per image::

    [{"image": "0001.jpg",                                  # relative to images/
      "mask": [                                             # one entry per object ...
                [[x1, y1, x2, y2, ...], [x1, y1, ...]],     # ... a list of polygons (their union)
                ...],
      "text": ["the man in the red shirt", ...]},           # ... and its referring phrase
     ...]

As in Sa2VA each phrase is lower-cased and a final ``.`` is dropped. A segment may also be
a COCO RLE dict (``{"size": [h, w], "counts": ...}``). The format has no region captions:
use it with ``mode: masks`` (Loop 1) or ``mode: refer`` (referring SFT). An entry whose
``mask`` and ``text`` lists differ in length is a bad row (``bad_json``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..io import read_json_list
from ..robust import DataError
from ..transforms import SampleTransform
from .own_common import OwnDataset, Region

__all__ = ["OwnSa2VADataset", "sa2va_phrase"]


def sa2va_phrase(text: str) -> str:
    """Sa2VA's normalisation of a fine-tuning phrase: lower case, one final '.' dropped."""
    p = text.lower()
    return p[:-1] if p.endswith(".") else p


class OwnSa2VADataset(OwnDataset):
    def __init__(self, root: str | os.PathLike, mode: str = "masks", ann_file: str = "annotations.json",
                 image_dir: str | os.PathLike | None = None, transform: SampleTransform | None = None,
                 as_pair: bool = False, max_retries: int = 16, name: str = "sa2va"):
        super().__init__(mode, transform, as_pair, max_retries, name)
        if mode == "caption":
            raise ValueError("Sa2VA's fine-tuning format has no region captions: use mode masks or refer")
        root = Path(root)
        json_path = root if root.is_file() else root / ann_file
        if not json_path.is_file():
            raise DataError(f"Sa2VA annotations not found: {json_path} (the layout is ROOT/{ann_file} + ROOT/images/)")
        base = json_path.parent
        self.image_dir = Path(image_dir) if image_dir else base / "images"
        jkey = json_path.name
        items = read_json_list(json_path, "{image, mask, text} entries (Sa2VA's fine-tuning format)")
        for i, item in enumerate(items):
            key = f"{jkey}#{i}"
            try:
                image = item.get("image", item.get("img_path"))
                masks, texts = item["mask"], item["text"]
                if not isinstance(image, str) or not isinstance(masks, list) or not isinstance(texts, list):
                    raise TypeError("image must be a string, mask and text lists")
                if len(masks) != len(texts):
                    raise ValueError(f"{len(masks)} masks but {len(texts)} texts")
                phrases = [sa2va_phrase(str(t)) for t in texts]
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                self.record_bad("bad_json", key, f"malformed entry: {e}")
                continue
            path = str(self.image_dir / image)  # an absolute image path stays as it is
            for j, (segs, phrase) in enumerate(zip(masks, phrases)):
                self.add_region(Region(image=path, key=f"{key}/obj{j}", mask=("segments", segs),
                                       expressions=[phrase] if phrase.strip() else [],
                                       meta={"file_name": image}))
        self._finish_index()

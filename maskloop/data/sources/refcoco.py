"""RefCOCO / RefCOCO+ / RefCOCOg reader: one referring expression = one sample.

Released layout (the ``refer`` toolkit's data folder), read as is::

    {root}/{dataset}/refs({split_by}).p      # pickle: list of ref dicts
    {root}/{dataset}/instances.json          # COCO-style images / annotations / categories
    {root}/images/train2014/COCO_train2014_%012d.jpg   # or pass image_dir=

``dataset`` is ``refcoco``, ``refcoco+`` or ``refcocog``; ``split_by`` is ``unc`` (refcoco,
refcoco+), ``umd`` or ``google`` (refcocog); the default picks unc/unc/umd. A ref dict is
``{"ref_id", "ann_id", "image_id", "split": "train"|"val"|"testA"|"testB"|"test",
"sentences": [{"sent": str, "raw": str, "tokens": [...], "sent_id": int}], "sent_ids",
"category_id", "file_name"}``. Every sentence of every ref in the requested split is a
sample; the mask is the ref's annotation in ``instances.json`` (``segmentation`` as
polygons ``[[x1, y1, x2, y2, ...], ...]`` or, for crowd regions, a COCO RLE).

The refs file is a (Python 2) pickle; it is read with
:func:`maskloop.data.io.safe_load_pickle`, which refuses anything but plain data.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..io import UnsafePickleError, decode_segmentation, open_image, read_json, safe_load_pickle
from ..robust import DataError, RobustDataset, SampleError
from ..transforms import SampleTransform
from .common import default_transform, make_sample

__all__ = ["RefCOCODataset", "safe_load_pickle"]

_DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


class RefCOCODataset(RobustDataset):
    def __init__(
        self,
        root: str | os.PathLike,
        dataset: str = "refcoco",
        split_by: str | None = None,
        split: str = "train",
        image_dir: str | os.PathLike | None = None,
        transform: SampleTransform | None = None,
        as_pair: bool = False,
        max_retries: int = 16,
        name: str | None = None,
    ):
        super().__init__(max_retries=max_retries, as_pair=as_pair)
        if dataset not in _DEFAULT_SPLIT_BY:
            raise ValueError(f"dataset must be one of {sorted(_DEFAULT_SPLIT_BY)}, got {dataset!r}")
        split_by = split_by or _DEFAULT_SPLIT_BY[dataset]
        if split_by not in ("unc", "umd", "google"):
            raise ValueError(f"split_by must be 'unc', 'umd' or 'google', got {split_by!r}")
        self.name = name or dataset
        self.transform = default_transform(transform)
        self.split = split
        root = Path(root)
        refs_path = root / dataset / f"refs({split_by}).p"
        inst_path = root / dataset / "instances.json"
        for p in (refs_path, inst_path):
            if not p.exists():
                raise DataError(
                    f"RefCOCO file {p} not found: expected the refer-toolkit layout "
                    f"{{root}}/{dataset}/refs({split_by}).p and {{root}}/{dataset}/instances.json"
                )
        try:
            refs = safe_load_pickle(refs_path)
        except UnsafePickleError as e:
            raise DataError(f"{refs_path}: {e}") from e
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read {refs_path} ({type(e).__name__}: {e}); re-download the refs file") from e
        try:
            inst = read_json(inst_path)
            self._images = {int(im["id"]): im for im in inst["images"]}
            self._anns = {int(a["id"]): a for a in inst["annotations"]}
        except (SampleError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"cannot use {inst_path}: {e}; re-download instances.json") from e
        if not isinstance(refs, list):
            raise DataError(f"{refs_path} should hold a list of refs, found {type(refs).__name__}")

        self.image_dir = self._find_image_dir(root, image_dir)
        self.refs: list[dict] = []
        self.items: list[tuple[int, int]] = []
        for ref in refs:
            try:
                if ref.get("split") != split and split != "all":
                    continue
                sents = [s["sent"] for s in ref["sentences"]]
                int(ref["ann_id"]), int(ref["image_id"])
            except (AttributeError, KeyError, TypeError, ValueError):
                rid = ref.get("ref_id", "?") if isinstance(ref, dict) else "?"
                self.record_bad("bad_pickle", f"{refs_path}#ref{rid}", "ref lacks sentences/ann_id/image_id")
                continue
            r = len(self.refs)
            self.refs.append(ref)
            self.items.extend((r, k) for k in range(len(sents)))
        splits = sorted({str(r.get("split")) for r in refs if isinstance(r, dict)})
        if not self.items and not self._bad:
            raise DataError(f"{refs_path} has no refs in split {split!r}; available splits: {splits}")
        self.check_not_empty()

    @staticmethod
    def _find_image_dir(root: Path, image_dir) -> Path:
        if image_dir is not None:
            p = Path(image_dir)
            if not p.is_dir():
                raise DataError(f"image_dir {p} is not a folder; point it at the COCO train2014 images")
            return p
        candidates = [root / "images" / "train2014", root / "images" / "mscoco" / "images" / "train2014",
                      root / "train2014", root.parent / "train2014"]
        for c in candidates:
            if c.is_dir():
                return c
        raise DataError(
            "COCO train2014 images not found under " + ", ".join(str(c) for c in candidates[:2])
            + "; pass image_dir=/path/to/train2014"
        )

    def __len__(self) -> int:
        return len(self.items)

    def _paths(self, index: int) -> tuple[dict, str, dict, str, str]:
        r, k = self.items[index]
        ref = self.refs[r]
        ann_key = f"instances.json#ann{ref['ann_id']}"
        info = self._images.get(int(ref["image_id"]))
        if info is None:
            raise SampleError("bad_json", key=f"instances.json#image{ref['image_id']}", detail="image id not in instances.json")
        img_path = str(self.image_dir / info["file_name"])
        return ref, ref["sentences"][k]["sent"], info, img_path, ann_key

    def item_keys(self, index: int):
        r, _ = self.items[index]
        ref = self.refs[r]
        info = self._images.get(int(ref["image_id"]))
        img = str(self.image_dir / info["file_name"]) if info else ""
        return (img, f"instances.json#ann{ref['ann_id']}")

    def text_length(self, index: int) -> int:
        r, k = self.items[index]
        return len(self.refs[r]["sentences"][k]["sent"])

    def load(self, index: int) -> dict:
        ref, sent, info, img_path, ann_key = self._paths(index)
        ann = self._anns.get(int(ref["ann_id"]))
        if ann is None or "segmentation" not in ann:
            raise SampleError("bad_json", key=ann_key, detail="annotation missing from instances.json")
        try:
            mask = decode_segmentation(ann["segmentation"], int(info["height"]), int(info["width"]))
        except SampleError as e:
            e.key = ann_key
            raise
        image, size = open_image(img_path, self.transform.draft_size)
        sample = make_sample(self.transform, image, size, mask, ann_key)
        sample["caption"] = None
        sample["expression"] = str(sent)
        return sample

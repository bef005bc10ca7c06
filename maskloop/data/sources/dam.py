"""Describe Anything (DAM) region-caption reader: one region = one sample.

Released layout (the ``nvidia/describe-anything-dataset`` repository, one folder per split:
``SAV``, ``COCOStuff``, ``LVIS``, ``Mapillary``, ``OpenImages``, ``PACO``)::

    {root}/{SPLIT}/annotations.json
        {"<id>": {region} | [{region}, ...], ...}
        region = {"caption": str, "mask_rle": {"size": [h, w], "counts": str},
                  optional "img_id", "ann_id", "image" (file name), "tar_file" (shard name)}
    {root}/{SPLIT}/images/NNNNNNNN.tar       # webdataset shards: <id>.jpg + <id>.pickle
        <id>.pickle = pickled list of the image's region dicts (same fields)

The shards are indexed once: member name -> (offset, size) per shard is cached as JSON
(``{root}/{SPLIT}/images/.maskloop-index.json`` by default, ``cache_dir`` to put it
elsewhere; a shard whose size or mtime changed is re-scanned). Members are then read by
offset through a small per-process LRU of open shard files, so workers never share a
file handle. The mask comes from ``annotations.json`` (``mask_from="annotations"``,
falling back to the pickle when a region has no ``mask_rle``) or from the inner pickle
(``mask_from="pickle"``), which is read with the same restricted unpickler as RefCOCO's
refs (:func:`maskloop.data.io.safe_load_pickle`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from ..io import FileLRU, decode_segmentation, open_image, read_json, safe_load_pickle, scan_tar
from ..robust import DataError, RobustDataset, SampleError
from ..transforms import SampleTransform
from .common import default_transform, make_sample

__all__ = ["DAMDataset", "DAM_SPLITS"]

DAM_SPLITS = ("SAV", "COCOStuff", "LVIS", "Mapillary", "OpenImages", "PACO")
_INDEX_VERSION = 1


def _default_cache_file(images_dir: Path, cache_dir: str | os.PathLike | None) -> Path:
    tag = hashlib.sha1(str(images_dir.resolve()).encode()).hexdigest()[:12]
    if cache_dir is not None:
        return Path(cache_dir) / f"dam-{images_dir.parent.name}-{tag}.json"
    local = images_dir / ".maskloop-index.json"
    if os.access(images_dir, os.W_OK):
        return local
    return Path(os.environ.get("MASKLOOP_CACHE", Path.home() / ".cache" / "maskloop")) / f"dam-{tag}.json"


class DAMDataset(RobustDataset):
    def __init__(
        self,
        root: str | os.PathLike,
        splits: Sequence[str] | None = None,
        transform: SampleTransform | None = None,
        cache_dir: str | os.PathLike | None = None,
        mask_from: str = "annotations",
        as_pair: bool = False,
        max_retries: int = 16,
        max_open_tars: int = 8,
        name: str = "dam",
    ):
        super().__init__(max_retries=max_retries, as_pair=as_pair)
        if mask_from not in ("annotations", "pickle"):
            raise ValueError("mask_from must be 'annotations' or 'pickle'")
        self.name = name
        self.transform = default_transform(transform)
        self.mask_from = mask_from
        self._tars = FileLRU(max_open_tars)
        root = Path(root)
        if isinstance(splits, str):
            splits = [splits]
        if splits is None:
            splits = [p.name for p in sorted(root.iterdir()) if (p / "annotations.json").exists()] if root.is_dir() else []
            if not splits:
                raise DataError(f"no {{SPLIT}}/annotations.json under {root}; expected e.g. {root}/COCOStuff/annotations.json")
        self.splits = list(splits)
        self.root = root
        self._ann: list[dict] = []  # per split: id -> list of region dicts
        self._members: list[dict[str, dict[str, tuple[str, int, int]]]] = []  # id -> {"jpg"/"pickle": (shard, off, size)}
        self.items: list[tuple[int, str, int]] = []  # (split index, id, region index)
        for s, split in enumerate(self.splits):
            self._ann.append({})
            self._members.append({})
            split_dir = root / split
            if not split_dir.is_dir():
                raise DataError(f"DAM split folder {split_dir} does not exist (splits: {', '.join(DAM_SPLITS)})")
            try:
                ann = read_json(split_dir / "annotations.json", key=f"{split}/annotations.json")
                if not isinstance(ann, dict):
                    raise SampleError("bad_json", key=f"{split}/annotations.json", detail="expected an object id -> region(s)")
            except SampleError as e:
                self.record_bad(e.reason, f"{split}/annotations.json", e.detail)
                continue
            self._members[s] = self._index_shards(split_dir / "images", cache_dir)
            for img_id, regions in ann.items():
                regions = regions if isinstance(regions, list) else [regions]
                good = []
                for k, r in enumerate(regions):
                    if not isinstance(r, dict) or not isinstance(r.get("caption"), str):
                        self.record_bad("bad_json", f"{split}/annotations.json#{img_id}/{k}", "region lacks a caption")
                        good.append(None)
                        continue
                    good.append(r)
                if img_id not in self._members[s]:
                    hint = next((Path(r["image"]).stem for r in good if r and isinstance(r.get("image"), str)), None)
                    if hint in self._members[s]:
                        self._members[s][img_id] = self._members[s][hint]
                if "jpg" not in self._members[s].get(img_id, {}):
                    self.record_bad("missing_file", f"{split}/images/{img_id}.jpg", "not in any tar shard")
                    continue
                self._ann[s][img_id] = good
                self.items.extend((s, img_id, k) for k, r in enumerate(good) if r is not None)
        self.check_not_empty()

    # ---- shard index --------------------------------------------------------------------
    def _index_shards(self, images_dir: Path, cache_dir) -> dict[str, dict[str, tuple[str, int, int]]]:
        shards = sorted(images_dir.glob("*.tar")) if images_dir.is_dir() else []
        cache_file = _default_cache_file(images_dir, cache_dir)
        cached: dict = {}
        try:
            data = json.loads(cache_file.read_text())
            if data.get("version") == _INDEX_VERSION:
                cached = data.get("shards", {})
        except (OSError, ValueError, AttributeError):
            cached = {}
        shard_index, changed = {}, False
        for shard in shards:
            st = shard.stat()
            entry = cached.get(shard.name)
            if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
                shard_index[shard.name] = entry
                continue
            changed = True
            try:
                members = scan_tar(shard)
            except Exception as e:  # noqa: BLE001
                self.record_bad("corrupt_image", f"{images_dir.parent.name}/images/{shard.name}", f"cannot read shard: {e}")
                continue
            shard_index[shard.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                       "members": {k: list(v) for k, v in members.items()}}
        if changed or set(cached) != set(shard_index):
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps({"version": _INDEX_VERSION, "shards": shard_index}))
                os.replace(tmp, cache_file)
            except OSError:
                pass  # read-only and no cache dir: index again next time
        out: dict[str, dict[str, tuple[str, int, int]]] = {}
        for shard_name, entry in shard_index.items():
            path = str(images_dir / shard_name)
            for member, (off, size) in entry["members"].items():
                stem, _, ext = member.rpartition(".")
                if ext in ("jpg", "jpeg", "png", "pickle"):
                    out.setdefault(stem, {})["pickle" if ext == "pickle" else "jpg"] = (path, int(off), int(size))
        return out

    # ---- access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def text_length(self, index: int) -> int:
        s, img_id, k = self.items[index]
        return len(self._ann[s][img_id][k]["caption"])

    def _keys(self, index: int) -> tuple[str, str]:
        s, img_id, k = self.items[index]
        split = self.splits[s]
        shard = os.path.basename(self._members[s][img_id]["jpg"][0])
        return f"{split}/images/{shard}:{img_id}.jpg", f"{split}/annotations.json#{img_id}/{k}"

    def item_keys(self, index: int):
        return self._keys(index)

    def _pickle_mask(self, s: int, img_id: str, k: int, region: dict):
        split = self.splits[s]
        loc = self._members[s][img_id].get("pickle")
        key = f"{split}/images/{os.path.basename(loc[0]) if loc else '?'}:{img_id}.pickle"
        if loc is None:
            raise SampleError("missing_file", key=key, detail="no pickle for this id in the shards")
        try:
            regions = safe_load_pickle(self._tars.read(*loc))
        except Exception as e:  # noqa: BLE001 - refused or unreadable pickle
            raise SampleError("bad_pickle", key=key, detail=str(e)) from e
        regions = regions if isinstance(regions, list) else [regions]
        match = [r for r in regions if isinstance(r, dict) and "ann_id" in region and r.get("ann_id") == region["ann_id"]]
        r = match[0] if match else (regions[k] if k < len(regions) else None)
        if not isinstance(r, dict) or "mask_rle" not in r:
            raise SampleError("bad_pickle", key=key, detail="pickle has no mask_rle for this region")
        return r["mask_rle"]

    def load(self, index: int) -> dict:
        s, img_id, k = self.items[index]
        region = self._ann[s][img_id][k]
        img_key, region_key = self._keys(index)
        if self.mask_from == "annotations" and "mask_rle" in region:
            rle = region["mask_rle"]
        else:
            rle = self._pickle_mask(s, img_id, k, region)
        raw = self._tars.read(*self._members[s][img_id]["jpg"])
        image, size = open_image(raw, self.transform.draft_size, key=img_key)
        try:
            mask = decode_segmentation(rle, size[1], size[0])  # the RLE's size must be the image's
        except SampleError as e:
            e.key = region_key
            raise
        sample = make_sample(self.transform, image, size, mask, region_key)
        sample["caption"] = region["caption"].strip()
        return sample

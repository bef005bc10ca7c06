"""MeViS as released (henghuiding/MeViS): one folder per split (``train``, ``valid_u``, ``valid``)::

    <split>/JPEGImages/<video>/<frame>.jpg
    <split>/meta_expressions.json   {"videos": {<video>: {"vid_id": int, "frames": [<frame>, ...],
                                      "expressions": {<exp_id>: {"exp": str, "obj_id": [int, ...],
                                                                 "anno_id": [int, ...]}}}}}
    <split>/mask_dict.json          {str(anno_id): [COCO RLE or null, one per frame of the video]}

An expression's ground truth on frame ``t`` is the union of ``mask_dict[str(a)][t]`` over its
``anno_id`` (``null``: that object is absent from the frame), as MeViS's ``eval_mevis.py`` builds it;
frame ``t`` is the ``t``-th name of ``frames`` as listed.  ``valid`` has no ``mask_dict.json``: its
predictions go to the server (:func:`~maskloop.data.sources.rvos.write_submission_masks`).

Bad data is skipped and counted: an unparseable json (``bad_json``), an expression naming an anno id
that ``mask_dict`` lacks or whose mask list does not have one entry per frame (``bad_json``, at index
time), a missing frame folder (``missing_file``), a corrupt frame (``corrupt_image``) or RLE (``bad_rle``)
when read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import read_json
from ..robust import SampleError
from .rvos import Expression, RVOSDataset, decode_union


class MetaExpressionsDataset(RVOSDataset):
    """The ``meta_expressions`` + ``mask_dict`` format (MeViS; ReVOS uses it too)."""

    name = "mevis"

    def __init__(self, image_dir, meta_file, mask_file=None, clip_len: int | None = None, seed: int = 0,
                 group_of=None, max_retries: int = 16):
        super().__init__(clip_len=clip_len, seed=seed, max_retries=max_retries)
        self.image_dir = Path(image_dir)
        self.meta_file = Path(meta_file)
        if not self.meta_file.is_file():
            raise FileNotFoundError(f"{self.name}: expressions file not found: {self.meta_file}")
        self.mask_file = Path(mask_file) if mask_file else None
        self.has_masks = self.mask_file is not None
        self.mask_dict: dict = {}
        if self.has_masks:
            try:
                self.mask_dict = read_json(self.mask_file)
                if not isinstance(self.mask_dict, dict):
                    raise SampleError("bad_json", key=str(self.mask_file), detail="not a dict of anno ids")
            except SampleError as e:
                self.record_bad(e.reason, str(self.mask_file), e.detail)
                self._raise_unusable(f"its mask file {self.mask_file} cannot be read")
        try:
            videos = read_json(self.meta_file)["videos"]
        except SampleError as e:
            self.record_bad(e.reason, str(self.meta_file), e.detail)
            self._raise_unusable(f"its expressions file {self.meta_file} cannot be read")
        except (KeyError, TypeError):
            self.record_bad("bad_json", str(self.meta_file), "no 'videos' key")
            self._raise_unusable(f"{self.meta_file} has no 'videos'")
        group_of = group_of or (lambda exp: "all")
        for vid in sorted(videos):
            v = videos[vid]
            try:
                frames = list(v["frames"])
                exps = v["expressions"]
            except (KeyError, TypeError):
                self.record_bad("bad_json", f"{self.meta_file}#{vid}", "video entry lacks frames / expressions")
                continue
            for exp_id in sorted(exps, key=lambda s: (len(s), s)):
                ex = exps[exp_id]
                key = f"{self.meta_file}#{vid}/{exp_id}"
                try:
                    text, annos = str(ex["exp"]), [str(a) for a in ex["anno_id"]]
                except (KeyError, TypeError):
                    self.record_bad("bad_json", key, "expression lacks exp / anno_id")
                    continue
                if self.has_masks:
                    bad = [a for a in annos if not isinstance(self.mask_dict.get(a), list)
                           or len(self.mask_dict[a]) != len(frames)]
                    if bad:
                        self.record_bad("bad_json", key, f"anno ids {bad} missing from mask_dict or not one mask per frame")
                        continue
                self.expressions.append(Expression(vid, str(exp_id), text, frames, self.image_dir / vid,
                                                   group_of(ex), annos))
        self.check_not_empty()

    def gt_mask(self, e: Expression, t: int, size: tuple[int, int]) -> np.ndarray | None:
        if not self.has_masks:
            return None
        return decode_union([(f"{self.mask_file}#{a}/{t}", self.mask_dict[a][t]) for a in e.targets], size)


class MeViSDataset(MetaExpressionsDataset):
    """``MeViSDataset(root)`` with ``root`` a split folder (``.../mevis/valid_u``)."""

    name = "mevis"

    def __init__(self, root, clip_len: int | None = None, seed: int = 0, max_retries: int = 16):
        root = Path(root)
        mask = root / "mask_dict.json"
        super().__init__(root / "JPEGImages", root / "meta_expressions.json", mask if mask.is_file() else None,
                         clip_len=clip_len, seed=seed, max_retries=max_retries)


__all__ = ["MeViSDataset", "MetaExpressionsDataset"]

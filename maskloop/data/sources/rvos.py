"""What the referring-video readers share: the expression index, the clip sample, skip-and-count
iteration for evaluation, and the server submission layout.

A referring video *expression* is one text referring to one target (one or several objects) through a
whole video.  Readers (:mod:`.davis`, :mod:`.mevis`, :mod:`.revos`) build a list of
:class:`Expression` from their released files and answer two questions: the path of frame ``t`` and the
ground-truth mask of frame ``t`` (``None`` for splits released without masks).

Two ways to read:

* training: ``dataset[i]`` (the :class:`~maskloop.data.robust.RobustDataset` wrapper, bad samples
  skipped and counted) gives a **clip**: ``clip_len`` frames (all with ``clip_len=None``) as PIL images,
  their masks (T, H, W) bool, the expression and where it came from — the sample a video referring
  recipe consumes (frames + per-frame masks);
* evaluation: :meth:`RVOSDataset.iter_expressions` yields every readable expression once (an
  unreadable one is counted and left out, never replaced by another), frames and masks read lazily
  one frame at a time through :meth:`RVOSDataset.frame` / :meth:`RVOSDataset.gt_mask`.

Submission (MeViS ``valid``, ReVOS and Ref-YouTube-VOS style servers, and Sa2VA's ``--submit``):
``Annotations/<video>/<exp_id>/<frame>.png``, one 8-bit PNG per frame, 255 inside the mask, 0 outside,
zipped with :func:`zip_submission` (the archive holds ``<video>/<exp_id>/<frame>.png``).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ..io import decode_segmentation, open_image
from ..robust import RobustDataset, SampleError


@dataclass
class Expression:
    video: str
    exp_id: str
    text: str
    frame_names: list[str]  # in video order, without extension
    frame_dir: Path
    group: str = "all"  # the evaluation split it is reported under (annotator set, referring / reasoning)
    targets: list = field(default_factory=list)  # reader-specific: anno ids (MeViS / ReVOS), object id (DAVIS)
    ext: str = ".jpg"

    @property
    def key(self) -> str:
        return f"{self.video}/{self.exp_id}"

    def frame_path(self, t: int) -> Path:
        return self.frame_dir / f"{self.frame_names[t]}{self.ext}"


@dataclass
class Clip:
    """A training / evaluation clip: ``frames`` (T PIL RGB images), ``masks`` (T, H, W) bool or None."""

    frames: list
    masks: np.ndarray | None
    frame_indices: list[int]
    text: str
    key: str
    group: str = "all"


class RVOSDataset(RobustDataset):
    """Base of the referring video readers; subclasses fill ``self.expressions`` and :meth:`gt_mask`."""

    name = "rvos"
    has_masks = True

    def __init__(self, clip_len: int | None = None, seed: int = 0, max_retries: int = 16):
        super().__init__(max_retries=max_retries)
        self.clip_len = clip_len
        self.rng = np.random.default_rng(seed)
        self.expressions: list[Expression] = []

    def __len__(self) -> int:
        return len(self.expressions)

    def item_keys(self, index: int):
        return (str(self.expressions[index].frame_dir),)

    def text_length(self, index: int) -> int:
        return len(self.expressions[index].text)

    def groups(self) -> list[str]:
        return sorted({e.group for e in self.expressions})

    # ---- per frame ---------------------------------------------------------------------
    def frame(self, e: Expression, t: int) -> Image.Image:
        img, _ = open_image(e.frame_path(t))
        return img

    def gt_mask(self, e: Expression, t: int, size: tuple[int, int]) -> np.ndarray | None:
        """Ground truth of frame ``t`` as (H, W) bool (``size`` = (W, H) of the frame), None without masks."""
        raise NotImplementedError

    # ---- clips (training) --------------------------------------------------------------
    def clip_indices(self, e: Expression) -> list[int]:
        T = len(e.frame_names)
        if self.clip_len is None or self.clip_len >= T:
            return list(range(T))
        return sorted(self.rng.choice(T, self.clip_len, replace=False).tolist())

    def load(self, index: int) -> dict:
        e = self.expressions[index]
        idx = self.clip_indices(e)
        frames = [self.frame(e, t) for t in idx]
        masks = None
        if self.has_masks:
            masks = np.stack([self.gt_mask(e, t, frames[j].size) for j, t in enumerate(idx)])
        return {"clip": Clip(frames, masks, idx, e.text, e.key, e.group), "text": e.text, "key": e.key}

    # ---- evaluation --------------------------------------------------------------------
    def iter_expressions(self) -> Iterator[Expression]:
        """Every expression whose frame folder exists; the rest are counted (``missing_file``)."""
        for e in self.expressions:
            if not e.frame_dir.is_dir():
                self.record_bad("missing_file", str(e.frame_dir), "frame folder not found")
                continue
            if str(e.frame_dir) in self._bad:
                continue
            yield e


def decode_union(rles: list[tuple[str, object]], size: tuple[int, int]) -> np.ndarray:
    """Union of one frame's COCO RLEs, given as ``(key, rle)`` (``None``: the object is absent; ``key``
    names the RLE in errors) -> (H, W) bool."""
    w, h = size
    out = np.zeros((h, w), bool)
    for key, r in rles:
        if r is None:
            continue
        try:
            m = decode_segmentation(r, h, w)
        except SampleError as err:
            raise SampleError(err.reason, key=key, detail=err.detail) from None
        except Exception as err:  # noqa: BLE001 - a malformed RLE of any kind
            raise SampleError("bad_rle", key=key, detail=str(err)) from None
        out |= m
    return out


# ----------------------------------------------------------------------------------------------
# submission layout


def write_submission_masks(out_dir, video: str, exp_id: str, frame_names: list[str], masks) -> Path:
    """``out_dir/Annotations/<video>/<exp_id>/<frame>.png`` (255 = object) for each (H, W) bool mask."""
    d = Path(out_dir) / "Annotations" / video / exp_id
    d.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, m in zip(frame_names, masks):
        Image.fromarray(np.asarray(m, bool).astype(np.uint8) * 255).save(d / f"{name}.png")
        n += 1
    if n != len(frame_names):
        raise ValueError(f"{video}/{exp_id}: {n} masks for {len(frame_names)} frames")
    return d


def zip_submission(out_dir, zip_path=None) -> Path:
    """Zip ``out_dir/Annotations`` as the servers take it: ``<video>/<exp_id>/<frame>.png`` entries."""
    ann = Path(out_dir) / "Annotations"
    if not ann.is_dir():
        raise FileNotFoundError(f"{ann} not found: write the masks with write_submission_masks first")
    zip_path = Path(zip_path) if zip_path else Path(out_dir) / "submission.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for dirpath, _, files in sorted(os.walk(ann)):
            for f in sorted(files):
                p = Path(dirpath) / f
                z.write(p, p.relative_to(ann).as_posix())
    return zip_path


__all__ = ["Clip", "Expression", "RVOSDataset", "decode_union", "write_submission_masks", "zip_submission"]

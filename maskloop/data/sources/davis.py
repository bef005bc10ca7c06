"""Ref-DAVIS17: DAVIS 2017 (trainval, 480p) + the referring expressions of Khoreva et al. as released::

    DAVIS/JPEGImages/480p/<video>/00000.jpg ...
    DAVIS/Annotations/480p/<video>/00000.png ...     palette PNGs: pixel value = object id (0 background)
    DAVIS/ImageSets/2017/{train,val}.txt              one video name per line
    davis_text_annotations/Davis17_annot1.txt              (annotator 1, from the first frame)
    davis_text_annotations/Davis17_annot1_full_video.txt   (annotator 1, from the whole video)
    davis_text_annotations/Davis17_annot2.txt              (annotator 2; latin-1 encoded)
    davis_text_annotations/Davis17_annot2_full_video.txt

Each expression line is ``<video> <object id> "<expression>"``.  Three video names in the release are
misspelt and are mapped as the community's conversion does: ``clasic-car`` -> ``classic-car``,
``dog-scale`` -> ``dogs-scale``, ``motor-bike`` -> ``motorbike``.  The ground truth of an expression on
frame ``t`` is ``annotation == object id`` (DAVIS's void value 255 counts as background).  Expressions
are grouped by their file (``annot1``, ``annot1_full_video``, ``annot2``, ``annot2_full_video``):
Ref-DAVIS17 results are reported per annotator set and averaged.

Bad data is skipped and counted: a malformed expression line (``bad_csv``), a video named by an
expression but absent from the frames (``missing_file``), a corrupt frame (``corrupt_image``) or an
unreadable annotation PNG (``corrupt_mask``; missing: ``missing_file``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..robust import SampleError
from .rvos import Expression, RVOSDataset

ANNOTATION_FILES = {  # group -> (file name, encoding)
    "annot1": ("Davis17_annot1.txt", "utf-8"),
    "annot1_full_video": ("Davis17_annot1_full_video.txt", "utf-8"),
    "annot2": ("Davis17_annot2.txt", "latin-1"),
    "annot2_full_video": ("Davis17_annot2_full_video.txt", "latin-1"),
}
NAME_FIXES = {"clasic-car": "classic-car", "dog-scale": "dogs-scale", "motor-bike": "motorbike"}
_LINE = re.compile(r'(\S+)\s+(\d+)\s+"(.*)"\s*')


def parse_expression_line(line: str) -> tuple[str, int, str] | None:
    """``<video> <obj id> "<text>"`` -> (video, obj id, text); None for a malformed line."""
    m = _LINE.fullmatch(line.strip())
    if not m or not m.group(3).strip():
        return None
    return NAME_FIXES.get(m.group(1), m.group(1)), int(m.group(2)), m.group(3).strip()


class RefDAVISDataset(RVOSDataset):
    """``RefDAVISDataset(davis_root, split="val", text_dir=None)``; ``text_dir`` defaults to
    ``davis_text_annotations`` next to or inside ``davis_root``."""

    name = "refdavis"

    def __init__(self, davis_root, split: str = "val", text_dir=None, resolution: str = "480p",
                 clip_len: int | None = None, seed: int = 0, max_retries: int = 16):
        super().__init__(clip_len=clip_len, seed=seed, max_retries=max_retries)
        root = Path(davis_root)
        self.frames_root = root / "JPEGImages" / resolution
        self.ann_root = root / "Annotations" / resolution
        split_file = root / "ImageSets" / "2017" / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"refdavis: split file not found: {split_file} (is {root} the DAVIS folder?)")
        if text_dir is None:
            cands = [root / "davis_text_annotations", root.parent / "davis_text_annotations"]
            text_dir = next((c for c in cands if c.is_dir()), cands[0])
        text_dir = Path(text_dir)
        videos = [v.strip() for v in split_file.read_text().splitlines() if v.strip()]
        exps: dict[str, list[tuple[str, int, str]]] = {}
        found = 0
        for group, (fname, enc) in ANNOTATION_FILES.items():
            f = text_dir / fname
            if not f.is_file():
                continue
            found += 1
            for n, line in enumerate(f.read_text(encoding=enc, errors="replace").splitlines()):
                if not line.strip():
                    continue
                parsed = parse_expression_line(line)
                if parsed is None:
                    self.record_bad("bad_csv", f"{f}:{n + 1}", f"not '<video> <id> \"<text>\"': {line[:60]!r}")
                    continue
                exps.setdefault(parsed[0], []).append((group, parsed[1], parsed[2]))
        if not found:
            raise FileNotFoundError(f"refdavis: no Davis17_annot*.txt in {text_dir} (pass text_dir=)")
        for vid in videos:
            d = self.frames_root / vid
            if not d.is_dir():
                if vid in exps:
                    self.record_bad("missing_file", str(d), "frame folder not found")
                continue
            frames = sorted(p.stem for p in d.glob("*.jpg"))
            counter: dict[str, int] = {}
            for group, obj, text in sorted(exps.get(vid, []), key=lambda x: (x[1], list(ANNOTATION_FILES).index(x[0]))):
                i = counter.setdefault(group, 0)
                counter[group] += 1
                self.expressions.append(Expression(vid, f"{group}_{obj}_{i}", text, frames, d, group, [obj]))
        self.check_not_empty()

    def gt_mask(self, e: Expression, t: int, size: tuple[int, int]) -> np.ndarray:
        p = self.ann_root / e.video / f"{e.frame_names[t]}.png"
        try:
            with Image.open(p) as im:
                ann = np.asarray(im)  # palette indices (P mode) = object ids
        except FileNotFoundError:
            raise SampleError("missing_file", key=str(p), detail="annotation PNG not found") from None
        except Exception as err:  # noqa: BLE001
            raise SampleError("corrupt_mask", key=str(p), detail=str(err)) from None
        if ann.ndim != 2 or ann.shape != (size[1], size[0]):
            raise SampleError("corrupt_mask", key=str(p), detail=f"annotation {ann.shape} vs frame {size[::-1]}")
        return ann == e.targets[0]


__all__ = ["ANNOTATION_FILES", "NAME_FIXES", "RefDAVISDataset", "parse_expression_line"]

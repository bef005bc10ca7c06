"""Fixture for PSALM's cross-image region segmentation json, in the released layout.

PSALM's ``datasets/build_DAVIS.py`` turns DAVIS-2017 into one row per (first frame, later
frame) pair, the regions drawn on the first frame (the *prompt image*) and segmented in the
later one (the *target image*)::

    {root}/2017/trainval/JPEGImages/480p/<video>/00000.jpg ...
    {root}/2017/trainval/Annotations/480p/<video>/00000.png ...   (palette PNG, 0 = background)
    {root}/2017/trainval_val_psalm.json

    [{"image": "2017/trainval/JPEGImages/480p/<video>/00001.jpg",   # relative to {root}
      "image_info": {"file_name": <same>, "height": H, "width": W},
      "anns": [{"segmentation": {"counts": str, "size": [H, W]}, "area": float,
                "category_id": float (the object's palette index)}, ...],
      "first_frame_image": "2017/trainval/JPEGImages/480p/<video>/00000.jpg",
      "first_frame_anns": [same fields, on the first frame; only objects present in the target],
      "new_img_id": int, "video_name": str}, ...]

:func:`write_cross_image_psalm` writes that with synthetic videos: the shapes of one
synthetic scene drift a few pixels per frame.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .fixtures import _jpeg, _rle, synthetic_scene

__all__ = ["write_cross_image_psalm"]


def _palette_png(path: Path, ids: np.ndarray) -> None:
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    pal = [0, 0, 0] + [int(v) for i in range(1, 256) for v in ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)]
    im.putpalette(pal)
    im.save(path)


def write_cross_image_psalm(root, num_videos: int = 2, frames: int = 3, size: tuple[int, int] = (48, 64),
                            objects: int = 2, drift: int = 3, seed: int = 0, quality: int = 92) -> dict:
    """-> {"root", "json", "videos"}; ``json`` holds ``num_videos * (frames - 1)`` rows."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    rel_img, rel_ann = Path("2017/trainval/JPEGImages/480p"), Path("2017/trainval/Annotations/480p")
    rows, videos, new_id = [], [], 0
    for v in range(num_videos):
        name = f"video{v:02d}"
        videos.append(name)
        (root / rel_img / name).mkdir(parents=True, exist_ok=True)
        (root / rel_ann / name).mkdir(parents=True, exist_ok=True)
        img0, shapes = synthetic_scene(rng, h, w, objects)
        base = np.asarray(img0)
        masks0 = [s["mask"] for s in shapes]
        step = rng.integers(-drift, drift + 1, size=2)
        first_anns, first_rel = None, None
        for f in range(frames):
            dy, dx = int(step[0]) * f, int(step[1]) * f
            frame = np.roll(base, (dy, dx), (0, 1))
            ids = np.zeros((h, w), dtype=np.int64)
            for k, m in enumerate(masks0):
                ids[np.roll(m, (dy, dx), (0, 1))] = k + 1
            img_rel = rel_img / name / f"{f:05d}.jpg"
            (root / img_rel).write_bytes(_jpeg(Image.fromarray(frame), quality))
            _palette_png(root / rel_ann / name / f"{f:05d}.png", ids)
            anns = [{"segmentation": _rle(ids == k), "area": float((ids == k).sum()), "category_id": float(k)}
                    for k in np.unique(ids) if k != 0]
            if f == 0:
                first_anns, first_rel = anns, str(img_rel)
                continue
            present = {a["category_id"] for a in anns}
            rows.append({
                "image": str(img_rel), "image_info": {"file_name": str(img_rel), "height": h, "width": w},
                "anns": anns, "first_frame_image": first_rel,
                "first_frame_anns": [a for a in first_anns if a["category_id"] in present],
                "new_img_id": new_id, "video_name": name,
            })
            new_id += 1
    path = root / "2017" / "trainval_val_psalm.json"
    path.write_text(json.dumps(rows))
    return {"root": root, "json": path, "videos": videos}

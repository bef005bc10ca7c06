"""Tiny datasets in each source's *released* on-disk format, for tests and demos.

Every writer draws synthetic scenes (a flat background with a few coloured rectangles and
ellipses, one object per shape) and writes them exactly as the release lays them out
(file names, JSON keys, COCO RLE strings / polygons, pickles, tar shards, zips, mp4).
See each reader's module docstring for the format. :func:`corrupt_fraction` then damages
about ``frac`` of the units (images, videos, pair files) of a fixture, one damage per
unit, cycling through every kind of damage the format can suffer (truncated JPEG or mp4,
garbage JSON, invalid RLE, missing file, empty mask, ...), and returns a manifest
``[{"reason", "key", "unit"}]`` of what a reader should report.

Nothing here downloads anything.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "write_sa1b", "write_refcoco", "write_openimages", "write_dam", "write_sav", "corrupt_fraction",
    "synthetic_scene", "count_reasons",
]

_COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
    "purple": (150, 50, 180), "orange": (240, 140, 30), "cyan": (40, 200, 210), "white": (245, 245, 245),
}
_OI_CLASSES = {"/m/0k4j": "Car", "/m/01g317": "Person", "/m/0bt9lr": "Dog", "/m/01yrx": "Cat"}


# --------------------------------------------------------------------------------------
# Synthetic scenes and encoders
# --------------------------------------------------------------------------------------


def _shape_polygon(kind: str, box: tuple[float, float, float, float], n: int = 16) -> list[float]:
    x0, y0, x1, y1 = box
    if kind == "rectangle":
        pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    else:
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        pts = list(zip(cx + rx * np.cos(t), cy + ry * np.sin(t)))
    return [float(round(v, 2)) for p in pts for v in p]


def synthetic_scene(rng: np.random.Generator, height: int, width: int, num_shapes: int = 2):
    """-> (RGB PIL image, [dict(kind, color, polygon, mask (H, W) bool, caption)])."""
    bg = tuple(int(v) for v in rng.integers(60, 120, 3))
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    shapes = []
    names = list(_COLORS)
    for _ in range(num_shapes):
        kind = ("rectangle", "ellipse")[int(rng.integers(2))]
        color = names[int(rng.integers(len(names)))]
        bw, bh = rng.uniform(0.3, 0.6) * width, rng.uniform(0.3, 0.6) * height
        x0, y0 = rng.uniform(0, width - bw), rng.uniform(0, height - bh)
        poly = _shape_polygon(kind, (x0, y0, x0 + bw, y0 + bh))
        m = Image.new("L", (width, height), 0)
        ImageDraw.Draw(m).polygon(poly, fill=255)
        draw.polygon(poly, fill=_COLORS[color])
        mask = np.asarray(m) > 0
        for prev in shapes:  # later shapes occlude earlier ones
            prev["mask"] &= ~mask
        side = "left" if x0 + bw / 2 < width / 2 else "right"
        vert = "top" if y0 + bh / 2 < height / 2 else "bottom"
        shapes.append({"kind": kind, "color": color, "polygon": poly, "mask": mask,
                       "caption": f"A {color} {kind} in the {vert} {side} of the picture."})
    return img, shapes


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_util

    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------


def write_sa1b(root, num_images: int = 4, size: tuple[int, int] = (48, 64), anns_per_image: int = 2,
               as_tar: bool = False, images_per_tar: int = 4, seed: int = 0, quality: int = 90) -> dict:
    """SA-1B: ``sa_<id>.jpg`` + ``sa_<id>.json`` (folder) or ``sa_NNNNNN.tar`` shards.
    ``size`` is (height, width)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    files: list[tuple[str, bytes]] = []
    ann_id = 1
    for i in range(num_images):
        img_id = i + 1
        img, shapes = synthetic_scene(rng, h, w, anns_per_image)
        anns = []
        for s in shapes:
            x, y, bw, bh = _bbox(s["mask"])
            anns.append({
                "id": ann_id, "segmentation": _rle(s["mask"]), "area": int(s["mask"].sum()),
                "bbox": [x, y, bw, bh], "predicted_iou": 0.9, "point_coords": [[x + bw / 2, y + bh / 2]],
                "crop_box": [0.0, 0.0, float(w), float(h)], "stability_score": 0.95,
            })
            ann_id += 1
        meta = {"image": {"image_id": img_id, "width": w, "height": h, "file_name": f"sa_{img_id}.jpg"},
                "annotations": anns}
        files += [(f"sa_{img_id}.jpg", _jpeg(img, quality)), (f"sa_{img_id}.json", json.dumps(meta).encode())]
    if as_tar:
        per = 2 * images_per_tar
        for t, start in enumerate(range(0, len(files), per)):
            with tarfile.open(root / f"sa_{t:06d}.tar", "w") as tf:
                for name, data in files[start: start + per]:
                    _add_bytes(tf, name, data)
    else:
        for name, data in files:
            (root / name).write_bytes(data)
    return {"root": str(root), "num_images": num_images, "num_annotations": num_images * anns_per_image}


def write_refcoco(root, dataset: str = "refcoco", split_by: str | None = None, num_images: int = 4,
                  refs_per_image: int = 2, sentences_per_ref: int = 2, size: tuple[int, int] = (48, 64),
                  seed: int = 0) -> dict:
    """RefCOCO/+/g: ``{dataset}/refs({split_by}).p`` (protocol-2 pickle, as written by Python 2),
    ``{dataset}/instances.json`` and ``images/train2014/COCO_train2014_%012d.jpg``.
    The last ref of every image uses a crowd annotation stored as uncompressed RLE."""
    split_by = split_by or {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}[dataset]
    splits = ["train", "val", "test"] if dataset == "refcocog" else ["train", "val", "testA", "testB"]
    root = Path(root)
    (root / dataset).mkdir(parents=True, exist_ok=True)
    img_dir = root / "images" / "train2014"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    images, anns, refs = [], [], []
    ann_id, ref_id, sent_id = 100, 0, 0
    for i in range(num_images):
        image_id = 1000 + i
        fname = f"COCO_train2014_{image_id:012d}.jpg"
        img, shapes = synthetic_scene(rng, h, w, refs_per_image)
        img.save(img_dir / fname, quality=90)
        images.append({"id": image_id, "file_name": fname, "height": h, "width": w})
        split = splits[0] if i % 4 != 3 else splits[1 + (i // 4) % (len(splits) - 1)]
        for k, s in enumerate(shapes):
            crowd = k == len(shapes) - 1 and len(shapes) > 1
            if crowd:
                m = np.asfortranarray(s["mask"].astype(np.uint8)).reshape(-1, order="F")
                change = np.flatnonzero(np.diff(np.concatenate([[0], m, [1 - m[-1]]])))
                counts = np.diff(np.concatenate([[0], change])).tolist()
                seg = {"size": [h, w], "counts": [int(c) for c in counts]}  # uncompressed, column-major
            else:
                seg = [s["polygon"]]
            anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": seg,
                         "area": float(s["mask"].sum()), "bbox": _bbox(s["mask"]), "iscrowd": int(crowd)})
            sents = []
            for q in range(sentences_per_ref):
                text = f"the {s['color']} {s['kind']}" + (" on the " + ("left" if q % 2 else "right") if q else "")
                sents.append({"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text})
                sent_id += 1
            refs.append({"image_id": image_id, "split": split, "sentences": sents,
                         "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "category_id": 1,
                         "ann_id": ann_id, "sent_ids": [x["sent_id"] for x in sents], "ref_id": ref_id})
            ann_id += 1
            ref_id += 1
    inst = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "shape", "supercategory": "shape"}],
            "info": {}, "licenses": []}
    (root / dataset / "instances.json").write_text(json.dumps(inst))
    with open(root / dataset / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return {"root": str(root), "dataset": dataset, "split_by": split_by, "num_refs": len(refs),
            "num_sentences": sent_id, "splits": {s: sum(r["split"] == s for r in refs) for s in splits}}


def write_openimages(root, split: str = "train", num_images: int = 4, masks_per_image: int = 2,
                     size: tuple[int, int] = (48, 64), zipped: bool = False, seed: int = 0) -> dict:
    """Open Images V7: segmentation csv, mask PNGs (folder ``{split}-masks/`` or zips
    ``{split}-masks-{c}.zip``), ``{split}/{ImageID}.jpg``, ``oidv7-class-descriptions.csv``.
    Every other mask PNG is stored at half resolution (readers resize it to the image)."""
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    labels = list(_OI_CLASSES)
    rows, masks = [], []
    for i in range(num_images):
        image_id = f"{(i * 0x1f3a5b7 + 0x9c0ffee) & 0xffffffffffffffff:016x}"
        image_id = "0123456789abcdef"[i % 16] + image_id[1:]
        img, shapes = synthetic_scene(rng, h, w, masks_per_image)
        img.save(root / split / f"{image_id}.jpg", quality=90)
        for k, s in enumerate(shapes):
            label = labels[(i + k) % len(labels)]
            box_id = f"{(i * 31 + k * 7 + 0xabc) & 0xffffffff:08x}"
            mask_path = f"{image_id}_{label.replace('/', '')}_{box_id}.png"
            arr = s["mask"].astype(np.uint8) * 255
            if (i + k) % 2:
                arr = np.asarray(Image.fromarray(arr).resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.NEAREST))
            masks.append((mask_path, _png(arr)))
            x, y, bw, bh = _bbox(s["mask"])
            rows.append([mask_path, image_id, label, box_id, f"{x / w:.6f}", f"{(x + bw) / w:.6f}", f"{y / h:.6f}",
                         f"{(y + bh) / h:.6f}", "0.85", ""])
    header = "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks"
    (root / f"{split}-annotations-object-segmentation.csv").write_text(
        header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    (root / "oidv7-class-descriptions.csv").write_text(
        "LabelName,DisplayName\n" + "".join(f"{k},{v}\n" for k, v in _OI_CLASSES.items()))
    if zipped:
        by_zip: dict[str, list] = {}
        for name, data in masks:
            by_zip.setdefault(name[0], []).append((name, data))
        for c, items in by_zip.items():
            with zipfile.ZipFile(root / f"{split}-masks-{c}.zip", "w") as z:
                for name, data in items:
                    z.writestr(name, data)
    else:
        (root / f"{split}-masks").mkdir(exist_ok=True)
        for name, data in masks:
            (root / f"{split}-masks" / name).write_bytes(data)
    return {"root": str(root), "split": split, "num_masks": len(rows), "captions": [_OI_CLASSES[r[2]] for r in rows]}


def write_dam(root, splits: Sequence[str] = ("COCOStuff", "SAV"), num_images: int = 4, regions_per_image: int = 2,
              size: tuple[int, int] = (48, 64), images_per_shard: int = 3, seed: int = 0) -> dict:
    """DAM: ``{SPLIT}/annotations.json`` + ``{SPLIT}/images/NNNNNNNN.tar`` with ``<id>.jpg``
    and ``<id>.pickle`` (a pickled list of the image's region dicts). Even-numbered images'
    entries are lists of regions, odd ones a single region dict (first region only)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    total = 0
    for split in splits:
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        ann: dict = {}
        shards: dict[str, list] = {}
        for i in range(num_images):
            img_id = f"{i + 1:012d}"
            tar_name = f"{i // images_per_shard:08d}.tar"
            img, shapes = synthetic_scene(rng, h, w, regions_per_image)
            regions = [{"img_id": img_id, "ann_id": 500 + i * 10 + k, "image": f"{img_id}.jpg", "tar_file": tar_name,
                        "mask_rle": _rle(s["mask"]), "caption": s["caption"]} for k, s in enumerate(shapes)]
            if i % 2:
                regions = regions[:1]
            ann[img_id] = regions if i % 2 == 0 else regions[0]
            total += len(regions)
            shards.setdefault(tar_name, []).extend([(f"{img_id}.jpg", _jpeg(img)),
                                                   (f"{img_id}.pickle", pickle.dumps(regions, protocol=4))])
        for tar_name, members in shards.items():
            with tarfile.open(root / split / "images" / tar_name, "w") as tf:
                for name, data in members:
                    _add_bytes(tf, name, data)
        (root / split / "annotations.json").write_text(json.dumps(ann))
    return {"root": str(root), "splits": list(splits), "num_regions": total}


def _write_mp4(path: Path, frames: list[np.ndarray], fps: int = 24) -> None:
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        st = c.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = {"crf": "18", "preset": "ultrafast", "g": "8"}
        for arr in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)


def write_sav(root, num_videos: int = 2, size: tuple[int, int] = (48, 64), num_frames: int = 16,
              num_masklets: int = 2, auto: bool = True, seed: int = 0) -> dict:
    """SA-V: ``sav_<vid>.mp4`` (24 fps H.264) + ``sav_<vid>_manual.json`` (+ ``_auto.json``).
    Masklets are moving shapes annotated every 4th frame; masklet 1 is invisible in the
    first annotated frame (empty RLE), as objects that have not appeared yet are."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    names = list(_COLORS)
    n_annot = (num_frames + 3) // 4
    for v in range(num_videos):
        vid = f"sav_{v + 1:06d}"
        bg = rng.integers(60, 120, 3).astype(np.uint8)
        objs = []
        for j in range(num_masklets):
            bw, bh = rng.uniform(0.3, 0.45) * w, rng.uniform(0.3, 0.45) * h
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            vx, vy = rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5)
            objs.append((bw, bh, x0, y0, vx, vy, _COLORS[names[(v + j) % len(names)]]))
        frames, annot = [], []
        for t in range(num_frames):
            img = Image.new("RGB", (w, h), tuple(int(c) for c in bg))
            draw = ImageDraw.Draw(img)
            masks = []
            for j, (bw, bh, x0, y0, vx, vy, color) in enumerate(objs):
                visible = not (j == 1 and t < 4)
                x = float(np.clip(x0 + vx * t, 0, w - bw))
                y = float(np.clip(y0 + vy * t, 0, h - bh))
                m = Image.new("L", (w, h), 0)
                if visible:
                    draw.ellipse([x, y, x + bw, y + bh], fill=color)
                    ImageDraw.Draw(m).ellipse([x, y, x + bw, y + bh], fill=255)
                mask = np.asarray(m) > 0
                for prev in masks:
                    prev &= ~mask
                masks.append(mask.copy())
            frames.append(np.asarray(img))
            if t % 4 == 0:
                annot.append([_rle(m) for m in masks])
        _write_mp4(root / f"{vid}.mp4", frames)
        base = {"video_id": vid, "video_duration": num_frames / 24, "video_frame_count": num_frames,
                "video_height": h, "video_width": w, "video_resolution": h * w, "video_environment": "Indoor",
                "video_split": "train"}
        ids = list(range(num_masklets))
        manual = dict(base, masklet=annot, masklet_id=ids, masklet_num=num_masklets,
                      masklet_first_appeared_frame=[0 if j != 1 else 1 for j in ids],
                      masklet_frame_count=[n_annot] * num_masklets, masklet_edited_frame_count=[1] * num_masklets,
                      masklet_type=["manual"] * num_masklets, masklet_size_bucket=["medium"] * num_masklets)
        (root / f"{vid}_manual.json").write_text(json.dumps(manual))
        if auto:
            auto_d = dict(base, masklet=[f[:1] for f in annot], masklet_id=[0], masklet_num=1,
                          masklet_type=["auto"], masklet_stability_score=[[0.95] * n_annot])
            (root / f"{vid}_auto.json").write_text(json.dumps(auto_d))
    return {"root": str(root), "num_videos": num_videos, "num_annotated_frames": n_annot}


# --------------------------------------------------------------------------------------
# Corruption
# --------------------------------------------------------------------------------------

_MODES = {
    "sa1b": ("corrupt_image", "bad_json", "bad_rle", "missing_file", "empty_mask"),
    "refcoco": ("corrupt_image", "missing_file", "bad_rle", "empty_mask"),
    "openimages": ("corrupt_image", "missing_file", "missing_mask", "corrupt_mask", "empty_mask", "bad_csv"),
    "dam": ("corrupt_image", "missing_file", "bad_rle", "empty_mask"),
    "sav": ("bad_video", "missing_file", "bad_json", "bad_rle"),
    "sav_pairs": ("bad_npz", "corrupt_image", "bad_rle", "empty_mask"),
}


def _truncate(data: bytes) -> bytes:
    return data[: max(16, len(data) // 2)]


def _bad_counts(counts: str, mode: str = "bad_rle") -> str:
    """A damaged compressed ``counts`` string (all are skipped as ``bad_rle``):

    * ``bad_rle``: two extra positive runs, the runs sum to more than h*w;
    * ``rle_truncated``: a last character that still carries the continuation bit (0x20),
      the string ends inside a run (pycocotools' C parser would read past its end);
    * ``rle_short``: the last run one pixel shorter (or dropped), the runs sum to less than
      h*w (pycocotools would leave pixels uninitialised).
    """
    if mode == "rle_truncated":
        return counts + chr(48 + 0x20)
    if mode == "rle_short":
        from .io import rle_counts

        runs = rle_counts(counts)
        runs = runs[:-1] + [runs[-1] - 1] if runs[-1] > 1 else runs[:-1]
        return encode_counts(runs)
    return counts + "55"


def encode_counts(runs: Sequence[int]) -> str:
    """Run lengths -> compressed COCO ``counts`` string (the format pycocotools writes):
    from the fourth run on the difference to the run two before, each value in 5-bit
    groups, least significant first, ``0x20`` on all but the last, the sign in ``0x10``."""
    out = []
    for i, r in enumerate(runs):
        x = int(r) - (int(runs[i - 2]) if i > 2 else 0)
        while True:
            g = x & 0x1F
            x >>= 5
            last = (x == -1) if (g & 0x10) else (x == 0)
            out.append(chr(48 + (g if last else g | 0x20)))
            if last:
                break
    return "".join(out)


def _empty_rle(rle: dict) -> dict:
    return _rle(np.zeros(tuple(rle["size"]), bool))


def _pick(units: list, frac: float, seed: int, modes: Sequence[str]) -> list[tuple[object, str]]:
    rng = np.random.default_rng(seed)
    n = min(len(units), max(1, int(round(frac * len(units)))))
    chosen = sorted(rng.choice(len(units), size=n, replace=False).tolist())
    return [(units[c], modes[k % len(modes)]) for k, c in enumerate(chosen)]


def _rewrite_tar(path: Path, edit) -> None:
    """Rewrite a tar; ``edit(name, data)`` returns new bytes or None to drop the member."""
    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            new = edit(name, data)
            if new is not None:
                _add_bytes(tf, name, new)


def corrupt_fraction(root, kind: str, frac: float = 0.3, seed: int = 0, modes: Sequence[str] | None = None,
                     split: str = "train", dataset: str = "refcoco", split_by: str | None = None) -> list[dict]:
    """Damage ~``frac`` of the units of a fixture written by this module (in place).

    ``kind``: ``sa1b`` (folder or tar), ``refcoco``, ``openimages`` (folder or zipped),
    ``dam``, ``sav``, ``sav_pairs``. One damage per chosen unit, cycling through ``modes``
    (default: every damage the format can suffer, see ``_MODES``). Returns the manifest
    ``[{"unit", "reason", "key"}]``; ``reason`` is the skip reason a reader must count
    (``missing_mask`` is reported as ``missing_file``). Extra RLE damage for ``sa1b``,
    ``dam``, ``sav``, ``sav_pairs`` (reported as ``bad_rle``, see :func:`_bad_counts`):
    ``rle_truncated`` (a last character with the continuation bit) and ``rle_short`` (runs
    summing to less than h*w).
    """
    if kind not in _MODES:
        raise ValueError(f"kind must be one of {sorted(_MODES)}")
    modes = tuple(modes or _MODES[kind])
    root = Path(root)
    out: list[dict] = []

    def note(unit, mode, key):
        reason = {"missing_mask": "missing_file", "rle_truncated": "bad_rle", "rle_short": "bad_rle"}.get(mode, mode)
        out.append({"unit": str(unit), "reason": reason, "key": str(key)})

    if kind == "sa1b":
        tars = sorted(root.rglob("sa_*.tar"))
        if tars:
            units = [(t, n[:-5]) for t in tars for n in sorted(_tar_names(t)) if n.endswith(".json")]
        else:
            units = [(None, str(p)[:-5]) for p in sorted(root.rglob("sa_*.json"))]
        for (tar, stem), mode in _pick(units, frac, seed, modes):
            def edit(name, data, stem=stem, mode=mode):
                if name == stem + ".jpg":
                    return None if mode == "missing_file" else _truncate(data) if mode == "corrupt_image" else data
                if name == stem + ".json":
                    if mode == "bad_json":
                        return b'{"image": {"width": 3, garbage'
                    if mode in ("bad_rle", "rle_truncated", "rle_short", "empty_mask"):
                        d = json.loads(data)
                        seg = d["annotations"][0]["segmentation"]
                        if mode != "empty_mask":
                            seg["counts"] = _bad_counts(seg["counts"], mode)
                        else:
                            d["annotations"][0]["segmentation"] = _empty_rle(seg)
                        return json.dumps(d).encode()
                return data
            if tar is not None:
                _rewrite_tar(tar, edit)
            else:
                for ext in (".jpg", ".json"):
                    p = Path(stem + ext)
                    new = edit(stem + ext, p.read_bytes())
                    if new is None:
                        p.unlink()
                    else:
                        p.write_bytes(new)
            note(stem, mode, stem + (".json" if mode == "bad_json" else ".jpg"))

    elif kind == "refcoco":
        inst_path = root / dataset / "instances.json"
        inst = json.loads(inst_path.read_text())
        refs = pickle.loads((root / dataset / f"refs({split_by or ('umd' if dataset == 'refcocog' else 'unc')}).p")
                            .read_bytes())
        anns = {a["id"]: a for a in inst["annotations"]}
        img_dir = root / "images" / "train2014"
        units = [im for im in inst["images"]]
        for im, mode in _pick(units, frac, seed, modes):
            p = img_dir / im["file_name"]
            if mode == "corrupt_image":
                p.write_bytes(_truncate(p.read_bytes()))
            elif mode == "missing_file":
                p.unlink()
            else:  # damage the polygon annotation of the image's first ref
                ref = next(r for r in refs if r["image_id"] == im["id"])
                a = anns[ref["ann_id"]]
                if mode == "bad_rle":
                    a["segmentation"] = [[1.0, 2.0, 3.0]]  # too few coordinates
                else:
                    a["segmentation"] = [[5.0, 5.0, 5.0, 5.0, 5.0, 5.0]]  # zero-area polygon
            note(im["file_name"], mode, p if mode in ("corrupt_image", "missing_file") else f"ann{a['id']}")
        inst_path.write_text(json.dumps(inst))

    elif kind == "openimages":
        csv_path = root / f"{split}-annotations-object-segmentation.csv"
        lines = csv_path.read_text().splitlines()
        rows = [ln.split(",") for ln in lines[1:]]
        image_ids = sorted({r[1] for r in rows})
        zips = {p.name[-5]: p for p in root.glob(f"{split}-masks-*.zip")}
        mask_edits: dict[str, object] = {}
        for image_id, mode in _pick(image_ids, frac, seed, modes):
            img = root / split / f"{image_id}.jpg"
            first = next(k for k, r in enumerate(rows) if r[1] == image_id)
            mask_name = rows[first][0]
            if mode == "corrupt_image":
                img.write_bytes(_truncate(img.read_bytes()))
            elif mode == "missing_file":
                img.unlink()
            elif mode == "bad_csv":
                for r in rows:
                    if r[1] == image_id:
                        r[8] = "not-a-number"
            else:
                mask_edits[mask_name] = mode
            if mode == "bad_csv":
                for k, r in enumerate(rows):
                    if r[1] == image_id:
                        note(image_id, mode, f"line{k + 2}")
                continue
            note(image_id, mode, img if mode in ("corrupt_image", "missing_file") else mask_name)
        csv_path.write_text(lines[0] + "\n" + "".join(",".join(r) + "\n" for r in rows))

        def edit_mask(data: bytes, mode) -> bytes | None:
            if mode == "missing_mask":
                return None
            if mode == "corrupt_mask":
                return b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 4
            arr = np.asarray(Image.open(io.BytesIO(data)))
            return _png(np.zeros_like(arr))

        for name, mode in mask_edits.items():
            if zips:
                z = zips[name[0]]
                with zipfile.ZipFile(z) as zf:
                    members = [(n, zf.read(n)) for n in zf.namelist()]
                with zipfile.ZipFile(z, "w") as zf:
                    for n, data in members:
                        new = edit_mask(data, mode) if n == name else data
                        if new is not None:
                            zf.writestr(n, new)
            else:
                p = root / f"{split}-masks" / name
                new = edit_mask(p.read_bytes(), mode)
                if new is None:
                    p.unlink()
                else:
                    p.write_bytes(new)

    elif kind == "dam":
        for split_dir in sorted(p.parent for p in root.glob("*/annotations.json")):
            ann_path = split_dir / "annotations.json"
            ann = json.loads(ann_path.read_text())
            tar_edits: dict[str, dict[str, str]] = {}
            for img_id, mode in _pick(sorted(ann), frac, seed, modes):
                regions = ann[img_id] if isinstance(ann[img_id], list) else [ann[img_id]]
                r0 = regions[0]
                if mode in ("corrupt_image", "missing_file"):
                    tar_edits.setdefault(r0["tar_file"], {})[f"{img_id}.jpg"] = mode
                elif mode in ("bad_rle", "rle_truncated", "rle_short"):
                    r0["mask_rle"]["counts"] = _bad_counts(r0["mask_rle"]["counts"], mode)
                else:
                    r0["mask_rle"] = _empty_rle(r0["mask_rle"])
                note(f"{split_dir.name}/{img_id}", mode, f"{split_dir.name}/{img_id}")
            ann_path.write_text(json.dumps(ann))
            for tar_name, edits in tar_edits.items():
                _rewrite_tar(split_dir / "images" / tar_name,
                             lambda n, d, e=edits: d if n not in e else (None if e[n] == "missing_file" else _truncate(d)))

    elif kind == "sav":
        units = sorted(root.rglob("sav_*_manual.json"))
        for jp, mode in _pick(units, frac, seed, modes):
            mp4 = Path(str(jp).replace("_manual.json", ".mp4"))
            if mode == "bad_video":
                mp4.write_bytes(_truncate(mp4.read_bytes()))
            elif mode == "missing_file":
                mp4.unlink()
            elif mode == "bad_json":
                jp.write_text('{"masklet": [[{"size": [2, 2], "counts": ')
            else:
                d = json.loads(jp.read_text())
                frame = next(k for k, f in enumerate(d["masklet"]) if _rle_area(f[0]) > 0)
                d["masklet"][frame][0]["counts"] = _bad_counts(d["masklet"][frame][0]["counts"], mode)
                jp.write_text(json.dumps(d))
            note(jp.name, mode, mp4 if mode in ("bad_video", "missing_file") else jp)

    elif kind == "sav_pairs":
        units = sorted(root.rglob("*.npz"))
        for p, mode in _pick(units, frac, seed, modes):
            if mode == "bad_npz":
                p.write_bytes(_truncate(p.read_bytes()))
            else:
                with np.load(p, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
                if mode == "corrupt_image":
                    arrays["image1"] = np.frombuffer(_truncate(arrays["image1"].tobytes()), np.uint8)
                elif mode in ("bad_rle", "rle_truncated", "rle_short"):
                    arrays["mask1"] = np.array(_bad_counts(str(arrays["mask1"]), mode))
                else:
                    h, w = (int(x) for x in arrays["size"])
                    arrays["mask1"] = np.array(_empty_rle({"size": [h, w]})["counts"])
                with open(p, "wb") as f:
                    np.savez(f, **arrays)
            note(p.name, mode, p)
    return out


def _tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return [m.name for m in tf if m.isfile()]


def _rle_area(rle: dict) -> int:
    from .io import rle_area

    return rle_area(rle)


def count_reasons(manifest: list[dict]) -> dict[str, int]:
    """``{reason: n}`` of a corruption manifest (what a reader's skip counts should show)."""
    out: dict[str, int] = {}
    for m in manifest:
        out[m["reason"]] = out.get(m["reason"], 0) + 1
    return out



# --------------------------------------------------------------------------------------
# PSALM formats: COCO panoptic, COCO instances, COCO-Interactive (and a shapes-world mix)
# --------------------------------------------------------------------------------------

_PSALM_THINGS = [{"id": 1, "name": "rectangle", "supercategory": "shape", "isthing": 1},
                 {"id": 2, "name": "ellipse", "supercategory": "shape", "isthing": 1}]
_PSALM_STUFF = [{"id": 3, "name": "background", "supercategory": "stuff", "isthing": 0}]


def _id_rgb(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def _visual_prompts(mask: np.ndarray, rng: np.random.Generator) -> dict:
    """PSALM-style visual-prompt RLEs of one object mask: a point pixel, a diagonal scribble,
    a filled box and the mask itself (as ``bulid_COCO_Interactivate.py`` stores them)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    point = np.zeros_like(mask, dtype=bool)
    k = int(rng.integers(len(ys)))
    point[ys[k], xs[k]] = True
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    box = np.zeros_like(mask, dtype=bool)
    box[y0:y1 + 1, x0:x1 + 1] = True
    n = int(max(y1 - y0, x1 - x0)) + 1
    scribble = np.zeros_like(mask, dtype=bool)
    scribble[np.linspace(y0, y1, n).round().astype(int), np.linspace(x0, x1, n).round().astype(int)] = True
    return {f"{t}_visual_prompt_mask": _rle(m) for t, m in
            (("point", point), ("scribble", scribble), ("box", box), ("mask", mask))}


def _write_coco_psalm(root: Path, split: str, scenes: list, categories: list[dict], void_border: int,
                      crowd_first: bool, seed: int, quality: int) -> dict:
    """scenes: [(image (H, W, 3) uint8, [(category_id, mask (H, W) bool, polygon or None)])]."""
    rng = np.random.default_rng(seed)
    img_dir, png_dir, ann_dir = root / split, root / f"panoptic_{split}", root / "annotations"
    for d in (img_dir, png_dir, ann_dir):
        d.mkdir(parents=True, exist_ok=True)
    stuff = [c for c in categories if not c.get("isthing", 1)]
    images, pan_anns, inst_anns, interactive = [], [], [], []
    ann_id = 1
    for i, (img, objects) in enumerate(scenes):
        h, w = img.shape[:2]
        image_id = i + 1
        file_name = f"{image_id:012d}.jpg"
        (img_dir / file_name).write_bytes(_jpeg(Image.fromarray(img), quality))
        info = {"id": image_id, "file_name": file_name, "height": h, "width": w}
        images.append(info)
        ids = np.zeros((h, w), dtype=np.int64)
        segments, anns = [], []
        for k, (cat, mask, poly) in enumerate(objects):
            sid = 1 + k + 10 * image_id
            crowd = int(crowd_first and k == 0 and i == 0)
            ids[mask] = sid
            segments.append({"id": sid, "category_id": cat, "iscrowd": crowd, "bbox": _bbox(mask),
                             "area": int(mask.sum())})
            # crowd regions come as uncompressed RLE in COCO, the others as polygons
            seg = _uncompressed_rle(mask) if crowd else (_rle(mask) if poly is None else [poly])
            a = {"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": seg,
                 "area": float(mask.sum()), "bbox": _bbox(mask), "iscrowd": crowd}
            inst_anns.append(a)
            if not crowd:
                anns.append({**a, **_visual_prompts(mask, rng)})
            ann_id += 1
        if stuff:
            rest = ids == 0
            if void_border:
                rest[:void_border] = rest[-void_border:] = False
                rest[:, :void_border] = rest[:, -void_border:] = False
            sid = 10 * image_id + 9
            ids[rest] = sid
            segments.append({"id": sid, "category_id": stuff[0]["id"], "iscrowd": 0, "bbox": _bbox(rest),
                             "area": int(rest.sum())})
        png = f"{image_id:012d}.png"
        (png_dir / png).write_bytes(_png(_id_rgb(ids)))
        pan_anns.append({"image_id": image_id, "file_name": png, "segments_info": segments})
        interactive.append({"image": file_name, "image_info": info, "new_img_id": i, "anns": anns})
    pan_json = ann_dir / f"panoptic_{split}.json"
    inst_json = ann_dir / f"instances_{split}.json"
    inter_json = root / f"coco_interactive_{split.removesuffix('2017')}_psalm.json"  # PSALM's name
    pan_json.write_text(json.dumps({"images": images, "annotations": pan_anns, "categories": categories}))
    inst_json.write_text(json.dumps({"images": images, "annotations": inst_anns,
                                     "categories": [c for c in categories if c.get("isthing", 1)]}))
    inter_json.write_text(json.dumps(interactive))
    return {"root": root, "images": img_dir, "panoptic_json": pan_json, "panoptic_pngs": png_dir,
            "instances_json": inst_json, "interactive_json": inter_json}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths, starting with zeros)."""
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": [int(r) for r in runs]}


def write_coco_psalm(root, split: str = "val2017", num_images: int = 3, size: tuple[int, int] = (48, 64),
                     shapes_per_image: int = 2, void_border: int = 1, crowd: bool = False, seed: int = 0,
                     quality: int = 90) -> dict:
    """The three PSALM COCO formats for the same synthetic scenes, under ``root``::

        root/annotations/panoptic_{split}.json + root/panoptic_{split}/*.png   (COCO panoptic)
        root/annotations/instances_{split}.json                               (COCO instances)
        root/coco_interactive_{train|val}_psalm.json                          (COCO-Interactive)
        root/{split}/*.jpg

    Things ``rectangle`` (1) / ``ellipse`` (2) are polygons; the rest of the image is the stuff
    segment ``background`` (3) except a ``void_border``-pixel void frame. ``crowd``: the first
    object of the first image is a crowd segment (uncompressed RLE in instances). Returns the paths.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    scenes = []
    for _ in range(num_images):
        img, shapes = synthetic_scene(rng, h, w, shapes_per_image)
        objects = [(1 if s["kind"] == "rectangle" else 2, s["mask"], s["polygon"]) for s in shapes if s["mask"].any()]
        scenes.append((np.asarray(img), objects))
    return _write_coco_psalm(root, split, scenes, _PSALM_THINGS + _PSALM_STUFF, void_border, crowd, seed, quality)


def write_coco_panoptic(root, **kwargs) -> dict:
    """COCO panoptic fixture (see :func:`write_coco_psalm`, which writes all three formats)."""
    return write_coco_psalm(root, **kwargs)


def write_coco_instances(root, **kwargs) -> dict:
    """COCO instances fixture (see :func:`write_coco_psalm`)."""
    return write_coco_psalm(root, **kwargs)


def write_coco_interactive(root, **kwargs) -> dict:
    """COCO-Interactive fixture (see :func:`write_coco_psalm`)."""
    return write_coco_psalm(root, **kwargs)


def write_shapes_psalm(root, n: int = 8, seed: int | str = "train", image_size: int = 64,
                       split: str = "train2017") -> dict:
    """The shapes world in every PSALM training format: COCO panoptic / instances /
    COCO-Interactive under ``root/coco`` (things ``circle`` / ``square`` / ``triangle``, stuff
    ``background``) and RefCOCO (refer-toolkit layout, split ``train``) under ``root/refer``,
    all of the same ``n`` scenes (those of :func:`maskloop.data.sources.shapes.write_shapes_as`).
    """
    from maskloop.data.sources import shapes

    root = Path(root)
    s = shapes.SPLIT_SEEDS[seed] if isinstance(seed, str) else int(seed)
    cats = [{"id": i + 1, "name": name, "supercategory": "shape", "isthing": 1} for i, name in enumerate(shapes.SHAPES)]
    cats.append({"id": len(cats) + 1, "name": "background", "supercategory": "stuff", "isthing": 0})
    scenes = []
    for i in range(n):
        sc = shapes.make_scene(np.random.default_rng([s, i, 0]), image_size)
        objects = [(shapes.SHAPES.index(o.shape) + 1, m, shapes.shape_polygon(o)) for o, m in zip(sc.objects, sc.masks)]
        scenes.append((sc.image, objects))
    out = _write_coco_psalm(root / "coco", split, scenes, cats, 0, False, s % (2**31), 95)
    out.update({f"refer_{k}": v for k, v in shapes.write_shapes_as("refcoco", root / "refer", n, seed=seed,
                                                                   image_size=image_size).items()})
    out["coco_root"], out["split"] = root / "coco", split
    return out


__all__ += ["write_coco_psalm", "write_coco_panoptic", "write_coco_instances", "write_coco_interactive",
            "write_shapes_psalm"]


# referring-video datasets (MeViS, ReVOS, Ref-DAVIS17) live in their own module
from .video_fixtures import moving_objects, write_mevis, write_ref_davis, write_revos  # noqa: E402,F401

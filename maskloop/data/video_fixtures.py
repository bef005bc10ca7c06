"""Tiny referring-video datasets in the released layouts of MeViS, ReVOS and Ref-DAVIS17.

Each video shows moving coloured shapes on a flat background (one object per shape); expressions name
them by colour and kind.  ``corrupt=True`` damages a known set of items and the writer's return value
lists what a reader must count (``{"reason": n}`` in ``expected_skips``) and the expressions that stay
readable (``expected_expressions``).  Re-exported by :mod:`maskloop.data.fixtures`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
_KINDS = ("rectangle", "ellipse")


def moving_objects(rng: np.random.Generator, num_frames: int, size: tuple[int, int], num_objects: int = 2):
    """-> (frames: T RGB PIL images, masks (n_obj, T, H, W) bool, names ["red ellipse", ...]).

    Object ``j`` moves with a constant velocity and bounces off the borders; later objects occlude
    earlier ones; object 1 is absent from the first frame (it enters), as tracked objects do."""
    h, w = size
    names = list(_COLORS)
    objs = []
    for j in range(num_objects):
        bw, bh = rng.uniform(0.25, 0.4) * w, rng.uniform(0.25, 0.4) * h
        objs.append(dict(bw=bw, bh=bh, x=rng.uniform(0, w - bw), y=rng.uniform(0, h - bh),
                         vx=rng.uniform(-2, 2), vy=rng.uniform(-2, 2), color=names[j % len(names)],
                         kind=_KINDS[j % 2]))
    bg = tuple(int(c) for c in rng.integers(60, 120, 3))
    frames, masks = [], np.zeros((num_objects, num_frames, h, w), bool)
    for t in range(num_frames):
        img = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(img)
        for j, o in enumerate(objs):
            x = float(np.clip(o["x"] + o["vx"] * t, 0, w - o["bw"]))
            y = float(np.clip(o["y"] + o["vy"] * t, 0, h - o["bh"]))
            if j == 1 and t == 0:
                continue
            box = [x, y, x + o["bw"], y + o["bh"]]
            m = Image.new("L", (w, h), 0)
            shape = ImageDraw.Draw(m).rectangle if o["kind"] == "rectangle" else ImageDraw.Draw(m).ellipse
            shape(box, fill=255)
            (draw.rectangle if o["kind"] == "rectangle" else draw.ellipse)(box, fill=_COLORS[o["color"]])
            mj = np.asarray(m) > 0
            masks[:j, t] &= ~mj
            masks[j, t] = mj
        frames.append(img)
    return frames, masks, [f"{o['color']} {o['kind']}" for o in objs]


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_util

    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}


def _write_frames(d: Path, frames, names) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for img, n in zip(frames, names):
        img.save(d / f"{n}.jpg", quality=92)


def _meta_dataset(image_dir: Path, num_videos, num_frames, size, seed, video_name, with_type, frame_name):
    """The shared MeViS / ReVOS content: (videos meta dict, mask_dict, per-expression GT {key: (T,H,W)})."""
    rng = np.random.default_rng(seed)
    videos, mask_dict, gts = {}, {}, {}
    anno = 0
    for v in range(num_videos):
        vid = video_name(v)
        frames, masks, names = moving_objects(rng, num_frames, size, 2)
        fnames = [frame_name(t) for t in range(num_frames)]
        _write_frames(image_dir / vid, frames, fnames)
        ids = []
        for j in range(masks.shape[0]):
            mask_dict[str(anno)] = [_rle(m) if m.any() else None for m in masks[j]]
            ids.append(anno)
            anno += 1
        exps = {
            "0": {"exp": f"the {names[0]}", "obj_id": [0], "anno_id": [ids[0]]},
            "1": {"exp": f"the {names[1]}", "obj_id": [1], "anno_id": [ids[1]]},
            "2": {"exp": f"the {names[0]} and the {names[1]}", "obj_id": [0, 1], "anno_id": ids},
        }
        if with_type:
            exps["0"]["type_id"], exps["1"]["type_id"], exps["2"]["type_id"] = 0, 1, 0
        videos[vid] = {"vid_id": v, "frames": fnames, "expressions": exps}
        gts[f"{vid}/0"], gts[f"{vid}/1"], gts[f"{vid}/2"] = masks[0], masks[1], masks[0] | masks[1]
    return videos, mask_dict, gts


def _corrupt_meta(image_dir: Path, videos: dict, mask_dict: dict) -> tuple[dict, list[str]]:
    """Damage: a truncated JPEG in video 0 (read time), a bad RLE on expression 1 of video 1 (read time),
    an anno id missing from mask_dict (index time).  Returns (expected counts, keys that stay loadable)."""
    vids = sorted(videos)
    f0 = image_dir / vids[0] / f"{videos[vids[0]]['frames'][1]}.jpg"
    f0.write_bytes(f0.read_bytes()[:200])
    a = str(videos[vids[1]]["expressions"]["1"]["anno_id"][0])
    t = next(i for i, r in enumerate(mask_dict[a]) if r is not None)
    mask_dict[a][t] = {"size": mask_dict[a][t]["size"], "counts": "!!not-rle"}
    videos[vids[1]]["expressions"]["3"] = {"exp": "a ghost", "obj_id": [9], "anno_id": [99999]}
    # video 0: unreadable frame; video 1: expressions 1 and 2 share the bad RLE, 3 is dropped at index time
    ok = [f"{vids[1]}/0"] + [f"{v}/{e}" for v in vids[2:] for e in ("0", "1", "2")]
    return {"corrupt_image": 1, "bad_rle": 1, "bad_json": 1}, ok


def write_mevis(root, split: str = "valid_u", num_videos: int = 3, num_frames: int = 6,
                size: tuple[int, int] = (48, 64), with_masks: bool = True, corrupt: bool = False, seed: int = 0) -> dict:
    """MeViS ``<root>/<split>/{JPEGImages/, meta_expressions.json, mask_dict.json}`` (``valid`` has no masks)."""
    d = Path(root) / split
    videos, mask_dict, gts = _meta_dataset(d / "JPEGImages", num_videos, num_frames, size, seed,
                                           lambda v: f"{v:04x}{seed:04x}abcd", False, lambda t: f"{t:05d}")
    out = {"root": str(d), "gt": gts, "expected_skips": {}, "expected_expressions": sorted(gts)}
    if corrupt:
        out["expected_skips"], out["expected_expressions"] = _corrupt_meta(d / "JPEGImages", videos, mask_dict)
    (d / "meta_expressions.json").write_text(json.dumps({"videos": videos}))
    if with_masks:
        (d / "mask_dict.json").write_text(json.dumps(mask_dict))
    return out


def write_revos(root, num_videos: int = 3, num_frames: int = 6, size: tuple[int, int] = (48, 64),
                corrupt: bool = False, seed: int = 0) -> dict:
    """ReVOS ``<root>/{JPEGImages/, mask_dict.json, mask_dict_foreground.json, meta_expressions_{train,valid}_.json}``;
    the valid split holds every video (train: the first)."""
    d = Path(root)
    videos, mask_dict, gts = _meta_dataset(d / "JPEGImages", num_videos, num_frames, size, seed,
                                           lambda v: f"MOSE/{v:04d}abcd", True, lambda t: f"{t:05d}")
    out = {"root": str(d), "gt": gts, "expected_skips": {}, "expected_expressions": sorted(gts),
           "groups": {f"{v}/{e}": ("reasoning" if e == "1" else "referring") for v in videos for e in ("0", "1", "2")}}
    if corrupt:
        out["expected_skips"], out["expected_expressions"] = _corrupt_meta(d / "JPEGImages", videos, mask_dict)
    first = sorted(videos)[0]
    (d / "meta_expressions_valid_.json").write_text(json.dumps({"videos": videos}))
    (d / "meta_expressions_train_.json").write_text(json.dumps({"videos": {first: videos[first]}}))
    (d / "mask_dict.json").write_text(json.dumps(mask_dict))
    (d / "mask_dict_foreground.json").write_text(json.dumps({}))
    return out


def _palette_png(ann: np.ndarray, path: Path) -> None:
    im = Image.fromarray(ann.astype(np.uint8), mode="P")
    pal = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128] + [0] * (768 - 15)
    im.putpalette(pal)
    im.save(path)


def write_ref_davis(root, num_videos: int = 3, num_frames: int = 6, size: tuple[int, int] = (48, 64),
                    corrupt: bool = False, seed: int = 0) -> dict:
    """``<root>/DAVIS/{JPEGImages,Annotations}/480p/<video>/*``, ``ImageSets/2017/{train,val}.txt`` and
    ``<root>/davis_text_annotations/Davis17_annot{1,2}[_full_video].txt``; every video is in ``val``
    (``train`` lists the first).  Video 0 is written under DAVIS's misspelt name ``clasic-car`` in the
    expression files, as the release has it."""
    root = Path(root)
    davis = root / "DAVIS"
    rng = np.random.default_rng(seed)
    names = ["classic-car"] + [f"video-{v}" for v in range(1, num_videos)]
    lines: dict[str, list[str]] = {k: [] for k in ("annot1", "annot1_full_video", "annot2", "annot2_full_video")}
    gts = {}
    for vid in names:
        frames, masks, obj_names = moving_objects(rng, num_frames, size, 2)
        fnames = [f"{t:05d}" for t in range(num_frames)]
        _write_frames(davis / "JPEGImages" / "480p" / vid, frames, fnames)
        ad = davis / "Annotations" / "480p" / vid
        ad.mkdir(parents=True, exist_ok=True)
        for t, n in enumerate(fnames):
            ann = np.zeros(size, np.uint8)
            for j in range(masks.shape[0]):
                ann[masks[j, t]] = j + 1
            ann[0, 0] = 255 if t == 0 else ann[0, 0]  # a void pixel, as DAVIS annotations have
            _palette_png(ann, ad / f"{n}.png")
            masks[:, t, 0, 0] = False if t == 0 else masks[:, t, 0, 0]
        txt_name = "clasic-car" if vid == "classic-car" else vid
        for j, on in enumerate(obj_names):
            for g in lines:
                text = f"the {on}" + (" moving" if "full" in g else "") + (" é" if g.startswith("annot2") else "")
                lines[g].append(f'{txt_name} {j + 1} "{text}"')
                gts[(vid, g, j + 1)] = masks[j]
    sets = davis / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "val.txt").write_text("\n".join(names) + "\n")
    (sets / "train.txt").write_text(names[0] + "\n")
    expected = {"bad_csv": 0, "missing_file": 0, "corrupt_image": 0}
    if corrupt:
        lines["annot1"].append("broken line without quotes")
        expected["bad_csv"] = 1
        lines["annot1"].append('video-missing 1 "nothing"')
        with open(sets / "val.txt", "a") as f:
            f.write("video-missing\n")
        expected["missing_file"] = 1
        f0 = davis / "JPEGImages" / "480p" / names[-1] / "00002.jpg"
        f0.write_bytes(f0.read_bytes()[:150])
        expected["corrupt_image"] = 1
    td = root / "davis_text_annotations"
    td.mkdir(parents=True, exist_ok=True)
    files = {"annot1": "Davis17_annot1.txt", "annot1_full_video": "Davis17_annot1_full_video.txt",
             "annot2": "Davis17_annot2.txt", "annot2_full_video": "Davis17_annot2_full_video.txt"}
    for g, f in files.items():
        enc = "latin-1" if g.startswith("annot2") else "utf-8"
        (td / f).write_text("\n".join(lines[g]) + "\n", encoding=enc)
    return {"root": str(davis), "text_dir": str(td), "gt": gts, "videos": names,
            "expected_skips": {k: v for k, v in expected.items() if v}}


__all__ = ["moving_objects", "write_mevis", "write_ref_davis", "write_revos"]

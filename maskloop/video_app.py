"""The video verbs: ``maskloop segment --video`` and ``maskloop eval --video-dataset``.

    maskloop segment -c RUN --video clip.mp4 --text "the red car" --text "the dog" --out-dir seg/
        -> seg/masks/<k>_<text>/<frame>.png (one binary PNG per frame and expression) + seg/overlay.gif
    maskloop eval -c RUN --video-dataset mevis --video-data data/mevis/valid_u [--submit sub/]
        -> J, F and J&F per split (and the server layout under sub/ for splits without masks)

A video is an mp4 (any container PyAV opens) or a folder of frames (``*.jpg`` / ``*.png`` ..., in
sorted file-name order).  Frames are streamed: read when reached, never all held at once.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

_IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
OVERLAY_COLORS = [(255, 40, 200), (0, 230, 255), (255, 200, 0), (60, 220, 60), (255, 110, 40)]


class VideoFrames:
    """Random access (``at(i)``, cached for the keyframes) and a sequential stream (``stream()``)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"video not found: {self.path} (pass an mp4 or a folder of frames)")
        self._cache: dict[int, Image.Image] = {}
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in _IMAGE_EXT)
            if not self.files:
                raise FileNotFoundError(f"no frames (*.jpg, *.png, ...) in {self.path}")
            self.names = [p.stem for p in self.files]
        else:
            self.files = None
            self.names = [f"{i:05d}" for i in range(self._count_mp4())]
            if not self.names:
                raise ValueError(f"{self.path}: no video frames could be decoded")

    def _count_mp4(self) -> int:
        import av

        try:
            with av.open(str(self.path)) as c:
                return sum(1 for _ in c.decode(video=0))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read video {self.path}: {e}") from None

    def __len__(self) -> int:
        return len(self.names)

    def at(self, i: int) -> Image.Image:
        if i not in self._cache:
            if self.files is not None:
                self._cache[i] = Image.open(self.files[i]).convert("RGB")
            else:
                from maskloop.data.sources.sav import read_video_frames

                self._cache[i] = read_video_frames(self.path, [i])[i]
        return self._cache[i]

    def stream(self):
        if self.files is not None:
            for f in self.files:
                yield Image.open(f).convert("RGB")
            return
        import av

        with av.open(str(self.path)) as c:
            for fr in c.decode(video=0):
                yield fr.to_image()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "expr"


def segment_video_files(model, video, texts: list[str], out_dir, keyframes: str = "first",
                        gif_side: int = 320, gif_every: int = 1, protocol: str = "generate") -> dict:
    """Segment ``texts`` through ``video``; writes the per-frame mask PNGs and ``overlay.gif``.

    ``protocol``: "generate" (Sa2VA: the [SEG] state of the generated answer) or "teacher_forced"."""
    from maskloop.eval.refer import eval_mode
    from maskloop.eval.report import overlay
    from maskloop.model.video import VideoSegmenter

    frames = video if isinstance(video, VideoFrames) else VideoFrames(video)
    out = Path(out_dir)
    dirs = [out / "masks" / f"{k}_{_slug(t)}" for k, t in enumerate(texts)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    seg = VideoSegmenter(model, keyframes=keyframes, protocol=protocol)
    gif, areas = [], np.zeros(len(texts), np.int64)
    stream = iter(frames.stream())
    last = {}

    def frames_for_overlay():
        for img in stream:
            last["img"] = img
            yield img

    with eval_mode(model):
        for t, masks in seg.segment(frames.at, frames_for_overlay, len(frames), texts):
            for k, m in enumerate(masks):
                Image.fromarray(m.astype(np.uint8) * 255).save(dirs[k] / f"{frames.names[t]}.png")
                areas[k] += int(m.sum())
            if t % gif_every == 0:
                ov = np.asarray(last["img"])
                for k, m in enumerate(masks):
                    ov = np.asarray(overlay(ov, m, OVERLAY_COLORS[k % len(OVERLAY_COLORS)]))
                im = Image.fromarray(ov)
                scale = gif_side / max(im.size)
                if scale < 1:
                    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
                gif.append(im)
    gif_path = out / "overlay.gif"
    gif[0].save(gif_path, save_all=True, append_images=gif[1:], duration=80, loop=0)
    return {"frames": len(frames), "mask_dirs": [str(d) for d in dirs], "overlay": str(gif_path),
            "mean_area": (areas / len(frames)).tolist(), "answers": seg.answers, "prompted": seg.prompted}


def open_video_dataset(kind: str, root, split: str | None = None):
    from maskloop.data.sources.davis import RefDAVISDataset
    from maskloop.data.sources.mevis import MeViSDataset
    from maskloop.data.sources.revos import ReVOSDataset

    if kind == "refdavis":
        return RefDAVISDataset(root, split or "val")
    if kind == "mevis":
        return MeViSDataset(root)
    if kind == "revos":
        return ReVOSDataset(root, split or "valid")
    raise ValueError(f"unknown video dataset {kind!r}; choose refdavis, mevis or revos")


def format_jf(results: dict) -> str:
    lines = [f"{'split':<22}{'J':>8}{'F':>8}{'J&F':>8}{'n':>6}"]
    for g, r in results["groups"].items():
        lines.append(f"{g:<22}{r['J'] * 100:8.2f}{r['F'] * 100:8.2f}{r['J&F'] * 100:8.2f}{r['n']:6d}")
    if results.get("skipped"):
        lines.append("skipped: " + ", ".join(f"{k} x{v}" for k, v in sorted(results["skipped"].items())))
    return "\n".join(lines)


def cmd_segment_video(args, model) -> int:
    if not args.text:
        raise ValueError("give at least one --text")
    res = segment_video_files(model, args.video, args.text, args.out_dir, keyframes=args.keyframes,
                              protocol=getattr(args, "protocol", "generate"))
    print(f"{res['frames']} frames; masks: {', '.join(res['mask_dirs'])}; overlay: {res['overlay']}")
    for text, answer, ok in zip(args.text, res["answers"] or [], res["prompted"]):
        if not ok:
            print(f"note: the answer for {text!r} holds no usable [SEG] (empty masks): {answer!r}")
    return 0


def cmd_eval_video(args, model) -> int:
    import json

    from maskloop.eval.refer import eval_mode
    from maskloop.eval.video import evaluate_video_dataset
    from maskloop.model.video import VideoSegmenter

    if not args.video_data:
        raise ValueError("--video-dataset needs --video-data ROOT (the split folder / DAVIS folder / ReVOS folder)")
    ds = open_video_dataset(args.video_dataset, args.video_data, args.video_split)
    seg = VideoSegmenter(model, keyframes=args.keyframes, protocol=getattr(args, "protocol", "generate"),
                         max_new_tokens=getattr(args, "max_new_tokens", 32))
    with eval_mode(model):
        res = evaluate_video_dataset(ds, seg.segment, submission_dir=args.submit, max_videos=args.max_samples)
    res["protocol"], res["no_seg"] = seg.protocol, seg.no_seg  # expressions whose answer held no [SEG]
    if seg.no_seg:
        print(f"{seg.no_seg} expression(s) answered without [SEG]: empty masks (Sa2VA's evaluation)")
    if ds.has_masks:
        print(format_jf(res))
    else:
        print(f"{ds.name}: no ground truth in this split; {res['expressions']} expressions written")
    if args.submit:
        from maskloop.data.sources.rvos import zip_submission

        print(f"submission: {zip_submission(args.submit)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


__all__ = ["VideoFrames", "cmd_eval_video", "cmd_segment_video", "format_jf", "open_video_dataset",
           "segment_video_files"]

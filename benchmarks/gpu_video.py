"""Referring video segmentation cost: Sa2VA's video protocol vs a plain per-frame loop.

    python benchmarks/gpu_video.py --out $OUT/gpu_video.json                    # sa2va-4b, 100 x 1080p, GPU
    python benchmarks/gpu_video.py --preset tiny --frames 8 --height 72 --width 128   # CPU smoke test

* ``video``: :class:`maskloop.model.video.VideoSegmenter` — the MLLM once on 5 keyframes (one LLM pass
  for all expressions), the [SEG] prompt on the keyframes, SAM2 memory propagation through every frame
  (transformers' ``Sam2VideoModel``), frames streamed.
* ``per_frame``: what a user without the video path does — on every frame, the 448 tile through the
  MLLM and the [SEG] prompt through SAM2's image decoder (``GroundedMLLM.segment``), no memory.

Both read the same synthetic clip (a moving box on a textured background, generated frame by frame, so
the clip is never held whole), with the same preprocessing (PIL bicubic resizes to 448 and 1024, on the
CPU: reported separately as ``preprocess_s_per_frame``).  Random init at the preset's shapes (bf16 on
GPU, fp32 on CPU).  Reports seconds per frame (wall, end to end, after a warm-up clip) and peak device
memory (``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskloop.data.transforms import SampleTransform  # noqa: E402
from maskloop.eval.refer import eval_mode  # noqa: E402
from maskloop.model.grounded import GroundedMLLM  # noqa: E402
from maskloop.model.presets import get_preset  # noqa: E402
from maskloop.model.prompts import build_word_tokenizer  # noqa: E402
from maskloop.model.video import VideoSegmenter  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TEXTS = ["the red box", "the blue box on the left", "a small red box", "the large blue box"]


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


class Clip:
    """Frame t on demand: a fixed textured background with a red box moving across it."""

    def __init__(self, n: int, h: int, w: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        tex = 90 + 30 * np.sin(xx / 57.0 + yy / 83.0)[..., None] + rng.normal(0, 12, (h, w, 3))
        self.bg = np.clip(tex, 0, 255).astype(np.uint8)
        self.n, self.h, self.w = n, h, w

    def __len__(self):
        return self.n

    def at(self, t: int) -> Image.Image:
        a = self.bg.copy()
        bh, bw = self.h // 4, self.w // 5
        y = int((self.h - bh) * (0.5 + 0.4 * np.sin(t / 9.0)))
        x = int((self.w - bw) * t / max(self.n - 1, 1))
        a[y : y + bh, x : x + bw] = (220, 40, 40)
        return Image.fromarray(a)

    def stream(self):
        return (self.at(t) for t in range(self.n))


def peak_memory_gb() -> float:
    if DEV.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def reset_peak():
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def build(preset: str, dtype: torch.dtype):
    cfg = get_preset(preset)
    note = ""  # any preset's SAM2 (its memory width: maskloop.model.video.memory_dim)
    tok = build_word_tokenizer(sorted({w for t in TEXTS for w in t.split()}))
    torch.manual_seed(0)
    with torch.device(DEV):
        model = GroundedMLLM(cfg, tok)
    model.to(dtype).eval()
    return model, note


@torch.no_grad()
def run_video(seg, clip, texts) -> dict:
    sync()
    t0 = time.perf_counter()
    n = 0
    for _, _masks in seg.segment(clip.at, clip.stream, len(clip), texts):  # (n, H, W) bool on the CPU
        n += 1
    sync()
    return {"seconds": time.perf_counter() - t0, "frames": n}


@torch.no_grad()
def run_per_frame(model, clip, texts) -> dict:
    c = model.cfg
    tf = SampleTransform(image_size=c.vision.image_size, sam_size=c.sam2.image_size, prompt_grid=c.prompt_grid)
    expr = model.builder.expressions(texts)
    dtype = next(model.parameters()).dtype
    sync()
    t0 = time.perf_counter()
    n = 0
    for img in clip.stream():
        item = tf.image(img)
        pv = item["pixel_values"][None].to(DEV, dtype).expand(len(texts), -1, -1, -1)
        feats = model.sam_features(item["g_pixel_values"][None].to(DEV))
        feats = feats.index(torch.zeros(len(texts), dtype=torch.long, device=DEV))
        low = model.segment(pv, feats, expr, lm_loss=False)["low_res"]
        up = torch.nn.functional.interpolate(low[:, None].float(), size=(img.height, img.width), mode="bilinear")
        (up > 0).cpu()
        n += 1
    sync()
    return {"seconds": time.perf_counter() - t0, "frames": n}


def preprocess_cost(model, clip, k: int = 5) -> float:
    c = model.cfg
    tf = SampleTransform(image_size=c.vision.image_size, sam_size=c.sam2.image_size, prompt_grid=c.prompt_grid)
    t0 = time.perf_counter()
    for t in range(k):
        tf.image(clip.at(t))
    return (time.perf_counter() - t0) / k


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="sa2va-4b")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--texts", type=int, default=1, help="expressions segmented together (1..4)")
    ap.add_argument("--keyframes", default="first", choices=["first", "uniform"])
    ap.add_argument("--warmup-frames", type=int, default=6)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args(argv)
    auto = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    dtype = {"auto": auto, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    model, note = build(a.preset, dtype)
    texts = TEXTS[: max(1, min(a.texts, len(TEXTS)))]
    clip = Clip(a.frames, a.height, a.width)
    warm = Clip(a.warmup_frames, a.height, a.width, seed=1)
    rows = {}
    # teacher forced: a random model writes no [SEG], and generation would leave nothing to propagate
    seg = VideoSegmenter(model, keyframes=a.keyframes, protocol="teacher_forced")  # builds the Sam2VideoModel once
    with eval_mode(model):
        for name, fn in (("video", lambda c: run_video(seg, c, texts)),
                         ("per_frame", lambda c: run_per_frame(model, c, texts))):
            fn(warm)  # warm-up: kernels, allocator, cuDNN autotune
            reset_peak()
            r = fn(clip)
            r["s_per_frame"] = r["seconds"] / r["frames"]
            r["peak_memory_gb"] = peak_memory_gb()
            rows[name] = r
    pre = preprocess_cost(model, clip)
    res = {
        "preset": a.preset, "note": note, "device": torch.cuda.get_device_name() if DEV.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype), "frames": a.frames, "size": [a.height, a.width], "texts": len(texts), "keyframes": a.keyframes,
        "preprocess_s_per_frame": pre, "peak_memory_kind": "cuda max_memory_allocated" if DEV.type == "cuda" else "process peak RSS",
        "results": rows, "torch": torch.__version__,
    }
    print(f"{a.preset} {a.frames} frames {a.height}x{a.width}, {len(texts)} expression(s), {res['device']}, {dtype}")
    print(f"{'path':<12}{'s/frame':>10}{'total s':>10}{'peak GiB':>10}")
    for name, r in rows.items():
        print(f"{name:<12}{r['s_per_frame']:10.4f}{r['seconds']:10.2f}{r['peak_memory_gb']:10.2f}")
    print(f"(CPU preprocessing, included above: {pre:.4f} s/frame)" + (f"; {note}" if note else ""))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Data-loading throughput per worker: SA-1B-sized JPEGs through the full sample path.

Writes a small SA-1B folder (``sa_<id>.jpg`` + ``sa_<id>.json``) of textured synthetic
photos at SA-1B size (default 1500 x 2250, height x width), then times
``SA1BDataset.__getitem__`` -- JPEG decode, RLE decode, the four-tensor transform
(bicubic 448 + 1024 resizes, nearest mask resizes) -- in one process with one torch
thread, i.e. what one DataLoader worker does. Each configuration runs with JPEG draft
mode off and on. Also reports the JPEG decode time alone.

    python benchmarks/data_throughput.py [--samples 24] [--out results.json]

Prints a table last; writes JSON to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskloop.data import SA1BDataset, SampleTransform  # noqa: E402
from maskloop.data import fixtures as F  # noqa: E402
from maskloop.data.io import open_image  # noqa: E402


def make_dataset(root: Path, num_images: int, height: int, width: int, seed: int = 0) -> None:
    F.write_sa1b(root, num_images=num_images, size=(height, width), anns_per_image=4, seed=seed)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for p in sorted(root.glob("sa_*.jpg")):  # add photo-like texture so JPEG entropy is realistic
        arr = np.asarray(Image.open(p).convert("RGB")).astype(np.float32)
        phase = rng.uniform(0, 6.28, 3)
        shade = 25 * np.sin(xx[..., None] / 97.0 + yy[..., None] / 131.0 + phase)
        noise = rng.normal(0, 14, arr.shape).astype(np.float32)
        Image.fromarray(np.clip(arr + shade + noise, 0, 255).astype(np.uint8)).save(p, quality=90)


def bench(root: Path, image_size: int, sam_size: int, draft: bool, samples: int) -> dict:
    t = SampleTransform(image_size=image_size, sam_size=sam_size, draft=draft)
    ds = SA1BDataset(root, transform=t)
    for i in range(2):  # warm-up
        ds[i]
    t0 = time.perf_counter()
    for i in range(samples):
        ds[i % len(ds)]
    dt = time.perf_counter() - t0
    jpgs = sorted(root.glob("sa_*.jpg"))
    t1 = time.perf_counter()
    for i in range(samples):
        img, _ = open_image(jpgs[i % len(jpgs)], t.draft_size)
    decode = (time.perf_counter() - t1) / samples
    return {"image_size": image_size, "sam_size": sam_size, "draft": draft, "samples": samples,
            "samples_per_s": samples / dt, "ms_per_sample": 1000 * dt / samples, "decode_ms": 1000 * decode,
            "decoded_size": list(img.size)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=24, help="timed samples per configuration")
    ap.add_argument("--images", type=int, default=4, help="distinct JPEGs (each has 4 annotations)")
    ap.add_argument("--height", type=int, default=1500)
    ap.add_argument("--width", type=int, default=2250)
    ap.add_argument("--sam-sizes", type=int, nargs="+", default=[1024, 512],
                    help="SAM input sizes to try (1024 is the real one; 512 shows when draft starts to pay)")
    ap.add_argument("--out", type=str, default=None, help="write results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # a DataLoader worker runs with one intra-op thread

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sa1b"
        make_dataset(root, args.images, args.height, args.width)
        for sam in args.sam_sizes:
            for draft in (False, True):
                r = bench(root, 448, sam, draft, args.samples)
                rows.append(r)
                print(f"done: sam_size={sam} draft={draft}: {r['samples_per_s']:.2f} samples/s", file=sys.stderr, flush=True)

    result = {"benchmark": "data_throughput", "image": f"{args.width}x{args.height} JPEG q90 (W x H)",
              "path": "SA1BDataset.__getitem__ (decode + RLE + transform), 1 process, 1 torch thread",
              "python": platform.python_version(), "torch": torch.__version__, "pillow": Image.__version__,
              "cpu": platform.processor() or platform.machine(), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nSA-1B-sized JPEG ({result['image']}), one worker (1 process, 1 thread)")
    print(f"{'S':>5} {'G':>5} {'draft':>6} {'decoded to':>11} {'decode ms':>10} {'ms/sample':>10} {'samples/s':>10}")
    for r in rows:
        dec = "x".join(str(v) for v in r["decoded_size"])
        print(f"{r['image_size']:>5} {r['sam_size']:>5} {str(r['draft']):>6} {dec:>11} {r['decode_ms']:>10.1f} "
              f"{r['ms_per_sample']:>10.1f} {r['samples_per_s']:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

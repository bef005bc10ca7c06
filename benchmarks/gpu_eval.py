"""Referring evaluation speed (Sa2VA's protocol) at Sa2VA-4B shape: seconds per sample on one GPU.

    python benchmarks/gpu_eval.py --out $OUT/gpu_eval.json                       # GPU: sa2va-4b, bf16
    python benchmarks/gpu_eval.py --preset tiny --n 8 --batches 2 --out /tmp/e.json   # CPU smoke test

Random init on the device (bf16 weights on CUDA), synthetic COCO-sized images (640x480 by default)
through the evaluation transform, :func:`maskloop.eval.refer.evaluate_refer` end to end: data
transform, batched greedy generation (KV cache), the first-[SEG] re-run + SAM2 decoding, bilinear
resize to the original size and scoring.  A random model never writes ``[SEG]`` nor its end token, so
each answer runs the full ``--max-new-tokens`` and, to time the mask path too, the generated ids are
overwritten after generation with "Sure , [SEG] ." (``--force-seg``, default on; the answer length of
Sa2VA's usual "Sure, [SEG]." reply).  Also times the teacher-forced protocol.  Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SyntheticRefer(torch.utils.data.Dataset):
    """``n`` items: a random RGB image of ``size`` (W, H) with a rectangle mask, expression text."""

    name = "synthetic"

    def __init__(self, n: int, transform, size=(640, 480), seed: int = 0):
        rng = np.random.default_rng(seed)
        w, h = size
        self.images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(4)]
        self.masks = []
        for _ in range(4):
            m = np.zeros((h, w), bool)
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            m[y:y + h // 3, x:x + w // 3] = True
            self.masks.append(m)
        self.n, self.transform = n, transform

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        item = self.transform(self.images[i % 4], self.masks[i % 4])
        item.update(expression="the red circle left of the blue square", dataset=self.name)
        return item


def build(preset: str):
    from maskloop.model.grounded import GroundedMLLM
    from maskloop.model.presets import get_preset
    from maskloop.model.prompts import build_word_tokenizer

    cfg = get_preset(preset)
    tok = build_word_tokenizer(["a", "red", "blue", "small", "large", "circle", "square", "triangle", "left", "of",
                                "sure", "the"])
    torch.manual_seed(0)
    with torch.device(DEV):
        model = GroundedMLLM(cfg, tok)
    if DEV.type == "cuda":
        model.to_training_dtype(torch.bfloat16)
    return model.eval()


def force_seg(model):
    """Wrap ``model.generate``: after the real generation, the ids read "sure , [SEG] ." + end."""
    from maskloop.model.grounded import Generated

    real = model.generate
    b = model.builder
    ans = b.ids("sure ,") + [b.seg_id] + b.ids(".")

    def gen(*a, **k):
        g = real(*a, **k)
        ids = torch.full_like(g.ids, b.pad_id)
        n = min(len(ans), ids.shape[1] - 1)
        ids[:, :n] = torch.tensor(ans[:n], device=ids.device)
        ids[:, n] = b.end_id
        return Generated(ids, torch.full_like(g.lengths, n), torch.ones_like(g.finished))

    model.generate = gen


def main(argv=None) -> dict:
    from maskloop.eval.data import eval_transform
    from maskloop.eval.refer import evaluate_refer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="sa2va-4b")
    p.add_argument("--n", type=int, default=64, help="samples per measurement")
    p.add_argument("--batches", default="1,8,16", help="batch sizes to time")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--size", default="640x480", help="original image size WxH")
    p.add_argument("--num-workers", type=int, default=4 if DEV.type == "cuda" else 0)
    p.add_argument("--no-force-seg", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    w, h = (int(x) for x in a.size.split("x"))
    model = build(a.preset)
    if not a.no_force_seg:
        force_seg(model)
    ds = SyntheticRefer(a.n, eval_transform(model.cfg), (w, h))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if DEV.type == "cuda" else torch.autocast("cpu", enabled=False)
    rows = []
    for protocol in ("generate", "teacher_forced"):
        for bs in (int(x) for x in a.batches.split(",")):
            with autocast:
                evaluate_refer(model, {"w": ds}, bs, max_samples=min(a.n, 2 * bs), progress=False,
                               protocol=protocol, max_new_tokens=a.max_new_tokens, num_workers=0)  # warm-up
                if DEV.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                r = evaluate_refer(model, {"w": ds}, bs, progress=False, protocol=protocol,
                                   max_new_tokens=a.max_new_tokens, num_workers=a.num_workers)["w"]
                if DEV.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t
            rows.append({"protocol": protocol, "batch": bs, "n": r["n_scored"], "seconds": dt,
                         "s_per_sample": dt / max(r["n_scored"], 1), "no_seg_frac": r["no_seg_frac"],
                         "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if DEV.type == "cuda" else None})
    print(f"preset {a.preset}  device {torch.cuda.get_device_name() if DEV.type == 'cuda' else platform.processor()}"
          f"  image {w}x{h}  max_new_tokens {a.max_new_tokens}  force_seg {not a.no_force_seg}")
    print(f"{'protocol':<15} {'batch':>5} {'n':>5} {'s/sample':>9} {'samples/s':>10} {'no-[SEG]':>9} {'peak GB':>8}")
    for r in rows:
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
        print(f"{r['protocol']:<15} {r['batch']:>5} {r['n']:>5} {r['s_per_sample']:>9.4f} {1 / r['s_per_sample']:>10.2f} "
              f"{r['no_seg_frac']:>9.2f} {mem:>8}")
    res = {"preset": a.preset, "device": str(DEV), "image_size": [w, h], "max_new_tokens": a.max_new_tokens,
           "force_seg": not a.no_force_seg, "rows": rows}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

"""Loop 1 under FSDP2 (one process) with and without activation checkpointing, Sa2VA-4B / -8B shapes.

    python3 benchmarks/gpu_sharding.py --out $OUT/gpu_sharding.json            # the GPU machine
    python3 benchmarks/gpu_sharding.py --preset tiny --batches 1,2 --T 4       # CPU smoke test

Random init on the device (bf16 frozen weights, fp32 trained weights), synthetic inputs, the real recipe
(`recipes/loop1.Loop1`) run through :class:`maskloop.train.sharding.Distributor` exactly as the Trainer
runs it (root forward, backward, the distributor's clip, AdamW, EMA).  Per (preset, mode, checkpointing):
samples/s and peak memory at each batch, and the largest batch of ``--batches`` that fits (the first
out-of-memory stops the sweep).  ``distributed: none`` is the unsharded baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torch.distributed as tdist
from gpu_loop1 import DEV, full_vocab, make_batch, sync  # the Loop-1 benchmark's model and inputs
from gpu_loop1 import build as build_model

from maskloop.recipes.loop1 import Loop1
from maskloop.train.ema import EMA
from maskloop.train.optim import build_optimizer
from maskloop.train.sharding import Distributor


def init_group():
    if not tdist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        tdist.init_process_group("nccl" if DEV.type == "cuda" else "gloo", rank=0, world_size=1)


def build(preset: str, mode: str, checkpointing: bool, T: int, topk: int):
    model, tcfg = build_model(preset, T, topk)  # gpu_loop1's: random init on the device, bf16 frozen / fp32 trained
    d = Distributor(mode, DEV, bf16=DEV.type == "cuda", activation_checkpointing=checkpointing)
    d.prepare(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ema = EMA(params, decay=0.999)
    recipe = Loop1(tcfg)
    recipe.setup(model, ema, seed=0)
    full_vocab(recipe)  # noise / Gumbel top-k over the whole vocabulary, as with a real tokenizer
    opt = build_optimizer(list(params.items()), lr=1e-6)  # the Trainer's: per-tensor AdamW under FSDP
    return model, d, params, ema, recipe, opt


def step(d, params, ema, recipe, opt, batch):
    ps = list(params.values())
    with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=DEV.type == "cuda"):
        out = d.forward(lambda: recipe.step({"pairs": batch}))
    out.objectives[0].backward()
    d.finish_grads(ps)
    d.clip_grad_norm_(ps, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema.update()


def measure(preset, mode, ckpt, batches, reps, T, topk):
    rows = []
    model, d, params, ema, recipe, opt = build(preset, mode, ckpt, T, topk)
    n_params = sum(p.numel() for p in model.parameters())
    for B in batches:
        batch = make_batch(model, B)
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            step(d, params, ema, recipe, opt, batch)  # warm-up (decoder graphs, allocator)
            sync()
            t = time.perf_counter()
            for _ in range(reps):
                step(d, params, ema, recipe, opt, batch)
            sync()
            dt = (time.perf_counter() - t) / reps
            peak = torch.cuda.max_memory_allocated() / 2**30 if DEV.type == "cuda" else float("nan")
            rows.append({"preset": preset, "distributed": mode, "checkpointing": ckpt, "batch": B, "ok": True,
                         "s_per_step": dt, "samples_per_s": B / dt, "peak_gib": peak, "params_b": n_params / 1e9})
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            rows.append({"preset": preset, "distributed": mode, "checkpointing": ckpt, "batch": B, "ok": False,
                         "error": "out of memory"})
            break
        print(rows[-1], flush=True)
    del model, d, params, ema, recipe, opt
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="sa2va-4b,sa2va-8b")
    ap.add_argument("--preset", help="one preset (overrides --presets)")
    ap.add_argument("--modes", default="none:0,fsdp:0,fsdp:1", help="distributed:checkpointing pairs")
    ap.add_argument("--batches", default="8,16,32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--topk", type=int, default=128)
    ap.add_argument("--out", default="gpu_sharding.json")
    a = ap.parse_args()
    init_group()
    presets = [a.preset] if a.preset else a.presets.split(",")
    batches = [int(b) for b in a.batches.split(",")]
    rows = []
    for preset in presets:
        for spec in a.modes.split(","):
            mode, ck = spec.split(":")
            rows += measure(preset, mode, ck == "1", batches, a.reps, a.T, a.topk)
            json.dump({"rows": rows, "device": torch.cuda.get_device_name() if DEV.type == "cuda" else platform.processor(),
                       "torch": torch.__version__, "T": a.T, "topk": a.topk}, open(a.out, "w"), indent=1)
    print(f"\n{'preset':<10} {'mode':<5} {'ckpt':<5} {'B':>3} {'s/step':>8} {'samples/s':>10} {'peak GiB':>9}")
    for r in rows:
        if r["ok"]:
            print(f"{r['preset']:<10} {r['distributed']:<5} {str(r['checkpointing']):<5} {r['batch']:>3} "
                  f"{r['s_per_step']:>8.3f} {r['samples_per_s']:>10.2f} {r['peak_gib']:>9.1f}")
        else:
            print(f"{r['preset']:<10} {r['distributed']:<5} {str(r['checkpointing']):<5} {r['batch']:>3}   out of memory")
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()

"""PSALM at its real shapes: the deformable kernels per task, and one training step.

1. **Kernels.** Multi-scale deformable attention with the deformable projector's shapes: the
   4 Swin-B levels of a ``--image`` input (1024 -> 256², 128², 64², 32²), 8 heads x 32
   channels (hidden 256), 4 points, B = ``--batch``, and the query count of each task (z_q:
   133 COCO panoptic / semantic class names, 80 instance classes, 1 referring span, region
   and cross-image visual prompts); plus the pixel decoder encoder's own shape (3 levels
   res3..res5, every pixel a query). For fp32 and bf16, the grid_sample reference, the
   gather path and the Triton kernels: forward and forward+backward time, and the error of
   the output and the three gradients against the fp32 reference.
2. **Training step.** ``PSALMModel`` (Swin-B + Phi-1.5 shapes, random init, Swin frozen as
   PSALM trains it), bf16 autocast, AdamW, batch ``--batch`` of one task (PSALM draws each
   batch from one dataset), the PSALM criterion (Hungarian matching, 12544 points):
   samples/s and peak memory, with and without gradient checkpointing.

GPU:  python benchmarks/gpu_psalm.py --out benchmarks/results/gpu_psalm.json
CPU smoke run (tiny shapes, Triton skipped):  python benchmarks/gpu_psalm.py --tiny --out /tmp/gpu_psalm.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maskloop.model.psalm.deform_attn import (  # noqa: E402
    ms_deform_attn_gather,
    ms_deform_attn_reference,
    ms_deform_attn_triton,
    triton_available,
)

# z_q per task: COCO panoptic has 133 categories (semantic on the same labels), instances 80,
# one referring span; COCO-Interactive averages ~7 regions an image (10 here), DAVIS ~2-3 objects
TASK_QUERIES = {"panoptic": 133, "semantic": 133, "instance": 80, "referring": 1, "region": 10, "cross_image": 3}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, reps, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / reps
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) * 1000 / reps


def kernel_inputs(level_hw, B, Q, heads, dh, points, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = torch.tensor(level_hw, device=device)
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    S, L = int(shapes.prod(1).sum()), len(level_hw)
    v = torch.randn(B, S, heads, dh, generator=g).to(device)
    loc = (torch.rand(B, Q, heads, L, points, 2, generator=g) * 1.1 - 0.05).to(device)
    a = torch.rand(B, Q, heads, L, points, generator=g).softmax(-1).to(device)
    return v, shapes, start, loc, a


def bench_kernels(a, device) -> list[dict]:
    s = a.image
    four = [[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16], [s // 32, s // 32]]
    cases = [(task, four, q) for task, q in TASK_QUERIES.items()]
    three = four[1:]
    cases.append(("pixel_decoder_encoder", three, sum(h * w for h, w in three)))
    impls = {"reference": ms_deform_attn_reference, "gather": ms_deform_attn_gather}
    if device.type == "cuda" and triton_available():
        impls["triton"] = ms_deform_attn_triton
    rows = []
    for task, levels, Q in cases:
        v32, ss, st, loc32, w32 = kernel_inputs(levels, a.batch, Q, a.heads, a.head_dim, a.points, device)
        req = [t.clone().requires_grad_() for t in (v32, loc32, w32)]
        ref = ms_deform_attn_reference(req[0], ss, st, req[1], req[2])
        go32 = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(device)
        g_ref = torch.autograd.grad(ref, req, go32)
        ref = ref.detach()
        # bf16: everything bfloat16; bf16_v: bfloat16 value, float32 locations / weights (what
        # MSDeformAttn passes under autocast)
        for mode, vt, gt in (("fp32", torch.float32, torch.float32), ("bf16", torch.bfloat16, torch.bfloat16),
                             ("bf16_v", torch.bfloat16, torch.float32)):
            v = v32.to(vt).requires_grad_()
            loc, w = (t.to(gt).requires_grad_() for t in (loc32, w32))
            go = go32.to(vt)
            for name, fn in impls.items():
                try:
                    out = fn(v, ss, st, loc, w)
                    grads = torch.autograd.grad(out, (v, loc, w), go)
                except Exception as e:  # an impl without this dtype: recorded, not fatal
                    rows.append({"task": task, "Q": Q, "dtype": mode, "impl": name,
                                 "error": f"{type(e).__name__}: {e}"[:200]})
                    continue
                err = {"out": ((out.float() - ref).abs().max() / ref.abs().max()).item()}
                for gname, x, y in zip(("value", "loc", "attn"), grads, g_ref):
                    err[gname] = ((x.float() - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()
                args = (v, ss, st, loc, w)
                fwd = timeit(lambda fn=fn, args=args: fn(*args), device, a.reps)
                fb = timeit(lambda fn=fn, args=args, go=go: torch.autograd.grad(
                    fn(*args), (args[0], args[3], args[4]), go), device, a.reps)
                rows.append({"task": task, "Q": Q, "levels": [list(x) for x in levels], "B": a.batch,
                             "dtype": mode, "impl": name, "fwd_ms": fwd, "fwd_bwd_ms": fb,
                             "rel_err_out": err["out"], "rel_err_grad_value": err["value"],
                             "rel_err_grad_loc": err["loc"], "rel_err_grad_attn": err["attn"]})
            del v, loc, w
    # speedups against the reference of the same task and dtype
    base = {(r["task"], r["dtype"]): r for r in rows if r["impl"] == "reference" and "fwd_ms" in r}
    for r in rows:
        b = base.get((r["task"], r["dtype"]))
        if b and "fwd_ms" in r:
            r["speedup_fwd"], r["speedup_fwd_bwd"] = b["fwd_ms"] / r["fwd_ms"], b["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return rows


class _WordTok:
    """Stand-in tokenizer: a word -> an id in the base vocabulary (shapes are what matter)."""

    pad_token_id = 0

    def __init__(self, vocab):
        self.vocab = vocab

    def encode(self, text, add_special_tokens=False):
        return [1 + (sum(map(ord, w)) * 7919) % (self.vocab - 1) for w in text.split()]


def _sample(task, cfg, mask_size, n_obj, n_cls, g):
    S = cfg.image_size
    s = {"task": task, "pixel_values": torch.randn(3, S, S, generator=g)}
    masks = torch.zeros(n_obj, mask_size, mask_size)
    for i in range(n_obj):  # boxes of random size
        y0, x0 = (int(v) for v in torch.randint(0, mask_size // 2, (2,), generator=g))
        masks[i, y0:y0 + mask_size // 4, x0:x0 + mask_size // 3] = 1
    s["masks"] = masks
    if task in ("panoptic", "semantic", "instance"):
        s["class_names"] = [f"category {k} thing" if k % 3 else f"cat{k}" for k in range(n_cls)]
        s["labels"] = torch.randint(0, n_cls, (n_obj,), generator=g)
    elif task in ("region", "cross_image"):
        s["region_masks"] = masks.clone()
        s["labels"] = torch.arange(n_obj)
        if task == "cross_image":
            s["prompt_pixel_values"] = torch.randn(3, S, S, generator=g)
    else:
        s["expression"] = "the man in a red shirt on the left"
        s["labels"] = torch.zeros(1, dtype=torch.long)
        s["masks"] = masks[:1]
    return s


def _train_step(model, opt, crit, params, groups, amp):
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for gr in groups:
        with amp:
            out = model(gr["task"], **gr["inputs"])
        loss, _ = crit(out, gr["targets"])
        total = total + loss
    total.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return total


def bench_step(a, device) -> list[dict]:
    from maskloop.data.psalm import PSALMCollator, group_to
    from maskloop.model.psalm.losses import LossWeights, PSALMCriterion
    from maskloop.model.psalm.model import PSALMModel, psalm_config

    rows = []
    preset = "psalm-tiny" if a.tiny else "psalm-swinb-phi15"
    for gc in (False, True):
        torch.manual_seed(0)
        cfg = psalm_config(preset, gradient_checkpointing=gc)
        model = PSALMModel(cfg).to(device)
        model.vision_tower.requires_grad_(False)  # PSALM's train_backbone=False
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=6e-5, weight_decay=0.0)
        crit = PSALMCriterion(LossWeights(num_points=a.points_loss))
        col = PSALMCollator(cfg, _WordTok(cfg.base_vocab))
        mask_size = cfg.image_size // 4 if a.tiny else a.mask_size
        amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
               else torch.autocast("cpu", enabled=False))
        for task in a.tasks:
            g = torch.Generator().manual_seed(2)
            n_cls = 6 if a.tiny else {"panoptic": 133, "semantic": 133, "instance": 80}.get(task, 0)
            batch = col([_sample(task, cfg, mask_size, 4 if a.tiny else 12, n_cls, g) for _ in range(a.batch)])
            groups = [group_to(gr, device) for gr in batch["groups"]]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = timeit(lambda m=model, o=opt, c=crit, ps=params, gs=groups, ac=amp: _train_step(m, o, c, ps, gs, ac),
                        device, a.step_reps, warmup=2)
            row = {"task": task, "preset": preset, "batch": a.batch, "gradient_checkpointing": gc,
                   "step_ms": ms, "samples_per_s": a.batch * 1000.0 / ms,
                   "trainable_params_M": sum(p.numel() for p in params) / 1e6}
            if device.type == "cuda":
                row["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(row)
        model = opt = params = None  # free before the next configuration
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--step-reps", type=int, default=5)
    ap.add_argument("--points-loss", type=int, default=12544)
    ap.add_argument("--mask-size", type=int, default=1024)
    ap.add_argument("--tasks", nargs="+", default=["panoptic", "referring", "region", "cross_image"])
    ap.add_argument("--tiny", action="store_true", help="CPU-size shapes (smoke test)")
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/gpu_psalm.json")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.tiny:
        a.image, a.reps, a.step_reps, a.points_loss, a.heads, a.head_dim = 128, 2, 1, 64, 2, 8
    elif device.type != "cuda":
        print("no CUDA device: run with --tiny for the CPU smoke test")
        return 1
    kern = [] if a.skip_kernels else bench_kernels(a, device)
    steps = [] if a.skip_step else bench_step(a, device)
    print(f"{'task':>22} {'Q':>6} {'dtype':>8} {'impl':>9} {'fwd ms':>9} {'f+b ms':>9} {'x f+b':>6} "
          f"{'err out':>8} {'gV':>8} {'gLoc':>8} {'gAttn':>8}")
    for r in kern:
        if "error" in r:
            print(f"{r['task']:>22} {r['Q']:>6} {r['dtype']:>8} {r['impl']:>9}  failed: {r['error']}")
            continue
        print(f"{r['task']:>22} {r['Q']:>6} {r['dtype']:>8} {r['impl']:>9} {r['fwd_ms']:9.3f} {r['fwd_bwd_ms']:9.3f} "
              f"{r.get('speedup_fwd_bwd', 1.0):6.2f} {r['rel_err_out']:8.1e} {r['rel_err_grad_value']:8.1e} "
              f"{r['rel_err_grad_loc']:8.1e} {r['rel_err_grad_attn']:8.1e}")
    if steps:
        print(f"\n{'task':>12} {'ckpt':>5} {'batch':>5} {'step ms':>9} {'samples/s':>10} {'peak GiB':>9}")
        for r in steps:
            print(f"{r['task']:>12} {str(r['gradient_checkpointing']):>5} {r['batch']:>5} {r['step_ms']:9.1f} "
                  f"{r['samples_per_s']:10.2f} {r.get('peak_mem_GiB', float('nan')):9.1f}")
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "tiny": a.tiny, "image": a.image,
            "triton": bool(device.type == "cuda" and triton_available())}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "kernels": kern, "train_step": steps}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Multi-scale deformable attention: grid_sample reference vs gather vs Triton, on CUDA.

Shapes: 4 Swin levels at strides 4/8/16/32 of a ``--image`` input (1024 -> 256,128,64,32),
B, Q queries, 8 heads of 32 channels (hidden 256), 4 points. Checks the fast paths equal the
reference (forward and the three gradients) and times forward and forward+backward.

    python benchmarks/gpu_deform_attn.py --out results/gpu_deform_attn.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maskloop.model.psalm.deform_attn import (  # noqa: E402
    ms_deform_attn_gather,
    ms_deform_attn_reference,
    ms_deform_attn_triton,
    triton_available,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_psalm import timeit  # noqa: E402  (CUDA events on a GPU, wall clock elsewhere)

DEV = torch.device("cuda")


def make_inputs(image, B, Q, heads=8, dh=32, points=4, dtype=torch.float32, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = torch.tensor([[image // s, image // s] for s in (4, 8, 16, 32)], device=device)
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    S, L = int(shapes.prod(1).sum()), 4
    v = torch.randn(B, S, heads, dh, device=device, dtype=dtype, generator=g).requires_grad_()
    loc = (torch.rand(B, Q, heads, L, points, 2, device=device, dtype=dtype, generator=g) * 1.1 - 0.05)
    a = torch.rand(B, Q, heads, L, points, device=device, dtype=dtype, generator=g).softmax(-1)
    return v, shapes, start, loc.requires_grad_(), a.requires_grad_()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--queries", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="results/gpu_deform_attn.json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA not available: this benchmark needs a GPU")
        return 1
    impls = {"reference": ms_deform_attn_reference, "gather": ms_deform_attn_gather}
    if triton_available():
        impls["triton"] = ms_deform_attn_triton
    rows = []
    for image in a.images:
        for Q in a.queries:
            v, ss, st, loc, w = make_inputs(image, a.batch, Q)
            ref = ms_deform_attn_reference(v, ss, st, loc, w)
            go = torch.randn_like(ref)
            g_ref = torch.autograd.grad(ref, (v, loc, w), go)
            base = None
            for name, fn in impls.items():
                out = fn(v, ss, st, loc, w)
                grads = torch.autograd.grad(out, (v, loc, w), go)
                err = {"out": (out - ref).abs().max().item()}
                for gname, x, y in zip(("value", "loc", "attn"), grads, g_ref):
                    err[gname] = ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()
                args = (v, ss, st, loc, w)
                fwd = timeit(lambda fn=fn, args=args: fn(*args), DEV, a.reps, warmup=3)
                fb = timeit(lambda fn=fn, args=args, go=go: torch.autograd.grad(
                    fn(*args), (args[0], args[3], args[4]), go), DEV, a.reps, warmup=3)
                base = base or (fwd, fb)
                rows.append({"image": image, "Q": Q, "B": a.batch, "impl": name, "fwd_ms": fwd, "fwd_bwd_ms": fb,
                             "speedup_fwd": base[0] / fwd, "speedup_fwd_bwd": base[1] / fb,
                             "max_abs_err_out": err["out"], "rel_err_grad_value": err["value"],
                             "rel_err_grad_loc": err["loc"], "rel_err_grad_attn": err["attn"]})
    hdr = f"{'image':>5} {'Q':>5} {'impl':>9} {'fwd ms':>8} {'fwd+bwd':>8} {'x fwd':>6} {'x f+b':>6} " \
          f"{'err out':>8} {'gV':>8} {'gLoc':>8} {'gAttn':>8}"
    print(hdr)
    for r in rows:
        print(f"{r['image']:>5} {r['Q']:>5} {r['impl']:>9} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f} "
              f"{r['speedup_fwd']:6.2f} {r['speedup_fwd_bwd']:6.2f} {r['max_abs_err_out']:8.1e} "
              f"{r['rel_err_grad_value']:8.1e} {r['rel_err_grad_loc']:8.1e} {r['rel_err_grad_attn']:8.1e}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

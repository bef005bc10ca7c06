"""The pieces of one decode step, each timed alone on the GPU at the LLM's real shapes.

Every piece runs over ``layers`` distinct weight copies inside one captured CUDA graph (so the weights stream
from HBM as in a real decode step, not from L2, and no launch overhead of the host is counted), and the graph
is replayed a few times; the figure is microseconds per layer call, with the bandwidth it implies for the
GEMMs.  Pieces:

* the projections at batch M: ``F.linear`` over the (N, K) weight (what decoding does now), the same product as
  a split-K batched matmul over a (s, N, K / s) weight (s partial sums, added by whatever reads them), with and
  without that sum as a separate kernel;
* attention of one query a row over the static cache: the grouped matmul / softmax / matmul of
  ``fast_decode._attend``, compiled as in the decode step, and alternatives;
* the LoRA merge of one layer (W + s B A into a preallocated weight).

Usage (on a CUDA machine): ``python3 benchmarks/gpu_decode_kernels.py --preset sa2va-4b --out kernels.json``
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

SHAPES = {  # hidden, intermediate, heads, kv heads, head dim, vocab, layers (the LLMs of the presets)
    "sa2va-4b": (2048, 11008, 16, 2, 128, 151_680, 36),
    "sa2va-1b": (896, 4864, 14, 2, 64, 151_680, 24),
}


def graph_us(fn, n_calls: int, reps: int = 10) -> float:
    """Microseconds per call of ``fn`` (which makes ``n_calls`` calls) captured as one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / (reps * n_calls)


def projections(D, inter, H, KV, hd, V, L, batches):
    dev, dt = "cuda", torch.bfloat16
    shapes = {"qkv": (H * hd + 2 * KV * hd, D), "o": (D, H * hd), "gate_up": (2 * inter, D), "down": (D, inter)}
    rows = []
    for name, (N, K) in shapes.items():
        W = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(L)]
        for M in batches:
            x = torch.randn(M, K, device=dev, dtype=dt)
            out = torch.empty(M, N, device=dev, dtype=dt)

            def lin(W=W, x=x, out=out):
                for w in W:
                    torch.matmul(x, w.t(), out=out)

            us = graph_us(lin, L)
            row = {"proj": name, "N": N, "K": K, "M": M, "linear_us": us, "linear_tbps": N * K * 2 / us / 1e6}
            for s in (2, 4, 8):
                if K % s:
                    continue
                W3 = [w.view(N, s, K // s).transpose(0, 1).contiguous() for w in W]  # (s, N, K/s)
                xs = x.view(M, s, K // s).transpose(0, 1)  # (s, M, K/s), a view
                part = torch.empty(s, M, N, device=dev, dtype=dt)

                def bmm(W3=W3, xs=xs, part=part):
                    for w in W3:
                        torch.bmm(xs, w.transpose(1, 2), out=part)

                def bmm_sum(W3=W3, xs=xs, part=part, out=out):
                    for w in W3:
                        torch.bmm(xs, w.transpose(1, 2), out=part)
                        torch.sum(part, 0, out=out)

                def view_f32(W=W, xs=xs, s=s, N=N, K=K):  # views of the (N, K) weight, fp32 partial sums
                    for w in W:
                        torch.bmm(xs, w.view(N, s, K // s).permute(1, 2, 0), out_dtype=torch.float32)

                def view_f32_sum(W=W, xs=xs, s=s, N=N, K=K):
                    for w in W:
                        torch.bmm(xs, w.view(N, s, K // s).permute(1, 2, 0), out_dtype=torch.float32).sum(0)

                try:
                    row[f"splitk{s}_view_f32_us"] = graph_us(view_f32, L)
                    row[f"splitk{s}_view_f32_sum_us"] = graph_us(view_f32_sum, L)
                except Exception as e:
                    row[f"splitk{s}_view_f32_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                row[f"splitk{s}_us"] = graph_us(bmm, L)
                row[f"splitk{s}_sum_us"] = graph_us(bmm_sum, L)
                ref = F.linear(x.float(), W[0].float())
                got = torch.bmm(xs, W3[0].transpose(1, 2)).float().sum(0)
                row[f"splitk{s}_max_rel_err"] = float((got - ref).abs().max() / ref.abs().max())
                del W3
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    # the lm head (one per step)
    Wh = torch.randn(V, D, device=dev, dtype=dt) * 0.02
    for M in batches:
        x = torch.randn(M, D, device=dev, dtype=dt)
        us = graph_us(lambda x=x: F.linear(x, Wh), 1)
        rows.append({"proj": "lm_head", "N": V, "K": D, "M": M, "linear_us": us, "linear_tbps": V * D * 2 / us / 1e6})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def masked_score(valid):
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(valid[b, kv_idx], score, -float("inf"))

    return score_mod


def attention(D, H, KV, hd, L, batches, Lmax):
    dev, dt = "cuda", torch.bfloat16
    rows = []
    scale = 1 / math.sqrt(hd)

    def grouped(q, k, v, mask):  # fast_decode._attend
        B = q.shape[0]
        qg = q.reshape(B, KV, H // KV, hd)
        s = torch.matmul(qg, k.transpose(-1, -2)).float() * scale
        s = s.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(s, -1).to(v.dtype), v).reshape(B, H, 1, hd)

    def elementwise(q, k, v, mask):  # the same product as broadcast multiply + sum: inductor fuses it
        B = q.shape[0]
        qg = q.reshape(B, KV, H // KV, 1, hd).float()
        s = (qg * k[:, :, None].float()).sum(-1) * scale  # (B, KV, G, Lmax)
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, -1)
        return (p[..., None] * v[:, :, None].float()).sum(-2).to(v.dtype).reshape(B, H, 1, hd)

    def sdpa(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    variants = {"grouped_compiled": torch.compile(grouped, dynamic=False),
                "elementwise_compiled": torch.compile(elementwise, dynamic=False),
                "sdpa_eager": sdpa}
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        variants["flex_compiled"] = None
    except ImportError:
        flex = None
    for B in batches:
        q = torch.randn(B, H, 1, hd, device=dev, dtype=dt)
        ks = [torch.randn(B, KV, Lmax, hd, device=dev, dtype=dt) for _ in range(L)]
        vs = [torch.randn(B, KV, Lmax, hd, device=dev, dtype=dt) for _ in range(L)]
        valid = torch.zeros(B, Lmax, dtype=torch.bool, device=dev)
        valid[:, 5 : Lmax - 40] = True
        mask = valid[:, None, None, :]
        ref = grouped(q, ks[0], vs[0], mask).float()
        row = {"B": B, "Lmax": Lmax}
        for name, fn in variants.items():
            try:
                if name == "flex_compiled":
                    score_mod = masked_score(valid)

                    fn = lambda q, k, v, m, sm=score_mod: flex(q, k, v, score_mod=sm, scale=scale, enable_gqa=True)  # noqa: E731
                m = mask if name != "sdpa_eager" else mask.expand(B, H, 1, Lmax)
                err = float((fn(q, ks[0], vs[0], m).float() - ref).abs().max())

                def run(fn=fn, m=m, q=q, ks=ks, vs=vs):
                    for k, v in zip(ks, vs):
                        fn(q, k, v, m)

                row[f"{name}_us"] = graph_us(run, L)
                row[f"{name}_max_err"] = err
            except Exception as e:  # a variant that does not run here is reported, not fatal
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


def merge(D, inter, H, KV, hd, L, rank=128):
    """One layer's LoRA merge, all seven projections, fp32 adapters: ``addmm(out=)`` vs copy + ``addmm_``."""
    dev, dt = "cuda", torch.bfloat16
    shapes = [(H * hd, D), (KV * hd, D), (KV * hd, D), (D, H * hd), (inter, D), (inter, D), (D, inter)]
    layers = []
    for _ in range(L):
        layers.append([(torch.randn(n, k, device=dev, dtype=dt), torch.randn(rank, k, device=dev) * 0.01,
                        torch.randn(n, rank, device=dev) * 0.01, torch.empty(n, k, device=dev, dtype=dt)) for n, k in shapes])

    def addmm_out():
        for layer in layers:
            for base, A, B, w in layer:
                torch.addmm(base, B.to(dt), A.to(dt), alpha=0.5, out=w)

    def copy_then_addmm():
        for layer in layers:
            for base, A, B, w in layer:
                w.copy_(base)
                w.addmm_(B.to(dt), A.to(dt), alpha=0.5)

    nbytes = sum(n * k for n, k in shapes) * 2
    res = {}
    for name, fn in (("addmm_out", addmm_out), ("copy_then_addmm", copy_then_addmm)):
        us = graph_us(fn, L)
        res[name] = {"us_per_layer": us, "read_write_tbps": 2 * nbytes / us / 1e6}
    print(json.dumps(res), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="sa2va-4b", choices=sorted(SHAPES))
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--lmax", type=int, default=448, help="static cache slots (prompt + new tokens, bucketed)")
    ap.add_argument("--skip", default="", help="comma list: projections,attention,merge")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    D, inter, H, KV, hd, V, L = SHAPES[args.preset]
    batches = [int(b) for b in args.batches.split(",") if b]
    skip = set(args.skip.split(","))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset}
    if "projections" not in skip:
        res["projections"] = projections(D, inter, H, KV, hd, V, L, batches)
    if "attention" not in skip:
        res["attention"] = attention(D, H, KV, hd, L, batches, args.lmax)
    if "merge" not in skip:
        res["merge"] = merge(D, inter, H, KV, hd, L)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

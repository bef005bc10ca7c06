"""Markdown tables from ``gpu_loop1.py`` result files (the numbers as measured, nothing added).

    python benchmarks/loop1_report.py RESULT.json [MORE.json ...]   # one section per file

Each file gives: the step rows (samples/s, step time, peak memory, MFU of the forward/backward, and every
phase of the step — they add up to the step), the decode rows (per decode step against the bandwidth
bound) and, when present, the plain assembly and the Gumbel mix.
"""

from __future__ import annotations

import json
import sys

PHASES = ("glue", "vit", "sam2_encoder", "ema_swap", "teacher_prefill", "teacher_merge_lora", "teacher_decode",
          "forward1", "gumbel", "forward2+sam2_decoder", "backward", "optimizer", "ema_update")


def fmt(x, spec=".3f"):
    return "–" if x is None or x != x else format(x, spec)


def section(path: str) -> str:
    d = json.load(open(path))
    m = d["meta"]
    out = [f"### `{path.rsplit('/', 1)[-1]}`: {m['preset']} on {m['device']}, {m['date']}",
           "",
           f"torch {m['torch']}; T = {m['T']}, top-k = {m['topk']}; measured bf16 matmul {fmt(m['matmul_tflops'], '.0f')} "
           f"TFLOP/s, copy {fmt(m['copy_gbps'], '.0f')} GB/s; {m['params_total'] / 1e9:.2f} B parameters, "
           f"{m['params_trained'] / 1e6:.1f} M trained.", ""]
    fl = d.get("flops") or {}
    if fl.get("train_per_sample") == fl.get("train_per_sample") and fl.get("train_per_sample"):
        out += [f"FLOPs per sample: trainable part {fl['train_per_sample'] / 1e12:.2f} T, teacher generation "
                f"{fl['teacher_generation_per_sample'] / 1e12:.2f} T.", ""]
    rows = [r for r in d.get("steps", []) + d.get("plain_steps", [])]
    if rows:
        seen = [p for p in PHASES if any(p in r.get("phases_s", {}) for r in rows)]
        extra = sorted({k for r in rows for k in r.get("phases_s", {})} - set(seen))
        cols = seen + extra
        side = sorted({k for r in rows for k in r.get("side_phases_s", {})})
        out.append("| B | variant | samples/s | step s | peak GB | MFU fwd/bwd | " + " | ".join(cols) + " | sum of phases |"
                   + "".join(f" {k} (side stream, overlapped) |" for k in side))
        out.append("|" + "---|" * (7 + len(cols) + len(side)))
        for r in rows:
            if r.get("oom"):
                out.append(f"| {r['batch']} | {r['variant']} | OOM |" + " |" * (5 + len(cols) + len(side)))
                continue
            ph, sp = r.get("phases_s", {}), r.get("side_phases_s", {})
            out.append(f"| {r['batch']} | {r['variant']} | {r['samples_per_s']:.2f} | {r['step_s']:.3f} | "
                       f"{fmt(r.get('peak_mem_gb'), '.1f')} | {fmt(r.get('mfu_fwd_bwd'), '.1%')} | "
                       + " | ".join(fmt(ph.get(c)) for c in cols) + f" | {fmt(sum(ph.values()))} |"
                       + "".join(f" {fmt(sp.get(k))} |" for k in side))
        out.append("")
    oc = d.get("overlap_check")
    if oc:
        out += [f"Encoders on the side stream vs inline (B = {oc['batch']}, same seeds): loss {oc['loss_side']:.6f} vs "
                f"{oc['loss_inline']:.6f} (|diff| {oc['loss_abs_diff']:.2e}); largest gradient difference "
                f"{oc['grad_max_abs_diff']:.2e} (largest gradient {oc['grad_max_abs']:.2e}).", ""]
    gens = d.get("generation") or []
    if gens:
        out.append("| B | ours ms/step | bound ms | ours / bound | graph-only eager ms | dynamic loop ms | "
                   "transformers generate() ms | bound (old count) ms |")
        out.append("|---|---|---|---|---|---|---|---|")
        for g in gens:
            out.append(f"| {g['batch']} | {g['ours_step_ms']:.2f} | {fmt(g.get('bandwidth_bound_ms'), '.2f')} | "
                       f"{fmt(g.get('ours_fraction_of_bound'), '.0%')} | {g['graph_only_step_ms']:.2f} | "
                       f"{g['loop_step_ms']:.2f} | {g['hf_generate_step_ms']:.2f} | {fmt(g.get('bandwidth_bound_ms_old'), '.2f')} |")
        out.append("")
    gm = d.get("gumbel")
    if gm:
        out += [f"Gumbel mix {gm['shape']}: ours {gm['ours']['fwd_bwd_ms']:.1f} ms / {fmt(gm['ours']['peak_extra_gb'], '.2f')} GB, "
                f"loop over k {gm['plain_loop']['fwd_bwd_ms']:.1f} ms / {fmt(gm['plain_loop']['peak_extra_gb'], '.2f')} GB.", ""]
    return "\n".join(out)


def main(paths):
    if not paths:
        raise SystemExit(__doc__)
    print("\n\n".join(section(p) for p in paths))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Learning curves of the demo's SFT stage under variants of model size, freezing, lr and data.

Each variant trains the from-scratch tiny model with the real :class:`~maskloop.train.engine.Trainer`
(fp32, like the CPU demo, so a curve measured on a GPU holds step for step on the CPU) and evaluates
held-out referring cIoU every ``--eval-every`` steps.  Variants run as parallel processes (one per
variant), each until ``--steps`` or its wall-clock ``--deadline``.  One JSON line per evaluation goes
to ``OUT/<variant>.jsonl`` (with the text sensitivity: does the mask change when another object is
named?); ``--report`` prints a table of cIoU by step.  The processes share one GPU by time slicing: on an
H200, 16 of them ran at about 0.5 s per step each and 4 at about 0.17 s (results/demo_sweep.md).

    python benchmarks/demo_sweep.py --out OUT --variants base,demo_fz --steps 4000 --deadline 500
    python benchmarks/demo_sweep.py --report OUT
    python benchmarks/demo_sweep.py --time base,demo_fz      # CPU seconds per SFT step, 1 thread
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ALL_BUT_SAM_ENCODER = ("lora", "projector", "text_hidden_fcs", "sam2_decoder", "new_tokens", "vision", "llm_base")
LLM128 = {"llm.hidden_size": 128, "llm.intermediate_size": 256, "llm.num_heads": 8}
PD128 = {"sam2.prompt_dim": 128, "sam2.decoder_mlp_dim": 256}
COLOUR = {"expression_policy": "colour"}  # expressions name the target's colour (shapes.referring_expression)


def _v(model: str = "tiny-demo", frozen_sam: bool = True, init: bool = True, **kw) -> dict:
    """A variant: ``model`` preset, SAM2 encoder frozen or trained, width-aware init; ``train`` (TrainConfig
    fields), ``set`` (dotted model-config fields), ``data`` (kwargs of every shapes source), ``scenes``
    (training scenes per stream), ``streams`` (SFT streams, default refer + caption), ``zero_proj`` (mlp1's output layer starts at zero: constant image tokens
    at the start), ``dd`` (text_hidden_fcs' output layer rescaled on a first batch to zero mean and unit
    variance per channel)."""
    train = {"scratch_init": init, **kw.pop("train", {})}
    if frozen_sam:
        train["freeze"] = list(ALL_BUT_SAM_ENCODER)
    return {"model": model, "train": train, **kw}


VARIANTS: dict[str, dict] = {
    "base": _v("tiny", frozen_sam=False, init=False),  # the demo as it is
    "init": _v("tiny", frozen_sam=False),
    "demo": _v(frozen_sam=False),
    "demo_lr1": _v(frozen_sam=False, train={"lr": 1e-3}),
    "tiny_fz": _v("tiny"),
    "demo_fz": _v(),
    "demo_fz_lr1": _v(train={"lr": 1e-3}),
    "demo_fz_lr4": _v(train={"lr": 4e-3}),
    "demo_fz_bs16": _v(train={"batch_size": 16}),
    "demo_fz_llm128": _v(set=LLM128),
    "demo_fz_llm4l": _v(set={"llm.num_layers": 4}),
    "demo_fz_vit64": _v(set={"vision.hidden_size": 64, "vision.intermediate_size": 128, "vision.num_layers": 3}),
    "demo_fz_pd128": _v(set=PD128),
    "demo_fz_llm128_pd128": _v(set={**LLM128, **PD128}),
    "demo_fz_3obj": _v(data={"n_objects": [2, 3]}),
    "demo_fz_big_data": _v(scenes=50_000),
    # 4x4 image tokens (patch 8) instead of 8x8: fewer positions for the [SEG] token to average over
    "p8_fz": _v(set={"vision.patch_size": 8}),
    "p8c_fz": _v(set={"vision.patch_size": 8}, data=COLOUR),
    "p8c": _v(frozen_sam=False, set={"vision.patch_size": 8}, data=COLOUR),
    "p8c_fz_dd": _v(set={"vision.patch_size": 8}, data=COLOUR, dd=True, zero_proj=True),
}


# The SFT stage as the demo ran it when these variants were measured (2026-11-30, commit 461fc3d): one
# stage, everything trained, lr 2e-3, minimal expressions, no recency prior, and the tiny-demo preset of
# then (8x8 image tokens, the fixed answer "Sure, [SEG].").  The demo has moved on (maskloop/demo.py).
BASELINE = {"recipe": "sft", "model": "tiny", "freeze": "all", "ckpt_every": 0, "log_every": 10, "progress": False,
            "seed": 0, "batch_size": 8, "accumulation": 1, "lr": 2e-3, "warmup_ratio": 0.03}
OLD_TINY_DEMO = {"vision.patch_size": 4, "seg_answer": "fixed"}


def _set(cfg, dotted: str, value) -> None:
    obj = cfg
    *path, last = dotted.split(".")
    for p in path:
        obj = getattr(obj, p)
    if not hasattr(obj, last):
        raise KeyError(dotted)
    setattr(obj, last, value)


def make_trainer(name: str, steps: int, run_dir: Path):
    import copy

    from maskloop.model import presets as P
    from maskloop.train.engine import TrainConfig, Trainer

    v = VARIANTS[name]
    n = v.get("scenes", 4000)
    data = {"refer": [{"kind": "shapes_refer", "n": n, "seed": "train"}],
            "caption": [{"kind": "shapes_caption", "n": n, "seed": "train"}]}
    cfg = TrainConfig.from_mapping({**BASELINE, "steps": steps, "run_dir": str(run_dir),
                                    "data": {k: data[k] for k in v.get("streams", data)}})
    cfg.model = v.get("model", "tiny")
    cfg.precision = "fp32"
    for k, val in v.get("train", {}).items():
        setattr(cfg, k, tuple(val) if k == "freeze" else val)
    for stream in cfg.data.values():
        for spec in stream:
            spec.update(v.get("data", {}))
    preset = copy.deepcopy(P.PRESETS[cfg.model])
    for k, val in {**(OLD_TINY_DEMO if cfg.model == "tiny-demo" else {}), **v.get("set", {})}.items():
        _set(preset, k, val)
    original, P.PRESETS[cfg.model] = P.PRESETS[cfg.model], preset
    try:
        tr = Trainer(cfg)
    finally:  # the variant's preset lives for this trainer only
        P.PRESETS[cfg.model] = original
    if v.get("zero_proj"):
        import torch

        with torch.no_grad():
            pr = tr.model.internvl.model.multi_modal_projector
            pr.linear_2.weight.zero_()
            pr.linear_2.bias.zero_()
    if v.get("dd"):
        _standardise_seg_projection(tr.model)
    return tr


def _standardise_seg_projection(m) -> None:
    import random

    import torch

    from maskloop.data.mixture import collate
    from maskloop.data.sources.shapes import ShapesReferDataset
    from maskloop.data.transforms import SampleTransform

    c = m.cfg
    tf = SampleTransform(image_size=c.vision.image_size, sam_size=c.sam2.image_size, prompt_grid=c.prompt_grid)
    ds = ShapesReferDataset(128, seed=12345, transform=tf)
    b = collate([ds[i] for i in range(128)])
    dev = next(m.parameters()).device
    b = {k: v.to(dev) if hasattr(v, "to") else v for k, v in b.items()}
    cap = {}
    hk = m.text_hidden_fcs.register_forward_hook(lambda mod, i, o: cap.update(p=o))
    with torch.no_grad():
        m.segment(b["pixel_values"], m.sam_features(b["g_pixel_values"]), m.builder.expressions(list(b["expression"])),
                  m.builder.seg_question(128, random.Random(0)), lm_loss=False)
    hk.remove()
    mu, sd = cap["p"].mean(0), cap["p"].std(0).clamp(min=1e-6)
    lin = [x for x in m.text_hidden_fcs.modules() if isinstance(x, torch.nn.Linear)][-1]
    with torch.no_grad():
        lin.weight.mul_(1 / sd[:, None])
        lin.bias.sub_(mu).div_(sd)


def worker(name: str, out: Path, steps: int, every: int, deadline: float, val: int) -> None:
    import torch

    from maskloop.data.sources.shapes import ShapesReferDataset
    from maskloop.data.transforms import SampleTransform
    from maskloop.eval.metrics import RefSegMeter
    from maskloop.eval.refer import evaluate_text_sensitivity

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tr = make_trainer(name, steps, out / f"run_{name}")
    m = tr.model
    c = m.cfg
    tf = SampleTransform(image_size=c.vision.image_size, sam_size=c.sam2.image_size, prompt_grid=c.prompt_grid)
    data_kw = {k: tuple(x) if isinstance(x, list) else x for k, x in VARIANTS[name].get("data", {}).items()}
    vset = ShapesReferDataset(val, seed="val", transform=tf, with_other=True, **data_kw)
    n_params = sum(p.numel() for p in m.parameters())
    with open(out / f"{name}.jsonl", "w") as f:
        while tr.step < steps and time.perf_counter() - t0 < deadline:
            tr.fit(min(steps, tr.step + every))
            meter = RefSegMeter()
            text = evaluate_text_sensitivity(m, vset, 50, progress=False, meter=meter)
            r = meter.compute()
            h = tr.history[-1]
            row = {"variant": name, "step": tr.step, "wall_s": round(time.perf_counter() - t0, 1), "params": n_params,
                   "cIoU": r["cIoU"], "gIoU": r["gIoU"], "text_sensitivity": text["text_sensitivity"],
                   **{k: h[k] for k in ("loss_mask", "loss_dice", "loss_caption") if k in h}}
            f.write(json.dumps(row) + "\n")
            f.flush()


def report(out: Path) -> None:
    rows: dict[str, dict[int, dict]] = {}
    for p in sorted(out.glob("*.jsonl")):
        for line in p.read_text().splitlines():
            r = json.loads(line)
            rows.setdefault(r["variant"], {})[r["step"]] = r
    steps = sorted({s for v in rows.values() for s in v})
    print("| variant | " + " | ".join(str(s) for s in steps) + " |")
    print("|---" + "|---:" * len(steps) + "|")
    for name, by in rows.items():
        print(f"| {name} | " + " | ".join(f"{by[s]['cIoU']:.3f}" if s in by else "" for s in steps) + " |")


def cpu_time(names: list[str], n: int = 15) -> None:
    import tempfile

    import torch

    torch.set_num_threads(1)
    for name in names:
        with tempfile.TemporaryDirectory() as d:
            tr = make_trainer(name, 1000, Path(d))
            for _ in range(3):
                tr.train_step()
            t = time.perf_counter()
            for _ in range(n):
                tr.train_step()
            print(f"{name}: {(time.perf_counter() - t) / n:.3f} s per SFT step (1 thread)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--deadline", type=float, default=480.0, help="wall seconds per variant")
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--report", type=Path)
    ap.add_argument("--time")
    a = ap.parse_args()
    if a.report:
        return report(a.report)
    if a.time:
        return cpu_time(a.time.split(","))
    if a.worker:
        return worker(a.worker, a.out, a.steps, a.eval_every, a.deadline, a.val)
    a.out.mkdir(parents=True, exist_ok=True)
    names = a.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", n, "--out", str(a.out), "--steps", str(a.steps),
                               "--eval-every", str(a.eval_every), "--deadline", str(a.deadline), "--val", str(a.val)],
                              env=env, stdout=open(a.out / f"{n}.log", "w"), stderr=subprocess.STDOUT)
             for n in names]
    for p in procs:
        p.wait()
    report(a.out)


if __name__ == "__main__":
    main()

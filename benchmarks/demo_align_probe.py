"""Probe of the demo's alignment stage (issue 17, item 4): does it leave the ~0.3 plateau at a demo seed?

Runs only stage 1 of ``maskloop demo`` (FULL settings: referring only, the random LLM frozen) at a demo
seed, with optional changes, and prints one JSON line per evaluation: held-out referring cIoU and text
sensitivity (``--val`` scenes of seed ``val``) and the mean referring mask loss of the last window of
steps.  A spec is ``seed=S+flag+flag=value``; flags:

* ``steps=N`` / ``lr=X``   alignment steps / lr (default: ``demo.FULL``);
* ``lora`` / ``llm``       the LLM's LoRA adapters / its base weights trained too in the alignment stage;
* ``bow``                  the LLM bypassed: SAM2's prompt = text_hidden_fcs(mean embedding of the
                           expression's size / colour / shape words) -- is the SAM2 side the limit?
* ``rec=S``                the recency prior's strength (default ``demo.RECENCY``);
* ``nocf``                 the prior without ``content_free`` (the random query / key weights kept: the
                           demo before 2026-12-01);
* ``nozs``                 the [SEG] embedding not zeroed at init (``zero_seg_embed`` off: before 2026-12-01);
* ``al=G1,G2``             the alignment stage trains these parameter groups only (e.g. ``al=sam2_decoder``);
* ``sft=N``                then N steps of the demo's SFT stage 2 (``demo.FULL['sft']`` otherwise).

One spec a process, one thread each; several specs run side by side:

    python benchmarks/demo_align_probe.py --out OUT "seed=0" "seed=1" "seed=2+lora"

``--init-diag``: no training; for each spec, at init, over 300 held-out referring samples, the [SEG] state
(the input of text_hidden_fcs): the share of its variance that the target's colour / shape explains (R^2 of
the per-colour / per-shape means), the share of its second moment that varies at all (``var_share``; the
rest is one vector for every sample) and the colour's / shape's share of the second moment:

    python benchmarks/demo_align_probe.py --out OUT --init-diag "seed=0" "seed=1" "seed=1+nocf+nozs"
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _flags(spec: str) -> dict:
    fl = {}
    for f in spec.split("+"):
        k, _, v = f.partition("=")
        fl[k] = v or "1"
    return fl


def _eval(model, n_val: int) -> dict:
    from maskloop import demo
    from maskloop.data.sources.shapes import ShapesReferDataset
    from maskloop.data.transforms import SampleTransform
    from maskloop.eval.metrics import RefSegMeter
    from maskloop.eval.refer import evaluate_text_sensitivity

    c = model.cfg
    tf = SampleTransform(image_size=c.vision.image_size, sam_size=c.sam2.image_size, prompt_grid=c.prompt_grid)
    val = ShapesReferDataset(n_val, seed="val", transform=tf, with_other=True, expression_policy=demo.EXPRESSIONS)
    meter = RefSegMeter()
    text = evaluate_text_sensitivity(model, val, 50, progress=False, meter=meter)
    return {"cIoU": round(meter.compute()["cIoU"], 4), "text_sens": round(text["text_sensitivity"], 4)}


def _name(spec: str) -> str:
    return spec.replace("=", "").replace("+", "_").replace(",", "-")


def _r2(x, labels) -> float:
    x = x - x.mean(0)
    res = sum(((x[[i for i, y in enumerate(labels) if y == lab]] - x[[i for i, y in enumerate(labels) if y == lab]]
                .mean(0)) ** 2).sum() for lab in set(labels))
    return round(float(1 - res / (x ** 2).sum()), 3)


def _attribute_r2(model, n: int = 300) -> dict:
    """R^2 of the target's colour / shape for the [SEG] state (text_hidden_fcs input) of n held-out samples."""
    import torch

    from maskloop import demo
    from maskloop.data.sources.shapes import ShapesReferDataset
    from maskloop.data.transforms import SampleTransform
    from maskloop.eval.refer import eval_mode, image_features, loader, segment_texts

    c = model.cfg
    tf = SampleTransform(image_size=c.vision.image_size, sam_size=c.sam2.image_size, prompt_grid=c.prompt_grid)
    ds = ShapesReferDataset(n, seed="val", transform=tf, expression_policy=demo.EXPRESSIONS)
    objs = [(r["scene"].objects[r["object_index"]]) for r in (ds.raw(i) for i in range(n))]
    states = []
    hook = model.text_hidden_fcs.register_forward_hook(lambda mod, inp, o: states.append(inp[0].detach()))
    with eval_mode(model):
        for b in loader(ds, 50, 0, None):
            segment_texts(model, b, list(b["expression"]), feats=image_features(model, b))
    hook.remove()
    h = torch.cat(states)
    c2, s2 = _r2(h, [o.color for o in objs]), _r2(h, [o.shape for o in objs])
    var = float(((h - h.mean(0)) ** 2).sum() / (h ** 2).sum())  # the share of the second moment that varies
    return {"R2_colour": c2, "R2_shape": s2, "var_share": round(var, 3),
            "colour_share": round(var * c2, 3), "shape_share": round(var * s2, 3)}


def worker(spec: str, out: Path, every: int, n_val: int, init_diag: bool = False) -> None:
    import torch

    from maskloop import demo
    from maskloop.train.engine import Trainer

    torch.set_num_threads(1)
    fl = _flags(spec)
    seed = int(fl.get("seed", 0))
    S = copy.deepcopy(demo.FULL)
    if "steps" in fl:
        S["align"]["steps"] = int(fl["steps"])
    if "lr" in fl:
        S["align"]["lr"] = float(fl["lr"])
    if "rec" in fl:
        demo.RECENCY = float(fl["rec"])
    if "nocf" in fl:
        import functools

        import maskloop.model.init as init

        init.init_recency_prior = functools.partial(init.init_recency_prior, content_free=False)
    extra = tuple(g for g in ("lora", "llm") if g in fl)
    if extra:
        demo.STAGE_TRAINS = {**demo.STAGE_TRAINS,
                             "align": demo.STAGE_TRAINS["align"] + tuple("llm_base" if g == "llm" else g for g in extra)}
    if "al" in fl:
        demo.STAGE_TRAINS = {**demo.STAGE_TRAINS, "align": tuple(fl["al"].split(","))}
    run_dir = out / _name(spec)
    cfg = demo.train_config("align", S, run_dir, False, seed)
    if "nozs" in fl:
        cfg.zero_seg_embed = False
    tr = Trainer(cfg)
    m = tr.model
    if init_diag:
        print(json.dumps({"spec": spec, **_attribute_r2(m)}), flush=True)
        return
    if "bow" in fl:
        from maskloop.data.sources.shapes import COLORS, SHAPES, SIZES

        words = torch.tensor(m.tokenizer.convert_tokens_to_ids([*SHAPES, *COLORS, *SIZES]))

        def bow(hidden, input_ids, allowed=None):
            isw = torch.isin(input_ids, words.to(input_ids.device)).float()
            e = m.embed_tokens(input_ids) * isw[..., None]
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            return m.text_hidden_fcs(e.sum(1) / isw.sum(1, keepdim=True).clamp(min=1)), rows

        m.seg_prompt_embeds = bow
    rows = []

    def emit(stage, step, hist):
        losses = [h["loss_mask"] for h in hist if "loss_mask" in h][-15:]
        row = {"spec": spec, "stage": stage, "step": step, **_eval(m, n_val),
               "loss_mask": round(sum(losses) / max(len(losses), 1), 4), "t": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(out / "probe.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    t0 = time.perf_counter()
    n = S["align"]["steps"]
    for s in range(every, n + every, every):
        hist = tr.fit(min(s, n))
        emit("align", min(s, n), hist)
    if "sft" in fl:
        S["sft"]["steps"] = int(fl["sft"]) if fl["sft"] != "1" else S["sft"]["steps"]
        sft = Trainer(demo.train_config("sft", S, run_dir, False, seed), model=m)
        k = S["sft"]["steps"]
        for s in range(every, k + every, every):
            hist = sft.fit(min(s, k))
            emit("sft", min(s, k), hist)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("specs", nargs="*")
    ap.add_argument("--out", required=True)
    ap.add_argument("--every", type=int, default=250, help="evaluate every N steps")
    ap.add_argument("--val", type=int, default=200, help="held-out scenes")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--init-diag", action="store_true", help="only the [SEG] state's colour / shape R^2 at init")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.worker:
        worker(a.worker, out, a.every, a.val)
        return
    if a.init_diag:
        for s in a.specs:
            worker(s, out, a.every, a.val, init_diag=True)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--out", str(out), "--every", str(a.every),
                               "--val", str(a.val), "--worker", s], env=env,
                              stdout=open(out / f"{_name(s)}.log", "w"),
                              stderr=subprocess.STDOUT) for s in a.specs]
    for p in procs:
        p.wait()
    for line in (out / "probe.jsonl").read_text().splitlines() if (out / "probe.jsonl").exists() else []:
        print(line)


if __name__ == "__main__":
    main()

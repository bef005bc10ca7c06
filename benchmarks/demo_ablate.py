"""Ablations of the demo's SFT on top of ``demo_sweep`` variants: answer format, recency prior, frozen LLM.

A spec is ``VARIANT+flag+flag=value...`` (VARIANT from ``demo_sweep.VARIANTS``); each spec trains in its
own process (one thread; on CPU unless listed under ``--gpu``) through the real Trainer and writes one JSON
line per evaluation (held-out referring cIoU / gIoU and text sensitivity, 200 ``val`` scenes).  Flags:

* ``phrase``      referring answer "Sure, <p>{expr}</p> [SEG]." (model ``seg_answer="phrase"``);
* ``rec=S``       LLM recency prior of strength S at init (``init_recency_prior``) in the first kv group
                  of every layer, or in all of them with ``allheads``;
* ``frozenllm``   train only projector, text_hidden_fcs, SAM2 decoder and ViT (the demo's alignment stage);
  ``two=N``       ... then N more steps with everything but SAM2's image encoder (``lr2=`` its lr);
* ``bow``         bypass the LLM: SAM2's prompt = text_hidden_fcs(mean embedding of the expression's
                  size / colour / shape words) -- the ceiling of the SAM2 side with a clean code;
* ``lr=``, ``seed=``, ``st=`` (steps of the cosine), ``colour`` / ``minimal`` (expression policy),
  ``referonly`` (no caption stream), ``bce`` (no Dice), ``maskw=`` (mask-loss factor), ``fixedq`` (one
  question template), ``wscale=`` (content-word embedding rows scaled at init), ``hed=`` (Hiera width),
  ``zero_proj`` / ``dd`` (as in demo_sweep), ``encT`` (SAM2 encoder trained as well).

    python benchmarks/demo_ablate.py --out OUT --cpu "p8c_fz+phrase+rec=30+allheads+lr=1e-3+st=600+frozenllm+two=1000"
    python benchmarks/demo_ablate.py --report OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _flags(spec: str) -> tuple[str, dict]:
    base, *flags = spec.split("+")
    fl = {}
    for f in flags:
        k, _, v = f.partition("=")
        fl[k] = v or "1"
    return base, fl


def make(spec: str, steps: int, run_dir: Path):
    import copy

    import demo_sweep as D
    import torch

    base, fl = _flags(spec)
    V = D.VARIANTS[spec] = copy.deepcopy(D.VARIANTS[base])  # the spec's own copy: the base stays as defined
    for key in ("train", "data", "set"):
        V.setdefault(key, {})
    if "lr" in fl:
        V["train"]["lr"] = float(fl["lr"])
    if "seed" in fl:
        V["train"]["seed"] = int(fl["seed"])
    if "frozenllm" in fl:
        V["train"]["freeze"] = ["projector", "text_hidden_fcs", "sam2_decoder", "vision"]
    if "encT" in fl:
        V["train"]["freeze"] = "all"
    if "minimal" in fl:
        V["data"].pop("expression_policy", None)
    if "colour" in fl:
        V["data"]["expression_policy"] = "colour"
    if "hed" in fl:
        V["set"]["sam2.hiera_embed_dim"] = int(fl["hed"])
    if "phrase" in fl:
        V["set"]["seg_answer"] = "phrase"
    if "referonly" in fl:
        V["streams"] = ("refer",)
    V["zero_proj"] = "zero_proj" in fl or V.get("zero_proj", False)
    V["dd"] = "dd" in fl or V.get("dd", False)
    tr = D.make_trainer(spec, int(fl.get("st", steps)), run_dir)
    m = tr.model
    if "bce" in fl:
        m.cfg.dice_weight = 0.0
    if "maskw" in fl:
        m.cfg.bce_weight *= float(fl["maskw"])
        m.cfg.dice_weight *= float(fl["maskw"])
    if "fixedq" in fl:
        orig = m.builder.seg_question
        m.builder.seg_question = lambda B, rng=None, fixed=False: orig(B, fixed=True)
    words = None
    if "wscale" in fl or "bow" in fl:
        from maskloop.data.sources.shapes import COLORS, SHAPES, SIZES

        words = torch.tensor(m.tokenizer.convert_tokens_to_ids([*SHAPES, *COLORS, *SIZES]))
    if "wscale" in fl:
        with torch.no_grad():
            m.embed_matrix[words] *= float(fl["wscale"])
    if "rec" in fl:
        from maskloop.model.init import init_recency_prior

        init_recency_prior(m, float(fl["rec"]), kv_groups=m.cfg.llm.num_kv_heads if "allheads" in fl else 1)
    if "bow" in fl:
        def bow(hidden, input_ids, allowed=None):  # one prompt a row: (prompts (B, C), rows (B,))
            isw = torch.isin(input_ids, words.to(input_ids.device)).float()
            e = m.embed_tokens(input_ids) * isw[..., None]
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            return m.text_hidden_fcs(e.sum(1) / isw.sum(1, keepdim=True).clamp(min=1)), rows

        m.seg_prompt_embeds = bow
    return tr, V, fl


def worker(spec: str, out: Path, steps: int, every: int, deadline: float, val: int) -> None:
    import copy

    import demo_sweep as D
    import torch

    from maskloop.data.sources.shapes import ShapesReferDataset
    from maskloop.data.transforms import SampleTransform
    from maskloop.eval.metrics import RefSegMeter
    from maskloop.eval.refer import evaluate_text_sensitivity
    from maskloop.train.engine import Trainer

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tag = spec.replace("+", "_").replace("=", "").replace("/", "")
    tr, V, fl = make(spec, steps, out / f"run_{tag}")
    m, c = tr.model, tr.model.cfg
    tf = SampleTransform(image_size=c.vision.image_size, sam_size=c.sam2.image_size, prompt_grid=c.prompt_grid)
    data_kw = {k: tuple(x) if isinstance(x, list) else x for k, x in V.get("data", {}).items()}
    vset = ShapesReferDataset(val, seed="val", transform=tf, with_other=True, **data_kw)
    phase, done = 1, 0
    with open(out / f"{tag}.jsonl", "w") as f:
        while time.perf_counter() - t0 < deadline:
            if tr.step >= tr.cfg.steps:
                if phase == 2 or "two" not in fl:
                    break
                done, phase = tr.step, 2
                cfg2 = copy.deepcopy(tr.cfg)
                cfg2.steps, cfg2.scratch_init, cfg2.seed = int(fl["two"]), False, cfg2.seed + 7
                cfg2.freeze, cfg2.run_dir = tuple(D.ALL_BUT_SAM_ENCODER), str(out / f"run_{tag}_2")
                cfg2.lr = float(fl.get("lr2", cfg2.lr))
                tr = Trainer(cfg2, model=m)
            tr.fit(min(tr.cfg.steps, tr.step + every))
            meter = RefSegMeter()
            text = evaluate_text_sensitivity(m, vset, 50, progress=False, meter=meter)
            r, h = meter.compute(), tr.history[-1]
            row = {"spec": spec, "dev": str(tr.device), "phase": phase, "step": done + tr.step,
                   "wall_s": round(time.perf_counter() - t0, 1), "cIoU": round(r["cIoU"], 4),
                   "gIoU": round(r["gIoU"], 4), "ts": round(text["text_sensitivity"], 4),
                   **{k: round(h[k], 4) for k in ("loss_mask", "loss_lm", "loss_caption") if k in h}}
            f.write(json.dumps(row) + "\n")
            f.flush()


def report(out: Path) -> None:
    rows: dict[str, list] = {}
    for p in sorted(out.glob("*.jsonl")):
        for line in p.read_text().splitlines():
            r = json.loads(line)
            rows.setdefault(r["spec"], []).append(r)
    for spec, rs in rows.items():
        print(f"{spec:60s}", " ".join(f"{r['step']}:{r['cIoU']:.2f}/{r['ts']:.2f}" for r in rs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cpu", default="", help="comma-separated specs run on the CPU")
    p.add_argument("--gpu", default="", help="comma-separated specs run on the GPU")
    p.add_argument("--steps", type=int, default=2000, help="steps per spec (cosine length) unless st= says")
    p.add_argument("--every", type=int, default=300)
    p.add_argument("--deadline", type=float, default=500, help="seconds per spec")
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true")
    a = p.parse_args()
    out = Path(a.out)
    if a.report:
        return report(out)
    out.mkdir(parents=True, exist_ok=True)
    if a.worker:
        return worker(a.worker, out, a.steps, a.every, a.deadline, a.val)
    procs = []
    for dev, specs in (("cpu", a.cpu), ("gpu", a.gpu)):
        for s in filter(None, specs.split(",")):
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            if dev == "cpu":
                env["CUDA_VISIBLE_DEVICES"] = ""
            log = open(out / f"{dev}_{s.replace('+', '_').replace('=', '')}.log", "w")
            procs.append(subprocess.Popen([sys.executable, __file__, "--out", str(out), "--worker", s, "--steps",
                                           str(a.steps), "--every", str(a.every), "--deadline", str(a.deadline),
                                           "--val", str(a.val)], env=env, stdout=log, stderr=subprocess.STDOUT))
    for pr in procs:
        pr.wait()
    report(out)


if __name__ == "__main__":
    main()

"""The embedded demo: the whole idea on a laptop-class CPU, nothing downloaded.

``maskloop demo`` (``make demo``):

1. builds the ``tiny-demo`` preset from scratch (random init, word tokenizer over the shapes-world words)
   and evaluates it untrained.  Two choices make a from-scratch LLM usable within minutes: the referring
   answer repeats the expression right before [SEG] ("Sure, <p>the red circle</p> [SEG].", Sa2VA's phrase
   markup; ``seg_answer="phrase"``), the LLM's attention starts with a recency prior and no content term
   (:func:`maskloop.model.init.init_recency_prior`, ``content_free``), and the [SEG] token's input
   embedding starts at zero (:func:`maskloop.model.init.init_seg_embedding_zero`), so that SAM2's prompt is
   a function of the expression from the first step, at every seed, instead of one vector for every sample
   plus a random share of the expression's words (benchmarks/results/demo_seeds.md);
2. **SFT** on the shapes world, referring segmentation (expression -> [SEG] -> mask) and region captioning
   (mask -> caption), in two stages: *alignment*, referring only with the LLM frozen (SAM2's decoder,
   text_hidden_fcs, the ViT and the projector learn to use the [SEG] state as it is), then both tasks with
   everything but SAM2's image encoder trained;
3. the **dual** recipe (docs/recipes.md, "Dual"): Loop 1 (mask -> EMA-teacher caption -> Gumbel pseudo-tokens ->
   mask, with interleaved referring batches) and Loop 2 (caption -> mask -> caption), combined by
   gradient surgery;
4. evaluation on held-out scenes (``seed='val'``) after each stage: referring cIoU / gIoU, text
   sensitivity (does the mask change when another object is named?), caption metrics, cycle IoU =
   IoU(mask, segment(describe(mask)));
5. a video result (:mod:`maskloop.demo_video`): referring video segmentation of held-out moving-object
   clips through Sa2VA's video protocol (SAM2 memory untrained) beside the per-frame image path, J&F and a
   strip of frames (``video_strip.png``);
6. a run directory with ``report.md`` / ``report.html``, ``curves.png``, ``examples_*.png``,
   ``metrics.json``, the training logs (``align/``, ``sft/``, ``dual/``) and the final model (``model/``, a
   checkpoint folder that ``maskloop caption|segment|eval --checkpoint`` accept).

``--quick`` runs the same pipeline with fewer steps and scenes (CI, about 2 minutes).
Threads: one by default.  On a small machine shared with other jobs, two OpenMP threads per process
contend for the cores and a training step can slow down a hundredfold; one thread is only ~20%
slower than two on an idle machine.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

# Training settings (everything else: TrainConfig defaults).  Tuned on a 2-core CPU; see the report and
# benchmarks/results/demo_sweep.md.
FULL = {
    "scenes": 4000,  # training scenes per stream
    "val_scenes": 200,  # held-out scenes for every metric
    # 1500 + 1600 SFT steps (were 1200 + 1200; the mask loss was still falling at 1200, and seed 0 picked the
    # wrong object) in the time that the caches of the scenes and of SAM2's frozen encoder maps saved
    # (BACKBONE_CACHE_BYTES, shapes.SCENE_CACHE) and 150 fewer dual steps: with 300 the run took 631 s alone,
    # and the loop moved referring cIoU by -0.008..0.000 (1300 + 1400 SFT steps: seed 0 at 0.584)
    "align": {"steps": 1500, "batch_size": 8, "accumulation": 1, "lr": 1e-3, "warmup_ratio": 0.03},
    "sft": {"steps": 1600, "batch_size": 8, "accumulation": 1, "lr": 5e-4, "warmup_ratio": 0.03},
    "dual": {"steps": 150, "batch_size": 8, "accumulation": 1, "lr": 2e-4, "warmup_ratio": 0.05,
             # three of four Loop-1 batches referring (0.5 lost 0.01 more referring cIoU in the loop)
             "ema_decay": 0.99, "loop1": {"caption_len": 12, "topk": 16, "refer_ratio": 0.75},
             "loop2": {"caption_len": 12}},
    "examples": 6,
}
QUICK = {
    "scenes": 800,
    "val_scenes": 48,
    # 400 alignment steps (150 left the masks ignoring the text: text sensitivity 0.005 after SFT) and half
    # the Loop-1 batches referring (0.25 undid it in the dual loop: 0.10); with both 0.50 / 0.44
    "align": {"steps": 400, "batch_size": 8, "accumulation": 1, "lr": 1e-3, "warmup_ratio": 0.03},
    "sft": {"steps": 150, "batch_size": 8, "accumulation": 1, "lr": 1e-3, "warmup_ratio": 0.03},
    "dual": {"steps": 30, "batch_size": 8, "accumulation": 1, "lr": 2e-4, "warmup_ratio": 0.05,
             "ema_decay": 0.99, "loop1": {"caption_len": 12, "topk": 16, "refer_ratio": 0.5},
             "loop2": {"caption_len": 12}},
    "examples": 4,
}
MODEL = "tiny-demo"  # from scratch: width-aware init, the content-free recency prior, a zero [SEG] embedding
# maskloop.model.init.init_recency_prior strength (every head).  At 8 the region tokens of a caption prompt
# (18-26 tokens before the caption's words) started 10-15 logits down and the captioner never learnt to read
# them: one colour and shape for every region (colour right for 19 % of the held-out regions, chance 17 %;
# CIDEr 1.0-1.4).  At 4 (5-7 logits down) the colour is right for 84-89 % (CIDEr 3-3.8), and the [SEG]
# state still reads the expression (benchmarks/results/demo_seeds.md).
RECENCY = 4.0
EXPRESSIONS = "colour"  # held-out referring expressions name the target's colour (shapes.referring_expression)
# The training referring data: one source per expression policy, share x ``scenes`` items.  The held-out
# form for every scene, plus a quarter as many 'varied' expressions that may also name the size and / or the
# location the way the region captions do ("the small red triangle in the top left"), so that the cycle's
# segment(caption) reads a text like those it was trained on: with colour expressions alone the segmenter
# does not read the captions (cycle mIoU 0.27-0.34 with the captioner right about the colour), with these
# 0.60-0.64 (benchmarks/results/demo_seeds.md).
TRAIN_EXPRESSIONS = {"colour": 1.0, "varied": 0.25}
# What each stage trains.  SAM2's image encoder is never trained: at its random init it is a fixed feature
# extractor that the mask decoder learns to read (training it at the demo's lr made referring worse).
# Stage 1 (alignment, referring only) keeps the random LLM frozen, so the [SEG] state stays the function of
# the expression that the recency prior makes it while SAM2's decoder learns to use it; trained with it,
# the LLM drifts faster than the decoder learns and the prompt collapses to "every object"
# (benchmarks/results/demo_sweep.md).  SFT then trains the LLM too, with region captioning.  The
# loops train what docs/recipes.md trains plus the LLM base (from scratch, LoRA alone would be a small share of it);
# the vision tower is kept frozen there, as the loops' ViT-feature sharing between teacher and student assumes.
STAGE_TRAINS = {
    "align": ("projector", "text_hidden_fcs", "sam2_decoder", "vision"),
    "sft": ("lora", "projector", "text_hidden_fcs", "sam2_decoder", "new_tokens", "vision", "llm_base"),
    "dual": ("lora", "projector", "text_hidden_fcs", "sam2_decoder", "new_tokens", "llm_base"),
}
SEEDS = {"align": 0, "sft": 1, "dual": 2}  # initialisation (align) and data order of each stage (demo seed 0)
EVAL_BATCH = 50
# The frozen SAM2 image encoder's maps of every image, kept after its first batch (SAM2Head.backbone_cache):
# the demo reads each of its 4000 training scenes ~20 times, and the encoder was ~40 % of an alignment
# step's time and ~30 % of an SFT step's.  At most this many bytes (~344 kB per 128-px image; the FULL run
# fills it: 2.5 GB resident in all); 0: off.
BACKBONE_CACHE_BYTES = 2 << 30
MAX_NEW_TOKENS = 12  # shapes captions are at most 8 words


def _data(n: int) -> dict:
    return {
        "refer": [{"kind": "shapes_refer", "n": round(n * share), "seed": "train", "expression_policy": p}
                  for p, share in TRAIN_EXPRESSIONS.items()],
        "caption": [{"kind": "shapes_caption", "n": n, "seed": "train"}],
        "pairs": [{"kind": "shapes_pairs", "n": n, "seed": "train"}],
        "dam": [{"kind": "shapes_caption", "n": n, "seed": "train"}],
    }


def stage_seed(stage: str, seed: int = 0) -> int:
    """The training seed of ``stage`` for demo seed ``seed`` (0: :data:`SEEDS`; seed s shifts every stage by 3 s)."""
    return SEEDS[stage] + 3 * seed


def train_config(stage: str, settings: dict, run_dir: Path, progress: bool, seed: int = 0,
                 logging: str = "tensorboard"):
    """The TrainConfig of demo stage ``align`` / ``sft`` (recipe sft) or ``dual`` at demo seed ``seed``."""
    from maskloop.config import TrainConfig

    data = _data(settings["scenes"])
    if stage == "align":  # the frozen random LLM cannot learn captions: referring only
        data = {"refer": data["refer"]}
    return TrainConfig.from_mapping({
        "recipe": "dual" if stage == "dual" else "sft", "model": MODEL, "run_dir": str(run_dir / stage),
        "scratch_init": True, "recency_init": RECENCY, "zero_seg_embed": True, "freeze": list(STAGE_TRAINS[stage]),
        "ckpt_every": 0, "log_every": 10, "progress": progress, "seed": stage_seed(stage, seed),
        "logging": logging,
        "data": data, **settings[stage],
    })


def evaluate(model, settings: dict, progress: bool, examples: int = 0) -> tuple[dict, list]:
    """Held-out referring, caption and cycle metrics of ``model``; plus example rows for the grid."""
    from maskloop.data.sources.shapes import ShapesReferDataset, ShapesRegionCaptionDataset
    from maskloop.data.transforms import SampleTransform
    from maskloop.eval.cycle import evaluate_cycle
    from maskloop.eval.metrics import RefSegMeter
    from maskloop.eval.refer import evaluate_text_sensitivity

    c = model.cfg
    tf = SampleTransform(image_size=c.vision.image_size, sam_size=c.sam2.image_size, prompt_grid=c.prompt_grid)
    n = settings["val_scenes"]
    meter = RefSegMeter()  # referring metrics from the same pass as the text sensitivity
    val = ShapesReferDataset(n, seed="val", transform=tf, with_other=True, expression_policy=EXPRESSIONS)
    text = evaluate_text_sensitivity(model, val, EVAL_BATCH, progress=progress, meter=meter)
    refer = meter.compute()
    cyc = evaluate_cycle(model, ShapesRegionCaptionDataset(n, seed="val", transform=tf), EVAL_BATCH, MAX_NEW_TOKENS,
                         keep_examples=examples, progress=progress)
    return {"refer": refer, "text": text, "cycle": cyc["cycle"], "caption": cyc["caption"]}, cyc["examples"]


def _summary(m: dict) -> dict:
    return {"refer_cIoU": m["refer"]["cIoU"], "refer_gIoU": m["refer"]["gIoU"],
            "refer_text_sensitivity": m["text"]["text_sensitivity"],
            "cycle_mIoU": m["cycle"]["cycle_mIoU"], "cycle_cIoU": m["cycle"]["cycle_cIoU"],
            "caption_CIDEr": m["caption"].get("CIDEr", float("nan")),
            "caption_BLEU-4": m["caption"].get("BLEU-4", float("nan")),
            "caption_METEOR-nosyn": m["caption"].get("METEOR-nosyn", float("nan"))}


def _curves(sft_hist: list[dict], dual_hist: list[dict], sft_steps: int, evals: dict, path: Path) -> Path:
    from maskloop.eval.report import save_curves

    def series(hist, key, offset=0):
        return [(h["step"] + offset, h[key]) for h in hist if key in h]

    scalars = {
        "total loss/sft": series(sft_hist, "loss"),
        "total loss/dual (loss1 + loss2)": series(dual_hist, "loss", sft_steps),
        "mask loss/sft referring": series(sft_hist, "loss_mask"),
        "mask loss/dual referring": series(dual_hist, "refer/loss_mask", sft_steps),
        "mask loss/dual loop 1 (cycle)": series(dual_hist, "loop1/loss_mask", sft_steps),
        "caption loss/sft": series(sft_hist, "loss_caption"),
        "caption loss/dual loop 2": series(dual_hist, "loop2/loss_caption", sft_steps),
        "held-out IoU/referring cIoU": [(s, m["refer_cIoU"]) for s, m in evals.items()],
        "held-out IoU/cycle mIoU": [(s, m["cycle_mIoU"]) for s, m in evals.items()],
        "learning rate/sft": series(sft_hist, "lr"),
        "learning rate/dual": series(dual_hist, "lr", sft_steps),
    }
    return save_curves({k: v for k, v in scalars.items() if v}, path,
                       title=f"SFT (steps 0-{sft_steps}) then the dual loop")


def _pivot(stages: dict[str, dict]) -> tuple[list[str], str]:
    """A comparison table (metric x stage) as markdown lines and HTML."""
    import html

    names = list(next(iter(stages.values())))
    head = ["metric", *stages]
    md = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(stages) + "|"]
    h = ["<table><tr>" + "".join(f"<th>{html.escape(x)}</th>" for x in head) + "</tr>"]
    for n in names:
        vals = [f"{stages[s][n]:.3f}" for s in stages]
        md.append(f"| {n} | " + " | ".join(vals) + " |")
        h.append(f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td class='v'>{v}</td>" for v in vals) + "</tr>")
    h.append("</table>")
    return md, "\n".join(h)


def write_demo_report(run_dir: Path, results: dict, curves: Path, grid: Path, grid_sft: Path) -> Path:
    from maskloop.demo_video import video_section
    from maskloop.eval.report import write_report

    stages = {"untrained": results["summary"]["untrained"], "after SFT": results["summary"]["sft"],
              "after dual loop": results["summary"]["dual"]}
    s = results["settings"]
    notes = [
        f"Tiny Sa2VA-family model ({MODEL}) trained from scratch on the synthetic shapes world "
        f"({s['scenes']} training scenes per stream) on {results['threads']} CPU thread(s): "
        f"SFT for {s['align']['steps']} steps of referring with the LLM frozen (alignment) and "
        f"{s['sft']['steps']} of referring + region captioning with it trained, then the dual recipe "
        f"(Loop 1 + Loop 2 with gradient surgery) for "
        f"{s['dual']['steps']} steps. Wall time {results['wall_s']:.0f} s "
        f"(SFT {results['times']['sft']:.0f} s, dual {results['times']['dual']:.0f} s, "
        f"evaluation {results['times']['eval']:.0f} s).",
        f"All metrics on {s['val_scenes']} held-out scenes (seed 'val'). Referring: the ground-truth "
        "expression (naming the target's colour) is segmented with the answer 'Sure, <p>{expression}</p> [SEG].'; "
        "cIoU = sum I / sum U, gIoU = mean IoU. "
        "Cycle: the model captions the region (greedy), segments its own caption, IoU with the source mask. "
        "Captions: BLEU / CIDEr / METEOR without synonyms, against the shapes-world caption. "
        "Text sensitivity: each image is also segmented for a second object's expression; 1 - mean IoU of the two "
        "predicted masks (0: the same mask whatever the text asks, e.g. the union of all objects).",
    ]
    flat = {f"{stage}/{section}": vals for stage in ("untrained", "sft", "dual")
            for section, vals in results[stage].items()}
    images = {"Examples after SFT (before the dual loop)": grid_sft}
    video = results.get("video")
    if video:
        v_caption, v_md, v_html = video_section(video)
        images[v_caption] = video["strip"]
    md_path = write_report(run_dir, flat, curves, grid, title="maskloop demo: describe regions, segment descriptions",
                           notes=notes, extra_images=images)
    md_table, html_table = _pivot(stages)
    md = md_path.read_text(encoding="utf-8")
    md = md.replace("## Metrics\n", "## Metrics\n\n" + "\n".join(md_table) + "\n\nAll numbers:\n", 1)
    if video:  # the video numbers under the strip
        img = f"]({Path(video['strip']).name})"
        md = md.replace(img, img + "\n\n" + "\n".join(v_md), 1)
    md_path.write_text(md, encoding="utf-8")
    html_path = run_dir / "report.html"
    h = html_path.read_text(encoding="utf-8")
    h = h.replace("<h2>Metrics</h2>", "<h2>Metrics</h2>\n" + html_table + "\n<h3>All numbers</h3>", 1)
    if video:
        src = f"<img src='{Path(video['strip']).name}'"
        at = h.find(src)
        end = h.find(">", at) + 1
        h = h[:end] + "\n" + v_html + h[end:]
    html_path.write_text(h, encoding="utf-8")
    return md_path


def run_demo(run_dir: str | Path = "runs/demo", quick: bool = False, threads: int | None = 1,
             progress: bool = True, settings: dict | None = None, seed: int = 0,
             logging: str = "tensorboard") -> dict:
    """The whole demo at demo seed ``seed`` (:func:`stage_seed`); ``logging``: the runs' scalar logger
    (``tensorboard`` or ``wandb``; with wandb the example grids are logged as images too)."""
    from maskloop.demo_video import shapes_video_result
    from maskloop.eval.report import example_grid
    from maskloop.model.checkpoints import save_published
    from maskloop.train.engine import Trainer

    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    settings = settings or (QUICK if quick else FULL)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for sub in STAGE_TRAINS:  # the trainer appends to metrics.jsonl: start these logs afresh
        if (run_dir / sub).is_dir():
            shutil.rmtree(run_dir / sub)
    say = print if progress else (lambda *a, **k: None)
    times = {"eval": 0.0}

    say(f"[1/6] building the {MODEL} model from scratch; evaluating it untrained ({settings['val_scenes']} held-out scenes)")
    align = Trainer(train_config("align", settings, run_dir, progress, seed, logging))
    model = align.model
    if BACKBONE_CACHE_BYTES:
        from maskloop.model.sam2_head import BackboneCache

        model.sam.backbone_cache = BackboneCache(BACKBONE_CACHE_BYTES)
    t = time.perf_counter()
    m0, _ = evaluate(model, settings, progress)
    times["eval"] += time.perf_counter() - t

    say(f"[2/6] SFT stage 1 (alignment; LLM frozen): referring + region captioning, {settings['align']['steps']} steps")
    t = time.perf_counter()
    align_hist = align.fit()
    say(f"[3/6] SFT stage 2 (LLM trained too), {settings['sft']['steps']} steps")
    sft_hist = Trainer(train_config("sft", settings, run_dir, progress, seed, logging), model=model).fit()
    times["sft"] = time.perf_counter() - t
    t = time.perf_counter()
    m1, ex1 = evaluate(model, settings, progress, settings["examples"])
    times["eval"] += time.perf_counter() - t
    say(f"      after SFT: referring cIoU {m1['refer']['cIoU']:.3f}, cycle mIoU {m1['cycle']['cycle_mIoU']:.3f}")

    say(f"[4/6] dual loop (Loop 1 + Loop 2, gradient surgery), {settings['dual']['steps']} steps")
    t = time.perf_counter()
    dual = Trainer(train_config("dual", settings, run_dir, progress, seed, logging), model=model)
    dual_hist = dual.fit()
    times["dual"] = time.perf_counter() - t

    say("[5/6] evaluating after the dual loop (and on moving-object video clips)")
    t = time.perf_counter()
    m2, ex2 = evaluate(model, settings, progress, settings["examples"])
    times["eval"] += time.perf_counter() - t
    t = time.perf_counter()  # the video result: held-out moving-object clips (maskloop.demo_video)
    video = shapes_video_result(model, run_dir, expression_policy=EXPRESSIONS)
    times["video"] = time.perf_counter() - t

    say("[6/6] writing the report and the model")
    n_align, n_sft = settings["align"]["steps"], settings["sft"]["steps"]
    sft_steps = n_align + n_sft
    summary = {"untrained": _summary(m0), "sft": _summary(m1), "dual": _summary(m2)}
    evals = {0: summary["untrained"], sft_steps: summary["sft"], sft_steps + settings["dual"]["steps"]: summary["dual"]}
    sft_all = align_hist + [{**h, "step": h["step"] + n_align} for h in sft_hist]
    curves = _curves(sft_all, dual_hist, sft_steps, evals, run_dir / "curves.png")
    grid = example_grid(ex2, run_dir / "examples_dual.png")
    grid_sft = example_grid(ex1, run_dir / "examples_sft.png")
    dual.logger.log_image("examples/after_sft", grid_sft)  # into the dual run's TensorBoard / W&B log, last step
    dual.logger.log_image("examples/after_dual", grid)
    dual.logger.close()
    save_published(model, run_dir / "model")
    model.sam.backbone_cache = None  # free the stored maps
    results = {"untrained": m0, "sft": m1, "dual": m2, "summary": summary, "settings": settings,
               "threads": torch.get_num_threads(), "times": times, "seed": seed,
               "video": {**video, "strip": str(video["strip"])}}
    results["wall_s"] = time.perf_counter() - t_start
    md = write_demo_report(run_dir, results, curves, grid, grid_sft)
    results["wall_s"] = time.perf_counter() - t_start
    (run_dir / "metrics.json").write_text(json.dumps(results, indent=1))
    if progress:
        print()
        print(f"{'':24}{'untrained':>12}{'after SFT':>12}{'after dual':>12}")
        for k in summary["untrained"]:
            print(f"{k:24}" + "".join(f"{summary[s][k]:12.3f}" for s in ("untrained", "sft", "dual")))
        print(f"\nwall time {results['wall_s']:.0f} s; run directory {run_dir}")
    return {**results, "run_dir": run_dir, "report_md": md, "report_html": run_dir / "report.html"}


__all__ = ["FULL", "QUICK", "evaluate", "run_demo", "train_config"]

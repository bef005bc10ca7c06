"""``maskloop <verb>``: demo, train, eval, caption, segment, data, export.

    maskloop demo [--run-dir runs/demo] [--quick]
    maskloop train --config configs/sft.yaml [--set steps=2000 --set lr=1e-5] [--resume auto|DIR]
    maskloop eval --checkpoint RUN_OR_FOLDER [--refcoco ROOT --refcoco-dataset refcoco refcoco+ refcocog] [--out results.json]
    maskloop caption --checkpoint RUN_OR_FOLDER --image img.png --mask mask.png [mask2.png ...] [--out overlay.png]
    maskloop segment --checkpoint RUN_OR_FOLDER --image img.png --text "the red circle" [--out overlay.png]
    maskloop segment --checkpoint RUN_OR_FOLDER --image img.png --question "Please segment the cat and the dog."
    maskloop segment --checkpoint RUN_OR_FOLDER --video clip.mp4 --text "the red car" [--text ...] [--out-dir DIR]
    maskloop data check --source refcoco /data/refcoco
    maskloop data import --from coco|folder|sa2va SRC --out DIR
    maskloop serve --checkpoint RUN_OR_FOLDER [--port 7860]
    maskloop export sa2va --checkpoint RUN_OR_FOLDER --out DIR [--base SA2VA_FOLDER] [--dtype bf16]
    maskloop export psalm-to-deformable baseline.safetensors deformable.safetensors

A missing path, a bad config or an unreadable checkpoint ends with one ``error: ...`` line naming the
thing and exit code 2 (no traceback; ``MASKLOOP_DEBUG=1`` or ``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from maskloop.errors import MaskloopError, UsageError


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors printed as one ``error:`` line: the :class:`~maskloop.errors.MaskloopError` family."""
    return (MaskloopError, FileNotFoundError)


def _set_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _need_file(path: str | None, what: str) -> Path:
    if not path:
        raise UsageError(f"{what} is required")
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} not found: {p}")
    return p


# ----------------------------------------------------------------------------------------------
# verbs


def cmd_demo(args) -> int:
    from maskloop.demo import run_demo

    res = run_demo(args.run_dir, quick=args.quick, threads=args.threads, progress=not args.no_progress,
                   seed=args.seed, logging=args.logging)
    print(f"\nreport: {res['report_html']}")
    return 0


def cmd_train(args) -> int:
    from maskloop import recipes
    from maskloop.config import TrainConfig
    from maskloop.train.checkpoint import latest_checkpoint
    from maskloop.train.engine import Trainer

    cfg_path = _need_file(args.config, "config file")
    overrides = list(args.set or []) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    cfg = TrainConfig.from_yaml(cfg_path, overrides)
    if args.dry_run:
        return _dry_run(cfg, args.world_size)
    if cfg.init_from and not Path(cfg.init_from).exists():
        raise UsageError(f"init_from checkpoint not found: {cfg.init_from}")
    resume = None
    if args.resume == "auto":
        ckpts = Path(cfg.run_dir) / "checkpoints"
        resume = latest_checkpoint(ckpts)
        if resume is None:
            print(f"resume: no checkpoint in {ckpts}, starting fresh")
    elif args.resume:  # a step directory, a checkpoints/ folder, or a run directory (its checkpoints/)
        resume = _need_file(args.resume, "resume checkpoint")
    _set_threads(args.threads)
    trainer = Trainer(cfg, recipe=recipes.get(cfg))
    if resume is not None:
        trainer.resume(resume)
    history = trainer.fit()
    if history:
        last = {k: v for k, v in history[-1].items() if isinstance(v, (int, float)) and not k.startswith("surgery/")}
        print("final: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(last.items())))
    if args.export:
        from maskloop.model.checkpoints import save_published

        print(f"exported: {save_published(trainer.model, args.export)}")
    return 0


def _dry_run(cfg, world_size: int | None) -> int:
    from maskloop.model.presets import PRESETS
    from maskloop.train.memory import format_plan, plan_memory

    if cfg.model not in PRESETS:
        raise UsageError(f"--dry-run plans a preset's shapes; model={cfg.model!r} is not one of {sorted(PRESETS)}")
    ws = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    batch = cfg.batch_size
    if cfg.global_batch:
        from maskloop.train.sharding import per_rank_batch

        batch = per_rank_batch(cfg.global_batch, ws, cfg.accumulation)
    plan = plan_memory(cfg.model, batch_size=batch, world_size=ws, distributed=cfg.distributed,
                       checkpointing=cfg.activation_checkpointing, shard_frozen=cfg.fsdp_shard_frozen,
                       freeze=cfg.freeze, forwards_with_grad=2 if cfg.recipe in ("loop1", "dual") else 1,
                       bf16=cfg.precision != "fp32")
    print(format_plan(plan))
    return 0


def cmd_eval(args) -> int:
    """Thin: load, build the eval datasets, run the suite (:mod:`maskloop.eval.suite`), print, write JSON."""
    from maskloop.eval.suite import eval_datasets, format_table, run_eval
    from maskloop.inference import load_model

    _set_threads(args.threads)
    model = load_model(_need_file(args.checkpoint, "checkpoint path"), args.device, ema=args.ema)
    if args.video_dataset:
        from maskloop.video_app import cmd_eval_video

        return _video_verb(cmd_eval_video, args, model)
    refer, regions = eval_datasets(model, args.refcoco, args.refcoco_dataset, args.splits, args.image_dir,
                                   args.dam, args.dam_splits, args.shapes)
    res = run_eval(model, refer, regions, args.batch_size, args.max_samples, args.max_new_tokens,
                   cycle=not args.no_cycle, progress=not args.no_progress, protocol=args.protocol,
                   no_seg=args.no_seg, num_workers=args.num_workers)
    print(format_table(res))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(f"results: {args.out}")
    return 0


def cmd_caption(args) -> int:
    from maskloop.inference import caption_region, load_model

    ckpt = _need_file(args.checkpoint, "checkpoint path")
    _need_file(args.image, "image")
    for m in args.mask:
        _need_file(m, "mask")
    _set_threads(args.threads)
    model = load_model(ckpt, args.device)
    try:
        masks = args.mask if len(args.mask) > 1 else args.mask[0]  # several: Sa2VA's N-region prompt
        text, png = caption_region(model, args.image, masks, args.out, args.max_new_tokens)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(text)
    if png:
        print(f"overlay: {png}", file=sys.stderr)
    return 0


def cmd_segment(args) -> int:
    from maskloop.inference import load_model, segment_text

    ckpt = _need_file(args.checkpoint, "checkpoint path")
    args.text = args.text or []
    if args.video:
        from maskloop.video_app import cmd_segment_video

        _need_file(args.video, "video")
        if not args.text or args.question is not None:
            raise UsageError("--video takes one or more --text (no --question)")
        _set_threads(args.threads)
        return _video_verb(cmd_segment_video, args, load_model(ckpt, args.device))
    _need_file(args.image, "image (or --video)")
    if not ((args.question is None and len(args.text) == 1) or (args.question is not None and not args.text)):
        raise UsageError("an image takes exactly one --text, or one --question (several --text are for --video)")
    _set_threads(args.threads)
    model = load_model(ckpt, args.device)
    if args.question is not None:  # free generation: one mask / overlay per [SEG] of the answer
        from maskloop.inference import segment_question

        try:
            answer, masks, pngs = segment_question(model, args.image, args.question, args.out, args.mask_out,
                                                   args.max_new_tokens)
        except ValueError as e:
            raise UsageError(str(e)) from None
        print(answer)
        print(f"{len(masks)} mask(s) ([SEG] in the answer)"
              + "".join(f"; mask {i + 1}: {int(m.sum())} of {m.size} pixels" for i, m in enumerate(masks))
              + "".join(f"; overlay: {p}" for p in pngs), file=sys.stderr)
        return 0
    try:
        mask, png = segment_text(model, args.image, args.text[0], args.out, args.mask_out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"mask: {int(mask.sum())} of {mask.size} pixels" + (f"; overlay: {png}" if png else "")
          + (f"; mask: {args.mask_out}" if args.mask_out else ""))
    return 0


def _video_verb(fn, args, model) -> int:
    try:
        return fn(args, model)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_serve(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("the web app needs gradio: pip install 'maskloop[serve]' (or pip install gradio)") from None
    from maskloop.serve import serve

    ckpt = _need_file(args.checkpoint, "checkpoint path")
    _set_threads(args.threads)
    print(f"serving {ckpt} on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    serve(ckpt, host=args.host, port=args.port, device=args.device, ema=args.ema)
    return 0


def cmd_export_sa2va(args) -> int:
    from maskloop.inference import load_model
    from maskloop.model.checkpoints import NO_BASE_NOTE, save_published

    base = _need_file(args.base, "--base folder") if args.base else None
    model = load_model(_need_file(args.checkpoint, "checkpoint path"), ema=args.ema)
    print(f"exported: {save_published(model, args.out, base=base, dtype=args.dtype)}")
    if base is None:
        print(f"note: {NO_BASE_NOTE}")
    return 0


def cmd_export_psalm(args) -> int:
    from maskloop.model.psalm.adapt import main as adapt_main

    positional = [a for a in args.rest if not a.startswith("-")]
    if positional and "-h" not in args.rest and "--help" not in args.rest:
        _need_file(positional[0], "baseline checkpoint")
    return int(adapt_main(args.rest) or 0)


# ----------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskloop", description="Train pixel-grounded MLLMs with mask-text consistency.")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (also MASKLOOP_DEBUG=1); any position on the line")
    sub = p.add_subparsers(dest="command", required=True, metavar="<verb>")

    def common(sp, checkpoint=True):
        if checkpoint:
            sp.add_argument("--checkpoint", "-c", required=True,
                            help="a run directory (runs/demo, a training run) or a checkpoint folder")
            sp.add_argument("--device", default="cpu")
        sp.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    d = sub.add_parser("demo", help="the embedded demo: tiny model, shapes world, SFT -> dual loop -> eval -> report")
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="a ~2-minute version (CI)")
    d.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1: robust on small shared machines)")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--seed", type=int, default=0, help="demo seed (0: the published numbers; others shift every stage's seed)")
    d.add_argument("--logging", choices=("tensorboard", "wandb"), default="tensorboard",
                   help="training-scalar logger (wandb: pip install 'maskloop[wandb]'; WANDB_MODE=offline works)")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train with a recipe from a YAML config (see configs/)")
    t.add_argument("--config", required=True, help="YAML train config (configs/sft.yaml, ...)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    t.add_argument("--resume", metavar="DIR|auto",
                   help="a run dir (its checkpoints/), a checkpoints/ or step_XXXXXXXX dir, or auto: the latest in "
                        "run_dir; lr / steps / schedule / logging / checkpoint cadence may change (README)")
    t.add_argument("--run-dir", help="override run_dir")
    t.add_argument("--export", metavar="DIR", help="after training, write the model as a checkpoint folder")
    t.add_argument("--dry-run", action="store_true",
                   help="print the per-GPU memory plan (weights, grads, AdamW, EMA, activations) and exit")
    t.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: the number of GPUs to plan for (default: WORLD_SIZE or 1)")
    common(t, checkpoint=False)
    t.set_defaults(func=cmd_train)

    pe = sub.add_parser("psalm-eval", add_help=False,
                        help="PSALM metrics: PQ / mIoU / AP / cIoU-gIoU / region mIoU (see psalm-eval --help)")
    pe.set_defaults(func=cmd_psalm_eval, passthrough=True)  # maskloop.eval.psalm_eval parses the rest
    e = sub.add_parser("eval", help="referring cIoU/gIoU, region-caption metrics, cycle IoU")
    common(e)
    e.add_argument("--refcoco", metavar="ROOT", help="refer-toolkit root (refcoco/refs(unc).p, instances.json)")
    e.add_argument("--refcoco-dataset", nargs="+", default=["refcoco"], choices=["refcoco", "refcoco+", "refcocog"],
                   help="one or more of refcoco refcoco+ refcocog (refcocog: the umd splits)")
    e.add_argument("--splits", nargs="+", default=None,
                   help="RefCOCO splits (default: val testA testB; refcocog: val test)")
    e.add_argument("--protocol", default="generate", choices=["generate", "teacher_forced"],
                   help="generate: Sa2VA's (free answer, mask only with [SEG]); teacher_forced: 'Sure, [SEG].'")
    e.add_argument("--no-seg", default="sa2va", choices=["sa2va", "empty"],
                   help="an answer without [SEG]: sa2va = IoU 0 in gIoU, out of the cIoU sums (Sa2VA's code); "
                        "empty = an empty mask")
    e.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    e.add_argument("--image-dir", help="COCO train2014 images (default ROOT/images/train2014)")
    e.add_argument("--dam", metavar="ROOT", help="DAM-format region captions for caption metrics / cycle IoU")
    e.add_argument("--dam-splits", nargs="+", default=None)
    e.add_argument("--shapes", type=int, default=0, help="also evaluate on N held-out shapes scenes (default when no data)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-samples", type=int, default=None, help="per split")
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--no-cycle", action="store_true", help="captions only (no re-segmentation)")
    e.add_argument("--ema", action="store_true", help="use the EMA weights of a training run")
    e.add_argument("--video-dataset", choices=["refdavis", "mevis", "revos"], help="referring video J, F, J&F")
    e.add_argument("--video-data", metavar="ROOT", help="DAVIS folder / MeViS split folder / ReVOS folder")
    e.add_argument("--video-split", help="refdavis: val (default) | train; revos: valid (default) | train")
    e.add_argument("--keyframes", default="first", choices=["first", "uniform"])
    e.add_argument("--submit", metavar="DIR", help="also write the server submission layout (+ zip) here")
    e.add_argument("--out", help="write the results as JSON here")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("caption", help="describe a masked region of an image")
    common(c)
    c.add_argument("--image", required=True)
    c.add_argument("--mask", required=True, nargs="+",
                   help="binary mask image (non-zero = region) or .npy; several: region1, region2, ... of one prompt")
    c.add_argument("--out", default="caption_overlay.png", help="overlay PNG of the region")
    c.add_argument("--max-new-tokens", type=int, default=32)
    c.set_defaults(func=cmd_caption)

    s = sub.add_parser("segment", help="segment a referring expression in an image")
    common(s)
    s.add_argument("--image")
    s.add_argument("--video", help="an mp4 or a folder of frames: per-frame mask PNGs + overlay GIF in --out-dir")
    s.add_argument("--text", action="append", help="a referring expression (answer teacher forced: 'Sure, [SEG].'); "
                   "repeatable for --video")
    s.add_argument("--question", help="an instruction the model answers freely, e.g. 'Please segment the cat "
                   "and the dog.': one mask per [SEG] it generates (overlays numbered _1, _2, ...)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (--question)")
    s.add_argument("--out", default="segment_overlay.png", help="overlay PNG of the predicted mask")
    s.add_argument("--mask-out", help="also write the binary mask PNG here")
    s.add_argument("--out-dir", default="segment_video", help="--video: where masks/ and overlay.gif go")
    s.add_argument("--keyframes", default="first", choices=["first", "uniform"], help="--video: the MLLM's 5 frames")
    s.add_argument("--protocol", default="generate", choices=["generate", "teacher_forced"],
                   help="--video: [SEG] from the generated answer (Sa2VA) or from a teacher-forced 'Sure, [SEG].'")
    s.set_defaults(func=cmd_segment)

    w = sub.add_parser("serve", help="web app (gradio): segment expressions, describe a region, the cycle")
    common(w)
    w.add_argument("--port", type=int, default=7860)
    w.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    w.add_argument("--ema", action="store_true", help="use the EMA weights of a training run")
    w.set_defaults(func=cmd_serve)

    from maskloop.data.check import add_data_parser

    add_data_parser(sub)

    x = sub.add_parser("export", help="export checkpoints")
    xs = x.add_subparsers(dest="export_command", required=True, metavar="<format>")
    xa = xs.add_parser("sa2va", help="a run / checkpoint -> a published-layout Sa2VA folder (safetensors)")
    xa.add_argument("--checkpoint", "-c", required=True)
    xa.add_argument("--out", required=True)
    xa.add_argument("--ema", action="store_true", help="export the EMA weights of a training run")
    xa.add_argument("--base", metavar="FOLDER",
                    help="the published Sa2VA folder the model came from: copy its config.json, tokenizer, generation "
                         "config and remote code, so Sa2VA's own loader opens the export")
    xa.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="dtype of every written tensor (default: the base's torch_dtype, else the model's)")
    xa.set_defaults(func=cmd_export_sa2va)
    xp = xs.add_parser("psalm-to-deformable", add_help=False,
                       help="baseline PSALM checkpoint -> deformable-projector variant (see --help)")
    xp.set_defaults(func=cmd_export_psalm, passthrough=True)  # maskloop.model.psalm.adapt parses the rest
    return p


def cmd_psalm_eval(args) -> int:
    from maskloop.eval.psalm_eval import main_eval

    main_eval(args.rest)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # anywhere on the line: tracebacks instead of one error line (workers inherit it)
        argv = [a for a in argv if a != "--debug"]
        os.environ["MASKLOOP_DEBUG"] = "1"
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest  # the arguments of a verb with its own parser (psalm-eval, export psalm-to-deformable)
    if args.command == "demo" and args.threads is None:
        args.threads = 1
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if os.environ.get("MASKLOOP_DEBUG"):
            raise
        msg = str(e) if not isinstance(e, FileNotFoundError) or not e.filename else f"not found: {e.filename}"
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

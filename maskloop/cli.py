"""``maskloop <verb>``: demo, train, eval, caption, segment, data, export.

    maskloop demo [--run-dir runs/demo] [--quick]
    maskloop train --config configs/sft.yaml [--set steps=2000 --set lr=1e-5] [--resume auto|DIR]
    maskloop eval --checkpoint RUN_OR_FOLDER [--refcoco ROOT --splits val testA testB] [--out results.json]
    maskloop caption --checkpoint RUN_OR_FOLDER --image img.png --mask mask.png [--out overlay.png]
    maskloop segment --checkpoint RUN_OR_FOLDER --image img.png --text "the red circle" [--out overlay.png]
    maskloop data check --source refcoco /data/refcoco
    maskloop data import --from coco|folder|sa2va SRC --out DIR
    maskloop serve --checkpoint RUN_OR_FOLDER [--port 7860]
    maskloop export sa2va --checkpoint RUN_OR_FOLDER --out DIR
    maskloop export psalm-to-deformable baseline.safetensors deformable.safetensors

A missing path, a bad config or an unreadable checkpoint ends with one ``error: ...`` line naming the
thing and exit code 2 (no traceback; ``MASKLOOP_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


class UsageError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from maskloop.config import ConfigError
    from maskloop.model.checkpoints import CheckpointError as ModelCkptError
    from maskloop.train.checkpoint import CheckpointError as TrainCkptError

    errs: list[type[BaseException]] = [UsageError, ConfigError, ModelCkptError, TrainCkptError, FileNotFoundError]
    try:
        from maskloop.data.robust import DataError

        errs.append(DataError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


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

    res = run_demo(args.run_dir, quick=args.quick, threads=args.threads, progress=not args.no_progress)
    print(f"\nreport: {res['report_html']}")
    return 0


def cmd_train(args) -> int:
    from maskloop.train.engine import TrainConfig, Trainer

    cfg_path = _need_file(args.config, "config file")
    overrides = list(args.set or [])
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    from maskloop.config import load_yaml

    raw = load_yaml(cfg_path)
    if raw.get("recipe") == "psalm":  # the PSALM family has its own recipe file
        import yaml

        from maskloop.recipes.psalm import train_psalm

        raw.pop("recipe")
        for item in overrides:
            if "=" not in item:
                raise UsageError(f"override {item!r} must look like key=value")
            k, v = item.split("=", 1)
            raw[k] = yaml.safe_load(v)
        if args.resume:
            raw["resume"] = True
        _set_threads(args.threads)
        train_psalm(raw)
        return 0
    cfg = TrainConfig.from_yaml(cfg_path, overrides)
    from maskloop.model.presets import PRESETS

    if cfg.model not in PRESETS and not Path(cfg.model).exists():
        raise UsageError(f"model checkpoint folder not found: {cfg.model} (set `model:` in {cfg_path})")
    if cfg.init_from and not Path(cfg.init_from).exists():
        raise UsageError(f"init_from checkpoint not found: {cfg.init_from}")
    resume = None
    if args.resume == "auto":
        from maskloop.train.checkpoint import latest_checkpoint

        resume = latest_checkpoint(Path(cfg.run_dir) / "checkpoints")
        print(f"resume: {resume or 'no checkpoint in ' + str(Path(cfg.run_dir) / 'checkpoints') + ', starting fresh'}")
    elif args.resume:
        resume = _need_file(args.resume, "resume checkpoint")
    _set_threads(args.threads)
    trainer = Trainer(cfg)
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


def _eval_datasets(args, model) -> tuple[dict, dict]:
    """({split: refer dataset}, {name: region-caption dataset}) from the eval arguments."""
    from maskloop.data.transforms import SampleTransform

    c = model.cfg
    tf = SampleTransform(image_size=c.vision.image_size, sam_size=c.sam2.image_size, prompt_grid=c.prompt_grid)
    refer, regions = {}, {}
    if args.refcoco:
        from maskloop.data.sources.refcoco import RefCOCODataset

        root = _need_file(args.refcoco, "RefCOCO root")
        for split in args.splits:
            ds = RefCOCODataset(root, dataset=args.refcoco_dataset, split=split, transform=tf,
                                image_dir=args.image_dir)
            refer[f"{args.refcoco_dataset}_{split}"] = ds
    if args.dam:
        from maskloop.data.sources.dam import DAMDataset

        regions["dam"] = DAMDataset(_need_file(args.dam, "DAM root"), splits=args.dam_splits, transform=tf)
    if args.shapes or not (refer or regions):
        from maskloop.data.sources.shapes import ShapesReferDataset, ShapesRegionCaptionDataset

        n = args.shapes or 200
        refer["shapes_val"] = ShapesReferDataset(n, seed="val", transform=tf)
        regions["shapes_val"] = ShapesRegionCaptionDataset(n, seed="val", transform=tf)
    return refer, regions


def run_eval(model, refer: dict, regions: dict, batch_size: int = 16, max_samples: int | None = None,
             max_new_tokens: int = 32, cycle: bool = True, progress: bool = True) -> dict:
    """The evaluation suite: referring cIoU/gIoU per split; caption metrics and cycle IoU per region set."""
    from maskloop.eval.caption import evaluate_captions
    from maskloop.eval.cycle import evaluate_cycle
    from maskloop.eval.refer import evaluate_refer

    out: dict = {"refer": evaluate_refer(model, refer, batch_size, max_samples, progress) if refer else {}}
    out["caption"], out["cycle"] = {}, {}
    for name, ds in regions.items():
        if cycle:
            r = evaluate_cycle(model, ds, batch_size, max_new_tokens, max_samples, progress=progress)
            out["cycle"][name], out["caption"][name] = r["cycle"], r["caption"]
        else:
            out["caption"][name] = evaluate_captions(model, ds, batch_size, max_new_tokens, max_samples, progress)
    return out


def format_table(results: dict) -> str:
    """A plain-text table of an eval result dict ({section: {split: {metric: value}}})."""
    keys = {"refer": ("cIoU", "gIoU", "P@0.5", "n"), "cycle": ("cycle_mIoU", "cycle_cIoU", "empty_reseg_frac", "n"),
            "caption": ("CIDEr", "BLEU-4", "METEOR-nosyn", "ROUGE-L", "n")}
    lines = []
    for section, per_split in results.items():
        for split, m in per_split.items():
            cols = [k for k in keys.get(section, tuple(m)) if k in m]
            vals = "  ".join(f"{k}={_fmt(m[k])}" for k in cols)
            lines.append(f"{section:<8} {split:<22} {vals}")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def cmd_eval(args) -> int:
    from maskloop.inference import load_model

    _set_threads(args.threads)
    model = load_model(_need_file(args.checkpoint, "checkpoint path"), args.device, ema=args.ema)
    refer, regions = _eval_datasets(args, model)
    res = run_eval(model, refer, regions, args.batch_size, args.max_samples, args.max_new_tokens,
                   cycle=not args.no_cycle, progress=not args.no_progress)
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
    _need_file(args.mask, "mask")
    _set_threads(args.threads)
    model = load_model(ckpt, args.device)
    try:
        text, png = caption_region(model, args.image, args.mask, args.out, args.max_new_tokens)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(text)
    if png:
        print(f"overlay: {png}", file=sys.stderr)
    return 0


def cmd_segment(args) -> int:
    from maskloop.inference import load_model, segment_text

    ckpt = _need_file(args.checkpoint, "checkpoint path")
    _need_file(args.image, "image")
    _set_threads(args.threads)
    model = load_model(ckpt, args.device)
    try:
        mask, png = segment_text(model, args.image, args.text, args.out, args.mask_out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"mask: {int(mask.sum())} of {mask.size} pixels" + (f"; overlay: {png}" if png else "")
          + (f"; mask: {args.mask_out}" if args.mask_out else ""))
    return 0


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
    from maskloop.model.checkpoints import save_published

    model = load_model(_need_file(args.checkpoint, "checkpoint path"), ema=args.ema)
    print(f"exported: {save_published(model, args.out)}")
    return 0


def cmd_export_psalm(args) -> int:
    from maskloop.model.psalm.adapt import main as adapt_main

    positional = [a for a in args.args if not a.startswith("-")]
    if positional and "-h" not in args.args and "--help" not in args.args:
        _need_file(positional[0], "baseline checkpoint")
    return int(adapt_main(args.args) or 0)


# ----------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskloop", description="Train pixel-grounded MLLMs with mask-text consistency.")
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
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train with a recipe from a YAML config (see configs/)")
    t.add_argument("--config", required=True, help="YAML train config (configs/sft.yaml, ...)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    t.add_argument("--resume", metavar="DIR|auto", help="a checkpoint (run dir or step dir), or auto: the latest in run_dir")
    t.add_argument("--run-dir", help="override run_dir")
    t.add_argument("--export", metavar="DIR", help="after training, write the model as a checkpoint folder")
    common(t, checkpoint=False)
    t.set_defaults(func=cmd_train)

    sub.add_parser("psalm-eval", add_help=False,
                        help="PSALM metrics: PQ / mIoU / AP / cIoU-gIoU / region mIoU (see psalm-eval --help)")
    e = sub.add_parser("eval", help="referring cIoU/gIoU, region-caption metrics, cycle IoU")
    common(e)
    e.add_argument("--refcoco", metavar="ROOT", help="refer-toolkit root (refcoco/refs(unc).p, instances.json)")
    e.add_argument("--refcoco-dataset", default="refcoco", choices=["refcoco", "refcoco+", "refcocog"])
    e.add_argument("--splits", nargs="+", default=["val"], help="RefCOCO splits (val testA testB; refcocog: val test)")
    e.add_argument("--image-dir", help="COCO train2014 images (default ROOT/images/train2014)")
    e.add_argument("--dam", metavar="ROOT", help="DAM-format region captions for caption metrics / cycle IoU")
    e.add_argument("--dam-splits", nargs="+", default=None)
    e.add_argument("--shapes", type=int, default=0, help="also evaluate on N held-out shapes scenes (default when no data)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-samples", type=int, default=None, help="per split")
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--no-cycle", action="store_true", help="captions only (no re-segmentation)")
    e.add_argument("--ema", action="store_true", help="use the EMA weights of a training run")
    e.add_argument("--out", help="write the results as JSON here")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("caption", help="describe a masked region of an image")
    common(c)
    c.add_argument("--image", required=True)
    c.add_argument("--mask", required=True, help="binary mask image (non-zero = region) or .npy")
    c.add_argument("--out", default="caption_overlay.png", help="overlay PNG of the region")
    c.add_argument("--max-new-tokens", type=int, default=32)
    c.set_defaults(func=cmd_caption)

    s = sub.add_parser("segment", help="segment a referring expression in an image")
    common(s)
    s.add_argument("--image", required=True)
    s.add_argument("--text", required=True)
    s.add_argument("--out", default="segment_overlay.png", help="overlay PNG of the predicted mask")
    s.add_argument("--mask-out", help="also write the binary mask PNG here")
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
    xa.set_defaults(func=cmd_export_sa2va)
    xp = xs.add_parser("psalm-to-deformable", add_help=False,
                       help="baseline PSALM checkpoint -> deformable-projector variant (see --help)")
    xp.add_argument("args", nargs=argparse.REMAINDER)
    xp.set_defaults(func=cmd_export_psalm)
    return p


def cmd_psalm_eval(args) -> int:
    from maskloop.eval.psalm_eval import main_eval

    main_eval(args.args)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:2] == ["export", "psalm-to-deformable"]:  # its own parser takes every argument (and --help)
        args = argparse.Namespace(command="export", func=cmd_export_psalm, args=argv[2:])
    elif argv[:1] == ["psalm-eval"]:  # likewise
        args = argparse.Namespace(command="psalm-eval", func=cmd_psalm_eval, args=argv[1:])
    else:
        args = parser.parse_args(argv)
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

"""``maskloop data check`` and ``maskloop data write-sav-pairs``.

``maskloop data check --source KIND PATH [--source KIND PATH ...]`` builds each source's
reader, reads every sample through the full transform (tqdm progress bar) and prints, per
source, the number of good samples, the skipped items by reason, and the bad files with
their reasons. It exits 1 when any source is unusable (cannot be indexed, or has no good
sample), else 0.

KIND is one of ``sav``, ``sav-pairs``, ``sa1b``, ``refcoco``, ``refcoco+``, ``refcocog``,
``openimages``, ``dam``, the own-data kinds ``coco``, ``folder``, ``sa2va`` (option
``mode=masks|refer|caption``, see :mod:`maskloop.data.sources.own_common`), and PSALM's
``coco_interactive_cross`` (PATH = the cross-image json; option ``image_dir``, default the nearest
folder above the json that holds its rows' images; read with the PSALM transform at ``--sam-size``,
PSALM's 1024 input); reader options go after a colon, comma separated, e.g.
``refcocog:split_by=umd,split=val`` or ``dam:splits=COCOStuff+LVIS`` (``+`` separates list
items) or ``sav:use_auto=true``.

The lead wires these into ``maskloop/cli.py`` with :func:`add_data_parser` (or calls
:func:`main_check` / :func:`main_write_sav_pairs` with an argv list).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Callable

from .robust import DataError, RobustDataset, classify
from .transforms import SampleTransform

__all__ = ["main_check", "main_write_sav_pairs", "add_data_parser", "build_source", "KINDS"]


def _builders() -> dict[str, Callable[..., RobustDataset]]:
    from .sources import (
        OWN_KINDS,
        DAMDataset,
        OpenImagesDataset,
        RefCOCODataset,
        SA1BDataset,
        SAVDataset,
        SAVPairsDataset,
    )

    return {
        "sav": SAVDataset,
        "sav-pairs": SAVPairsDataset,
        "sa1b": SA1BDataset,
        "refcoco": lambda root, **kw: RefCOCODataset(root, dataset="refcoco", **kw),
        "refcoco+": lambda root, **kw: RefCOCODataset(root, dataset="refcoco+", **kw),
        "refcocog": lambda root, **kw: RefCOCODataset(root, dataset="refcocog", **kw),
        "openimages": OpenImagesDataset,
        "dam": DAMDataset,
        **OWN_KINDS,
        "coco_interactive_cross": _cross_image,
    }


KINDS = ("sav", "sav-pairs", "sa1b", "refcoco", "refcoco+", "refcocog", "openimages", "dam", "coco", "folder", "sa2va",
         "coco_interactive_cross")
#: kinds read with PSALM's transform (:class:`~maskloop.data.psalm.PSALMTransform`), not the Sa2VA one
PSALM_KINDS = ("coco_interactive_cross",)


def _cross_image(path, transform=None, image_dir=None, **kw):
    """PSALM's cross-image json; ``image_dir`` defaults to the nearest folder above it holding the first row's image."""
    from pathlib import Path

    from .io import read_json
    from .sources.coco_interactive_cross import COCOInteractiveCrossDataset

    path = Path(path)
    if image_dir is None:
        image_dir = path.parent
        rows = read_json(path) if path.is_file() else None
        first = rows[0].get("image") if isinstance(rows, list) and rows and isinstance(rows[0], dict) else None
        if isinstance(first, str):
            image_dir = next((d for d in path.parents if (d / first).is_file()), path.parent)
    return COCOInteractiveCrossDataset(path, image_dir, transform=transform, **kw)


def _value(v: str):
    if "+" in v:
        return [_value(x) for x in v.split("+") if x]
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_kind(spec: str) -> tuple[str, dict]:
    """``"refcocog:split_by=umd,split=val"`` -> ``("refcocog", {"split_by": "umd", "split": "val"})``."""
    kind, _, opts = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown source kind {kind!r}; choose from {', '.join(KINDS)}")
    kwargs = {}
    for item in filter(None, opts.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"source option {item!r} should be key=value")
        kwargs[k.strip()] = _value(v.strip())
    return kind, kwargs


def build_source(spec: str, path: str, transform: SampleTransform | None = None,
                 psalm_transform=None) -> RobustDataset:
    kind, kwargs = parse_kind(spec)
    tf = psalm_transform if kind in PSALM_KINDS else transform
    return _builders()[kind](path, transform=tf, **kwargs)


def _scan(ds: RobustDataset, label: str, limit: int | None, progress: bool) -> tuple[int, bool]:
    """Read every sample once; returns (#ok, usable). Bad samples are counted by the dataset."""
    from tqdm import tqdm

    n = len(ds) if limit is None else min(limit, len(ds))
    ok = 0
    for i in tqdm(range(n), desc=label, unit="sample", disable=not progress, file=sys.stderr):
        if ds._known_bad(i):  # already counted while reading an earlier sample
            continue
        try:
            ds.load(i)
        except Exception as e:  # noqa: BLE001 - counted and listed, never fatal
            ds.record_bad(classify(e), str(getattr(e, "key", None) or f"{ds.name}[{i}]"),
                          getattr(e, "detail", "") or str(e))
            ds._bad_indices.add(i)
        else:
            ok += 1
    return ok, ok > 0


def main_check(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="maskloop data check", description=__doc__.split("\n\n")[1])
    _add_check_args(p)
    return _run_check(p.parse_args(argv))


def _add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", nargs=2, action="append", metavar=("KIND", "PATH"), required=True,
                   help=f"a source to scan; KIND in {{{', '.join(KINDS)}}} with optional :key=value,... reader options")
    p.add_argument("--limit", type=int, default=None, help="scan at most this many samples per source")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--sam-size", type=int, default=1024)
    p.add_argument("--prompt-grid", type=int, default=16)
    p.add_argument("--max-list", type=int, default=50, help="bad files to list per source (0: all)")
    p.add_argument("--no-progress", action="store_true")


def _run_check(args: argparse.Namespace) -> int:
    from .psalm import PSALMTransform

    transform = SampleTransform(args.image_size, args.sam_size, args.prompt_grid)
    psalm_transform = PSALMTransform(args.sam_size)
    failed = False
    for spec, path in args.source:
        label = f"{spec} {path}"
        print(f"== {label}")
        try:
            ds = build_source(spec, path, transform, psalm_transform)
        except (DataError, FileNotFoundError, ValueError) as e:
            print(f"   UNUSABLE: {e}")
            failed = True
            continue
        ok, usable = _scan(ds, spec, args.limit, not args.no_progress)
        bad = ds.bad_items()
        reasons = Counter(r for _, r, _ in bad)
        total = len(ds) if args.limit is None else min(args.limit, len(ds))
        print(f"   samples: {total} indexed, {ok} ok, {total - ok} skipped")
        print("   bad items by reason: " + (", ".join(f"{r}={n}" for r, n in reasons.most_common()) or "none"))
        shown = bad if args.max_list == 0 else bad[: args.max_list]
        for key, reason, detail in shown:
            print(f"   - [{reason}] {key}" + (f": {detail}" if detail else ""))
        if len(shown) < len(bad):
            print(f"   ... {len(bad) - len(shown)} more (use --max-list 0)")
        if not usable:
            print(f"   UNUSABLE: no sample of {spec} could be read")
            failed = True
    return 1 if failed else 0


def main_write_sav_pairs(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="maskloop data write-sav-pairs",
                                description="convert an SA-V release folder (mp4 + json) into npz frame pairs")
    _add_pairs_args(p)
    return _run_pairs(p.parse_args(argv))


def _add_pairs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("release", help="folder with sav_*.mp4 and sav_*_manual.json")
    p.add_argument("out", help="output folder for the .npz pairs")
    p.add_argument("--min-gap", type=int, default=1, help="min frame gap, in annotated (6 fps) frames")
    p.add_argument("--max-gap", type=int, default=4, help="max frame gap, in annotated (6 fps) frames")
    p.add_argument("--use-auto", action="store_true", help="also convert the *_auto.json masklets")
    p.add_argument("--max-videos", type=int, default=None)
    p.add_argument("--max-frames-per-masklet", type=int, default=None)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the stored frames")
    p.add_argument("--seed", type=int, default=0)


def _run_pairs(args: argparse.Namespace) -> int:
    from .sources.sav import write_sav_pairs

    try:
        res = write_sav_pairs(args.release, args.out, frame_gap=(args.min_gap, args.max_gap), use_auto=args.use_auto,
                              max_videos=args.max_videos, max_frames_per_masklet=args.max_frames_per_masklet,
                              quality=args.quality, seed=args.seed, progress=True)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {res['written']} pairs to {res['out_dir']}; skipped: {res['skipped'] or 'none'}")
    return 0 if res["written"] else 1


def _run_import(args: argparse.Namespace) -> int:
    from .import_ import run_import

    return run_import(args)


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``data {check,import,write-sav-pairs}`` to a CLI's subparsers; the parsed namespace has
    ``func(args) -> int``."""
    data = subparsers.add_parser("data", help="check datasets, import own data, convert SA-V to npz pairs")
    sub = data.add_subparsers(dest="data_command", required=True)
    check = sub.add_parser("check", help="scan sources, count and list bad files")
    _add_check_args(check)
    check.set_defaults(func=_run_check)
    imp = sub.add_parser("import", help="own data (coco / folder / sa2va) -> the documented layout (kind: coco)",
                         description="Convert own data into one layout: DIR/annotations.json (COCO instances, "
                         "compressed RLE, optional expressions / caption per annotation) + DIR/images/. Bad rows "
                         "are skipped and counted. Train on it with `kind: coco, root: DIR` (configs/own_data.yaml).")
    imp.add_argument("--from", dest="source_kind", required=True, metavar="KIND",
                     help="coco | folder | sa2va, with optional :key=value reader options")
    imp.add_argument("src", help="the source: a folder (or a COCO / Sa2VA json file)")
    imp.add_argument("--out", required=True, help="output folder")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing DIR/annotations.json")
    imp.add_argument("--no-progress", action="store_true")
    imp.set_defaults(func=_run_import)
    pairs = sub.add_parser("write-sav-pairs", help="SA-V release -> npz frame pairs")
    _add_pairs_args(pairs)
    pairs.set_defaults(func=_run_pairs)
    return data


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main_check(sys.argv[1:]))

"""The demo's visual report: mask overlays, training curves, an example grid, report.md/html.

Drawing uses matplotlib with the non-interactive Agg backend (no display needed).

    png1 = save_curves({"loss/loop1": [(0, 1.2), (10, 0.8)]}, run_dir / "curves.png")
    png2 = example_grid([dict(image=img, mask=m, caption="a red circle", pred_mask=p,
                              title="val #0 IoU 0.91")], run_dir / "examples.png")
    write_report(run_dir, {"refer": {"cIoU": 0.8}}, png1, png2)
"""

from __future__ import annotations

import html
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

GT_COLOR = (0, 230, 255)  # cyan: distinct from the shapes world's object colours
PRED_COLOR = (255, 40, 200)  # magenta


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_image_hw3(image: Any) -> np.ndarray:
    """PIL / HxWx3 uint8 / 3xHxW uint8 tensor -> HxWx3 uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = _to_numpy(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.dtype != np.uint8:
        a = np.clip(a * 255.0 if a.max() <= 1.0 else a, 0, 255).astype(np.uint8)
    return a


def _as_mask_hw(mask: Any, hw: tuple[int, int]) -> np.ndarray:
    """Any binary-ish mask -> HxW bool at the image size (nearest resize when needed)."""
    m = _to_numpy(mask)
    m = m.reshape(m.shape[-2:]) if m.ndim > 2 else m
    m = m > 0.5 if m.dtype != np.bool_ else m
    if m.shape != hw:
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((hw[1], hw[0]), Image.NEAREST)) > 127
    return m


def overlay(
    image: Any,
    mask: Any,
    color: tuple[int, int, int] = GT_COLOR,
    alpha: float = 0.5,
    outline: bool = True,
    dim_outside: float = 0.0,
) -> Image.Image:
    """Blend ``color`` into ``image`` (HxWx3 uint8) where ``mask`` (HxW bool) is set.

    The mask is resized (nearest) to the image when sizes differ; ``outline`` also draws
    the mask's boundary in full colour so thin or faint masks stay visible;
    ``dim_outside`` (0..1) darkens everything outside the mask by that fraction.
    """
    img = _as_image_hw3(image).astype(np.float32)
    m = _as_mask_hw(mask, img.shape[:2])
    col = np.asarray(color, dtype=np.float32)
    out = img.copy()
    out[~m] *= 1.0 - dim_outside
    out[m] = (1 - alpha) * img[m] + alpha * col
    if outline and m.any():
        pad = np.pad(m, 1, mode="constant")
        interior = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
        out[m & ~interior] = col
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def save_curves(
    scalars: Mapping[str, Sequence[tuple[float, float]]], path_png: str | Path, title: str | None = None
) -> Path:
    """One small line plot per scalar name (x = step), laid out in a grid; returns the path.

    Names sharing a prefix before '/' (e.g. ``loss/loop1``, ``loss/loop2``) are drawn in the
    same panel so related curves can be compared.
    """
    plt = _mpl()
    groups: dict[str, list[str]] = {}
    for name in scalars:
        groups.setdefault(name.split("/")[0] if "/" in name else name, []).append(name)
    n = max(1, len(groups))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (group, names) in zip(axes.flat, groups.items()):
        for name in names:
            pts = sorted((float(s), float(v)) for s, v in scalars[name] if v is not None and math.isfinite(v))
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="." if len(pts) < 30 else None, lw=1.4, label=name)
        ax.set_title(group, fontsize=11)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if len(names) > 1:
            ax.legend(fontsize=8)
    if not scalars:
        axes.flat[0].text(0.5, 0.5, "no scalars logged", ha="center", va="center")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def example_grid(rows: Sequence[Mapping[str, Any]], path_png: str | Path, wrap: int = 34) -> Path:
    """A grid of examples, one row each: image | GT mask overlay | caption | re-segmentation.

    Each row is a dict with ``image`` (HxWx3 uint8 / PIL / 3xHxW), ``mask`` (GT, HxW),
    ``caption`` (generated text, str), ``pred_mask`` (re-segmented mask, HxW, or None),
    and optional ``title`` (shown above the row) and ``reference`` (a reference caption,
    shown under the generated one). Small images are shown enlarged, pixel-exact.
    """
    plt = _mpl()
    n = max(1, len(rows))
    fig, axes = plt.subplots(n, 4, figsize=(12.5, 2.9 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1.5, 1]})
    headers = ["image", "ground-truth mask", "generated caption", "re-segmented from caption"]
    for j, h in enumerate(headers):
        axes[0, j].set_title(h, fontsize=11, fontweight="bold")
    for i, row in enumerate(rows):
        img = _as_image_hw3(row["image"])
        axes[i, 0].imshow(img, interpolation="nearest")
        axes[i, 1].imshow(overlay(img, row["mask"], GT_COLOR, dim_outside=0.6), interpolation="nearest")
        pred = row.get("pred_mask")
        if pred is not None:
            axes[i, 3].imshow(overlay(img, pred, PRED_COLOR, dim_outside=0.6), interpolation="nearest")
        else:
            axes[i, 3].text(0.5, 0.5, "(none)", ha="center", va="center", fontsize=10)
        text = "\n".join(textwrap.wrap(str(row.get("caption") or "(empty caption)"), wrap))
        if row.get("reference"):
            text += "\n\nreference:\n" + "\n".join(textwrap.wrap(str(row["reference"]), wrap))
        axes[i, 2].set_xlim(0, 1.5)  # same height as the square image panels
        axes[i, 2].set_ylim(0, 1)
        axes[i, 2].set_aspect("equal")
        axes[i, 2].text(0.05, 0.5, text, ha="left", va="center", fontsize=10, wrap=True, family="monospace")
        if row.get("title"):
            axes[i, 0].set_ylabel(str(row["title"]), fontsize=9, rotation=0, ha="right", va="center", labelpad=10)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        for side in ("top", "right", "bottom", "left"):
            axes[i, 2].spines[side].set_visible(False)
    if not rows:
        axes[0, 2].text(0.5, 0.5, "no examples", ha="center", va="center")
    fig.tight_layout()
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str, Any]]:
    """{section: {name: value}} or {name: value} -> [(section, name, value)]."""
    rows: list[tuple[str, str, Any]] = []
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            sub = _flatten_metrics(v, f"{prefix}{k}/")
            rows.extend((f"{prefix}{k}" if s == "" else s, name, val) for s, name, val in sub)
        else:
            rows.append((prefix.rstrip("/"), str(k), v))
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def write_report(
    run_dir: str | Path,
    metrics: Mapping[str, Any],
    curves_png: str | Path | None = None,
    grid_png: str | Path | None = None,
    title: str = "maskloop run report",
    notes: str | Sequence[str] | None = None,
    extra_images: Mapping[str, str | Path] | None = None,
) -> Path:
    """Write ``run_dir/report.md`` and ``run_dir/report.html``; returns the .md path.

    ``metrics``: flat ``{name: value}`` or nested ``{section: {name: value}}``; rendered
    as a table. Images are referenced by paths relative to ``run_dir`` (so the folder can
    be moved or zipped). ``notes``: paragraphs of text shown under the title.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    def rel(p: str | Path) -> str:
        p = Path(p)
        try:
            return p.resolve().relative_to(run_dir.resolve()).as_posix()
        except ValueError:
            return p.as_posix()

    images: list[tuple[str, str]] = []
    if curves_png is not None:
        images.append(("Training curves", rel(curves_png)))
    if grid_png is not None:
        images.append(("Examples: mask → caption → mask", rel(grid_png)))
    for name, p in (extra_images or {}).items():
        images.append((name, rel(p)))
    paragraphs = [notes] if isinstance(notes, str) else list(notes or [])
    table = _flatten_metrics(metrics)
    has_section = any(s for s, _, _ in table)

    md = [f"# {title}", ""]
    for p in paragraphs:
        md += [p, ""]
    md += ["## Metrics", ""]
    if table:
        md += (["| section | metric | value |", "|---|---|---:|"] if has_section else ["| metric | value |", "|---|---:|"])
        for s, name, v in table:
            md.append(f"| {s} | {name} | {_fmt(v)} |" if has_section else f"| {name} | {_fmt(v)} |")
    else:
        md.append("(no metrics)")
    md.append("")
    for caption, src in images:
        md += [f"## {caption}", "", f"![{caption}]({src})", ""]
    md_path = run_dir / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")

    e = html.escape
    h = [
        "<!doctype html>", "<html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px}"
        "td.v{text-align:right;font-family:monospace}img{max-width:100%;border:1px solid #ddd}</style>",
        "</head><body>", f"<h1>{e(title)}</h1>",
    ]
    h += [f"<p>{e(p)}</p>" for p in paragraphs]
    h.append("<h2>Metrics</h2>")
    if table:
        h.append("<table><tr>" + ("<th>section</th>" if has_section else "") + "<th>metric</th><th>value</th></tr>")
        for s, name, v in table:
            h.append("<tr>" + (f"<td>{e(s)}</td>" if has_section else "")
                     + f"<td>{e(name)}</td><td class='v'>{e(_fmt(v))}</td></tr>")
        h.append("</table>")
    else:
        h.append("<p>(no metrics)</p>")
    for caption, src in images:
        h += [f"<h2>{e(caption)}</h2>", f"<img src='{e(src, quote=True)}' alt='{e(caption, quote=True)}'>"]
    h.append("</body></html>")
    (run_dir / "report.html").write_text("\n".join(h), encoding="utf-8")
    return md_path


__all__ = ["GT_COLOR", "PRED_COLOR", "example_grid", "overlay", "save_curves", "write_report"]

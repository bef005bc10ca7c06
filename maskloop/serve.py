"""``maskloop serve --checkpoint RUN_DIR|HF_FOLDER [--port P]``: a gradio web app on a checkpoint.

Two tabs, both on top of :mod:`maskloop.inference` (nothing of their own below it):

* **Segment**: upload an image, type an expression -> the mask overlay. Several expressions
  (one per line, or separated by ``;``) give several masks, one colour each, and the binary
  mask PNGs (at the image's size) in a gallery.
* **Describe a region, then the cycle**: draw the region on the image (brush) or upload a
  mask -> the region caption; one click re-segments that caption (which may be edited)
  and shows both masks with their IoU -- the mask -> text -> mask cycle the recipes train.

A video tab waits for the video inference path (``model/video.py``). The app needs the
optional ``gradio`` package (``pip install 'maskloop[serve]'``); it runs on CPU with the
demo's run dir (``maskloop demo --quick --run-dir /tmp/x`` makes one). Nothing is fetched
from the internet: analytics are off and the theme uses system fonts.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["build_app", "serve", "segment_expressions", "describe_region", "cycle", "editor_mask", "split_expressions"]

COLORS = ["#ff28c8", "#00e6ff", "#ffd200", "#50ff50", "#ff7800", "#9664ff"]
_LOCK = threading.Lock()  # one model call at a time (CPU; gradio may run handlers in threads)


def split_expressions(text: str | None) -> list[str]:
    """One expression per line or per ``;`` (empty pieces dropped)."""
    return [t.strip() for t in re.split(r"[;\n]", text or "") if t.strip()]


def _rgb(image: Any) -> Image.Image:
    if image is None:
        raise ValueError("upload an image first")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    return Image.fromarray(arr[..., :3].astype(np.uint8))


def _mask_png(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else float("nan")


def segment_expressions(model, image: Any, text: str) -> list[tuple[str, np.ndarray]]:
    """``[(expression, (H, W) bool mask)]``, one per expression of ``text`` (see :func:`split_expressions`),
    each exactly what ``maskloop segment`` gives for it."""
    from maskloop.inference import segment_text

    exprs = split_expressions(text)
    if not exprs:
        raise ValueError("type an expression to segment, e.g. 'the red circle'")
    img = _rgb(image)
    with _LOCK, torch.no_grad():
        return [(e, segment_text(model, img, e)[0]) for e in exprs]


def editor_mask(editor: Any, upload: Any = None) -> tuple[Image.Image, np.ndarray]:
    """(image, (H, W) bool region) from the ImageEditor value (the drawn layers' union) or an uploaded mask."""
    if not isinstance(editor, dict) or editor.get("background") is None:
        raise ValueError("upload an image in the editor first")
    img = _rgb(editor["background"])
    if upload is not None:
        m = np.asarray(upload)
        m = m[..., :3].max(-1) if m.ndim == 3 else m
        m = m > (127 if m.max() > 1 else 0)
        if m.shape != (img.height, img.width):
            m = np.asarray(_mask_png(m).resize(img.size, Image.NEAREST)) > 127
    else:
        m = np.zeros((img.height, img.width), bool)
        for layer in editor.get("layers") or []:
            a = np.asarray(layer)
            a = a[..., 3] if a.ndim == 3 and a.shape[-1] == 4 else (a.max(-1) if a.ndim == 3 else a)
            if a.shape == m.shape:
                m |= a > 0
    if not m.any():
        raise ValueError("draw the region on the image with the brush, or upload a mask (non-zero = inside)")
    return img, m


def describe_region(model, image: Image.Image, mask: np.ndarray, max_new_tokens: int = 32) -> str:
    from maskloop.inference import caption_region

    with _LOCK, torch.no_grad():
        return caption_region(model, image, mask, max_new_tokens=max_new_tokens)[0]


def cycle(model, image: Image.Image, mask: np.ndarray, caption: str | None = None,
          max_new_tokens: int = 32) -> tuple[str, np.ndarray, float]:
    """mask -> caption (or the given one) -> mask': ``(caption, mask', IoU(mask, mask'))``."""
    from maskloop.inference import segment_text

    text = (caption or "").strip() or describe_region(model, image, mask, max_new_tokens).strip()
    if not text:
        raise ValueError("the model's caption of this region is empty: nothing to re-segment (type one to try)")
    with _LOCK, torch.no_grad():
        m2 = segment_text(model, image, text)[0]
    return text, m2, iou(mask, m2)


# ----------------------------------------------------------------------------------------------
# the app


def build_app(model, title: str = "maskloop"):
    """The gradio Blocks app on ``model`` (a loaded :class:`GroundedMLLM`)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    def on_segment(image, text):
        try:
            pairs = segment_expressions(model, image, text)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        img = _rgb(image)
        info = "; ".join(f"{e}: {int(m.sum())} px" for e, m in pairs)
        return (img, [(m.astype(np.float32), e) for e, m in pairs]), [(_mask_png(m), e) for e, m in pairs], info

    def on_describe(editor, upload):
        try:
            img, m = editor_mask(editor, upload)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return describe_region(model, img, m)

    def on_cycle(editor, upload, caption):
        try:
            img, m = editor_mask(editor, upload)
            text, m2, score = cycle(model, img, m, caption)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        shown = (img, [(m.astype(np.float32), "your region"), (m2.astype(np.float32), "re-segmented caption")])
        return text, shown, "n/a (both masks empty)" if np.isnan(score) else f"{score:.3f}"

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"### {title}: segment an expression, describe a region, and the cycle")
        with gr.Tab("Segment"):
            with gr.Row():
                with gr.Column():
                    s_img = gr.Image(type="pil", label="image", format="png", elem_id="seg_image")
                    s_txt = gr.Textbox(label="expression (several: one per line or ';')", lines=2,
                                       placeholder="the red circle", elem_id="seg_text")
                    s_btn = gr.Button("Segment", variant="primary", elem_id="seg_button")
                with gr.Column():
                    s_out = gr.AnnotatedImage(label="mask overlay", elem_id="seg_overlay")
                    s_info = gr.Textbox(label="masks", interactive=False, elem_id="seg_info")
                    s_masks = gr.Gallery(label="binary masks (PNG, image size)", format="png", columns=3,
                                         elem_id="seg_masks")
            s_btn.click(on_segment, [s_img, s_txt], [s_out, s_masks, s_info])
            s_txt.submit(on_segment, [s_img, s_txt], [s_out, s_masks, s_info])
        with gr.Tab("Describe a region / cycle"):
            with gr.Row():
                with gr.Column():
                    c_ed = gr.ImageEditor(type="numpy", label="image: paint the region with the brush",
                                          elem_id="cap_editor", brush=gr.Brush(colors=["#ff28c8"]))
                    c_up = gr.Image(type="numpy", label="or upload a mask (non-zero = region)", image_mode="L",
                                    elem_id="cap_mask")
                    c_btn = gr.Button("Describe the region", variant="primary", elem_id="cap_button")
                with gr.Column():
                    c_txt = gr.Textbox(label="region caption (editable)", lines=3, elem_id="cap_text")
                    r_btn = gr.Button("Re-segment the caption (the cycle)", elem_id="cycle_button")
                    r_out = gr.AnnotatedImage(label="your region vs the caption's mask", elem_id="cycle_overlay")
                    r_iou = gr.Textbox(label="cycle IoU", interactive=False, elem_id="cycle_iou")
            c_btn.click(on_describe, [c_ed, c_up], [c_txt])
            r_btn.click(on_cycle, [c_ed, c_up, c_txt], [c_txt, r_out, r_iou])
    return app


def serve(checkpoint, host: str = "127.0.0.1", port: int = 7860, device: str = "cpu", ema: bool = False,
          block: bool = True):
    """Load ``checkpoint`` and launch the app; returns the app (``block=False``: the server runs in a thread)."""
    import gradio as gr

    from maskloop.inference import load_model

    model = load_model(checkpoint, device, ema=ema)
    app = build_app(model, title=f"maskloop: {os.path.basename(os.path.normpath(str(checkpoint)))}")
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=True,
               theme=theme, footer_links=[])
    return app

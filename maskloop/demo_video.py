"""The demo's video result: referring video segmentation of moving-object shapes clips, Sa2VA's protocol.

The demo model is trained on single images only, and SAM2's memory modules (memory encoder, memory
attention, object pointers) are never trained in it: they keep their random initialisation.  So this
section measures what the real video path (:class:`maskloop.model.video.VideoSegmenter`: the MLLM on up
to 5 keyframes in one prompt, the ``[SEG]`` prompt on every keyframe, SAM2's memory propagation to the
other frames) gives on held-out clips, side by side with the image path run on every frame:

* ``video (Sa2VA: generated answer)``: the default protocol, the ``[SEG]`` read from the model's own answer
  (an answer without ``[SEG]`` gives empty masks, counted);
* ``video (teacher-forced answer)``: the answer given, every expression prompted;
* ``video, 5-frame clips (teacher forced)``: every frame a keyframe, so no frame depends on the memory;
* ``per-frame image path``: the demo's referring segmentation on each frame alone (what it is trained for).

J, F and J&F as DAVIS defines them (:mod:`maskloop.eval.video`), means over the clips.  A strip shows
the first clip (not chosen): one row per path, then the ground truth.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

VIDEO = {"clips": 8, "frames": 8, "short_frames": 5, "max_new_tokens": 12}
PATHS = {
    "generate": "video (Sa2VA: generated answer)",
    "teacher_forced": "video (teacher-forced answer)",
    "short": "video, 5-frame clips (teacher forced; no memory used)",
    "per_frame": "per-frame image path",
}


def per_frame_masks(model, transform, frames, text: str) -> np.ndarray:
    """The image path on every frame (one batch): (T, H, W) bool at the frames' size."""
    device = next(model.parameters()).device
    items = [transform.image(f) for f in frames]
    pv = torch.stack([x["pixel_values"] for x in items]).to(device)
    feats = model.sam_features(torch.stack([x["g_pixel_values"] for x in items]).to(device))
    low = model.segment(pv, feats, model.builder.expressions([text] * len(frames)), lm_loss=False)["low_res"]
    W, H = frames[0].size
    up = torch.nn.functional.interpolate(low[:, None].float(), size=(H, W), mode="bilinear", align_corners=False)
    return (up[:, 0] > 0).cpu().numpy()


def _run(seg, frames: list, text: str) -> np.ndarray:
    """One expression through the video path: (T, H, W) bool."""
    return np.stack([m[0] for _, m in seg.segment(lambda k: frames[k], lambda: iter(frames), len(frames), [text])])


def shapes_video_result(model, run_dir, expression_policy: str = "colour", settings: dict | None = None) -> dict:
    """Score the video paths on ``settings['clips']`` held-out shapes clips; write ``video_strip.png``.

    Returns ``{"paths": {path: {J, F, J&F, n}}, "no_seg": {...}, "clip": {expression, answer}, "strip": path,
    "seconds": s, "settings": ...}``."""
    from maskloop.data.sources.shapes import ShapesClipDataset
    from maskloop.eval.refer import eval_mode
    from maskloop.eval.video import JFMeter, save_frame_strip
    from maskloop.model.video import VideoSegmenter

    s = {**VIDEO, **(settings or {})}
    t0 = time.perf_counter()
    ds = ShapesClipDataset(s["clips"], seed="val", num_frames=s["frames"], expression_policy=expression_policy)
    with warnings.catch_warnings():  # the demo model has no trained SAM2 memory: said in the report
        warnings.filterwarnings("ignore", message="the model holds no SAM2 memory weights")
        seg = VideoSegmenter(model, max_new_tokens=s["max_new_tokens"])
    meters = {k: JFMeter() for k in PATHS}
    no_seg = {"generate": 0}
    first = None
    with eval_mode(model):
        for i in range(len(ds)):
            item = ds[i]
            clip, text = item["clip"], item["expression"]
            frames = clip.frames
            pred = {}
            for proto in ("generate", "teacher_forced"):
                seg.protocol = proto
                pred[proto] = _run(seg, frames, text)
                if proto == "generate":
                    answer = seg.answers[0]
            no_seg["generate"] = seg.no_seg
            seg.protocol = "teacher_forced"
            pred["short"] = _run(seg, frames[: s["short_frames"]], text)
            pred["per_frame"] = per_frame_masks(model, seg.transform, frames, text)
            for k, p in pred.items():
                meters[k].add(clip.key, clip.masks[: len(p)], p)
            if first is None:
                first = {"frames": frames, "pred": pred, "gt": clip.masks, "expression": text, "answer": answer}
    strip = save_frame_strip(first["frames"], first["pred"]["generate"], Path(run_dir) / "video_strip.png",
                             gt=first["gt"], n=s["frames"], side=96,
                             more=[first["pred"]["teacher_forced"], first["pred"]["per_frame"]])
    return {"paths": {k: m.summary() for k, m in meters.items()}, "no_seg": no_seg,
            "clip": {"expression": first["expression"], "answer": first["answer"]}, "strip": strip,
            "seconds": time.perf_counter() - t0, "settings": s}


def video_section(res: dict) -> tuple[str, list[str], str]:
    """(image caption, markdown lines, HTML) of the demo report's video section."""
    import html

    s = res["settings"]
    caption = (f"Video: one held-out moving-object clip, \"{res['clip']['expression']}\" (rows: video path with the "
               "generated answer, video path teacher forced, per-frame image path, ground truth)")
    text = (f"Referring video segmentation on {s['clips']} held-out shapes clips of {s['frames']} frames (objects "
            "moving), Sa2VA's video protocol: the first 5 frames in one MLLM prompt, the [SEG] prompt on each of "
            "them, SAM2's memory propagating to the rest. The demo model is trained on single images only and its "
            "SAM2 memory modules are never trained (random initialisation): the video rows measure this pipeline "
            "with an image-trained MLLM and untrained memory, beside the per-frame image path, not what Sa2VA's "
            "trained video model does. "
            f"Generated answers without [SEG] (empty masks): {res['no_seg']['generate']} of {s['clips']}; the strip's "
            f"clip answered \"{res['clip']['answer']}\". Video section time {res['seconds']:.1f} s.")
    md = [text, "", "| path | J | F | J&F |", "|---|---:|---:|---:|"]
    rows = []
    for k, name in PATHS.items():
        r = res["paths"][k]
        md.append(f"| {name} | {r['J']:.3f} | {r['F']:.3f} | {r['J&F']:.3f} |")
        rows.append(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td class='v'>{r[m]:.3f}</td>" for m in ("J", "F", "J&F"))
                    + "</tr>")
    h = (f"<p>{html.escape(text)}</p><table><tr><th>path</th><th>J</th><th>F</th><th>J&amp;F</th></tr>"
         + "".join(rows) + "</table>")
    return caption, md, h


__all__ = ["PATHS", "VIDEO", "per_frame_masks", "shapes_video_result", "video_section"]

"""Load a trained model from a run directory or a checkpoint folder; caption / segment one image.

Accepted locations (:func:`load_model`):

* a checkpoint folder: ``maskloop_config.json`` (or a published Sa2VA ``config.json``) + tokenizer +
  safetensors, as written by :func:`maskloop.model.checkpoints.save_published` / ``maskloop export sa2va``;
* a run directory with such a folder in ``model/`` (what ``maskloop demo`` writes);
* a training run directory (``train_config.json`` + ``checkpoints/step_*/``): the model is rebuilt
  from its config (same seed, so a from-scratch preset gets the same frozen initialisation) and the
  trained parameters of the latest step (or its EMA copies, ``ema=True``) are loaded into it;
* a ``step_XXXXXXXX`` directory of such a run.

    model = load_model("runs/demo")
    caption, png = caption_region(model, "img.png", "mask.png", out="caption.png")
    mask, png = segment_text(model, "img.png", "the red circle", out="segment.png")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from maskloop.model.checkpoints import CheckpointError


def _is_model_folder(p: Path) -> bool:
    return p.is_dir() and ((p / "maskloop_config.json").is_file() or (p / "config.json").is_file())


def _run_root(p: Path) -> Path | None:
    """The training run directory for ``p`` (a run dir, its checkpoints/ dir or a step dir), if any."""
    for cand in (p, p.parent, p.parent.parent):
        if (cand / "train_config.json").is_file():
            return cand
    return None


def load_model(path: str | Path, device: str | torch.device = "cpu", ema: bool = False):
    """A :class:`GroundedMLLM` in eval mode from a checkpoint folder or a run directory (see module doc)."""
    from maskloop.model.checkpoints import load_pretrained

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path not found: {p} (pass a run directory or a checkpoint folder)")
    if _is_model_folder(p):
        model = load_pretrained(p)
    elif _is_model_folder(p / "model") and not ema:
        model = load_pretrained(p / "model")
    elif (root := _run_root(p)) is not None:
        model = _load_training_run(root, p, ema)
    else:
        raise CheckpointError(
            f"{p} is neither a checkpoint folder (maskloop_config.json or config.json + tokenizer + "
            "safetensors) nor a run directory (model/ or train_config.json + checkpoints/)"
        )
    model.to(device).eval()
    return model


def _load_training_run(root: Path, p: Path, ema: bool):
    from maskloop.train.checkpoint import _resolve, load_checkpoint
    from maskloop.train.engine import TrainConfig, build_model
    from maskloop.train.sharded_checkpoint import is_sharded, read_sharded_tensors

    cfg = TrainConfig.from_mapping(json.loads((root / "train_config.json").read_text()))
    where = p if p != root else root / "checkpoints"
    step_dir = _resolve(Path(where), None)
    if is_sharded(step_dir):  # DCP shards of an FSDP run: gathered into whole tensors here, in one process
        ck = {"path": step_dir, "ema": None, "trainable": None}
        ck["ema" if ema else "trainable"] = read_sharded_tensors(step_dir, "ema" if ema else "trainable")
    else:
        ck = load_checkpoint(where, load_optimizer=False)
    torch.manual_seed(cfg.seed)  # the Trainer seeds before building: same frozen init for presets
    model = build_model(cfg)
    weights = ck["ema"] if ema else ck["trainable"]
    if weights is None:
        raise CheckpointError(f"{ck['path']} holds no {'EMA' if ema else 'trained'} weights")
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise CheckpointError(f"{ck['path']}: {len(unknown)} unknown parameter name(s), e.g. {unknown[:3]}")
    with torch.no_grad():
        for k, v in weights.items():
            if params[k].shape != v.shape:
                raise CheckpointError(f"{ck['path']}: {k} has shape {tuple(v.shape)}, the model {tuple(params[k].shape)}")
            params[k].copy_(v)
    return model


# ----------------------------------------------------------------------------------------------
# single images


def read_image(path: str | Path) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image not found: {p}")
    try:
        return Image.open(p).convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read image {p}: {type(e).__name__}: {e}") from None


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A binary mask (H, W) bool from a PNG/JPEG (non-zero = inside) or a .npy array."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"mask not found: {p}")
    if p.suffix == ".npy":
        m = np.load(p)
    else:
        try:
            m = np.asarray(Image.open(p).convert("L"))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read mask {p}: {type(e).__name__}: {e}") from None
    m = np.asarray(m).squeeze()
    if m.ndim != 2:
        raise ValueError(f"mask {p} must be 2-D (H, W), got shape {m.shape}")
    m = m > (127 if m.dtype == np.uint8 and m.max() > 1 else 0)
    if size is not None and m.shape != (size[1], size[0]):
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    if not m.any():
        raise ValueError(f"mask {p} is empty: mark the region with non-zero pixels")
    return m


def _batch(model, image: Image.Image, masks=None) -> dict:
    """One image's model inputs (tiled when ``model.cfg.tiles``: :func:`maskloop.data.tiles.tiled_inputs`),
    collated to a batch of one on the model's device; ``masks``: None or a list of (H, W) regions."""
    from maskloop.data.mixture import collate
    from maskloop.data.tiles import tiled_inputs

    item = tiled_inputs(image, model.cfg, masks)
    dev = next(model.parameters()).device
    return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in collate([item]).items()}


def save_overlay(image: Image.Image, mask: np.ndarray, out: str | Path, color, min_side: int = 256) -> Path:
    """Overlay PNG at the image's resolution, enlarged (nearest) so its short side is >= ``min_side``."""
    from maskloop.eval.report import overlay

    ov = overlay(np.asarray(image), mask, color)
    scale = max(1, -(-min_side // min(ov.size)))
    if scale > 1:
        ov = ov.resize((ov.width * scale, ov.height * scale), Image.NEAREST)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save(out)
    return out


def _region_prompts(model, b: dict) -> torch.Tensor:
    """The batch's region slots (1, R, g, g), each region's empty cell set set to its mask's centroid."""
    from maskloop.model.region import centroid_cells, ensure_nonempty, region_slots

    pm, _ = ensure_nonempty(b["prompt_masks"], centroid_cells(b["masks"], b["prompt_masks"].shape[-1]))
    return region_slots(pm, b["num_regions"])


def caption_region(model, image, mask, out: str | Path | None = None, max_new_tokens: int = 32) -> tuple[str, Path | None]:
    """Describe the masked region(s) of ``image`` (paths or PIL / array); optional overlay PNG of the mask(s).

    ``mask``: one mask, or a list of them — Sa2VA's N-region prompt ("There are N part regions in the
    picture: region1<vp>...</vp>, region2<vp>...</vp>."), the regions numbered in the order given."""
    from maskloop.eval.refer import eval_mode
    from maskloop.eval.report import GT_COLOR

    img = image if isinstance(image, Image.Image) else read_image(image)
    many = isinstance(mask, (list, tuple))
    ms = [read_mask(m, img.size) if isinstance(m, (str, Path)) else np.asarray(m, bool) for m in (mask if many else [mask])]
    if not ms:
        raise ValueError("no region mask given")
    with eval_mode(model):
        b = _batch(model, img, ms)
        gen = model.describe(b["pixel_values"], _region_prompts(model, b), max_new_tokens,
                             num_tiles=b["num_tiles"], num_regions=b["num_regions"])
        text = model.builder.decode(gen.ids, gen.lengths)[0]
    png = save_overlay(img, np.logical_or.reduce(ms), out, GT_COLOR) if out else None
    return text, png


def _to_image_size(logits: torch.Tensor, img: Image.Image) -> np.ndarray:
    """Mask logits (M, G, G) -> (M, H, W) bool at the image's size (bilinear on logits, then > 0)."""
    up = torch.nn.functional.interpolate(logits[:, None].float(), size=(img.height, img.width), mode="bilinear",
                                         align_corners=False)[:, 0]
    return (up > 0).cpu().numpy()


def segment_text(model, image, text: str, out: str | Path | None = None,
                 mask_out: str | Path | None = None) -> tuple[np.ndarray, Path | None]:
    """Segment ``text`` in ``image``: (H, W) bool mask at the image's size; optional overlay / mask PNGs."""
    from maskloop.eval.refer import eval_mode
    from maskloop.eval.report import PRED_COLOR

    if not text or not text.strip():
        raise ValueError("the text to segment is empty")
    img = image if isinstance(image, Image.Image) else read_image(image)
    with eval_mode(model):
        b = _batch(model, img)
        logits = model.segment(b["pixel_values"], model.sam_features(b["g_pixel_values"]),
                               model.builder.expressions([text.strip()]), lm_loss=False,
                               num_tiles=b["num_tiles"])["mask_logits"]
    m = _to_image_size(logits, img)[0]
    if mask_out:
        Path(mask_out).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m.astype(np.uint8) * 255).save(mask_out)
    png = save_overlay(img, m, out, PRED_COLOR) if out else None
    return m, png


def numbered(path: str | Path | None, i: int, n: int) -> Path | None:
    """``out.png`` -> ``out_1.png``, ``out_2.png``... when there are several (n > 1); unchanged for one."""
    if path is None:
        return None
    p = Path(path)
    return p if n == 1 else p.with_name(f"{p.stem}_{i + 1}{p.suffix}")


def segment_question(model, image, question: str, out: str | Path | None = None, mask_out: str | Path | None = None,
                     max_new_tokens: int = 64) -> tuple[str, list[np.ndarray], list[Path]]:
    """Free generation as Sa2VA's image chat: the model answers ``question`` (e.g. "Please segment the cat
    and the dog.") and every [SEG] of its answer gives one mask, in order.

    Returns (answer text, masks (H, W) bool at the image's size, overlay PNG paths): overlays and mask PNGs
    are written as ``out`` / ``mask_out``, numbered ``_1``, ``_2``... when the answer holds several [SEG]."""
    from maskloop.eval.refer import eval_mode
    from maskloop.eval.report import PRED_COLOR

    if not question or not question.strip():
        raise ValueError("the question is empty")
    img = image if isinstance(image, Image.Image) else read_image(image)
    with eval_mode(model):
        b = _batch(model, img)
        r = model.generate_segment(b["pixel_values"], model.sam_features(b["g_pixel_values"]), [question.strip()],
                                   max_new_tokens, num_tiles=b["num_tiles"])
    masks = list(_to_image_size(r["mask_logits"], img)) if r["mask_logits"].shape[0] else []
    pngs = []
    for i, m in enumerate(masks):
        if mask_out:
            mp = numbered(mask_out, i, len(masks))
            mp.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m.astype(np.uint8) * 255).save(mp)
        if out:
            pngs.append(save_overlay(img, m, numbered(out, i, len(masks)), PRED_COLOR))
    return r["texts"][0], masks, pngs


__all__ = ["caption_region", "load_model", "read_image", "read_mask", "save_overlay", "segment_question", "segment_text"]

"""Helpers shared by the source readers."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..robust import SampleError, check_mask
from ..transforms import SampleTransform


def check_image_mask(orig_size: tuple[int, int], mask: np.ndarray, key: str, allow_empty: bool = False) -> None:
    """Mask must match the image's stored size and have foreground pixels (unless ``allow_empty``)."""
    w, h = orig_size
    if mask.shape != (h, w):
        raise SampleError("bad_rle", key=key, detail=f"mask is {mask.shape[0]}x{mask.shape[1]}, image is {h}x{w}")
    if not allow_empty and not mask.any():
        raise SampleError("empty_mask", key=key, detail="mask has no foreground pixels")


def aspect_matches(mask_size: tuple[int, int], image_size: tuple[int, int]) -> bool:
    """Whether a (w, h) mask is the (w, h) image scaled by one factor, up to the rounding of
    either size to whole pixels: ``|mw*H - W*mh| <= (max(W+H, mw+mh)) / 2``."""
    (mw, mh), (w, h) = mask_size, image_size
    return abs(mw * h - w * mh) <= 0.5 * max(w + h, mw + mh)


def make_sample(
    transform: SampleTransform, image: Image.Image, orig_size: tuple[int, int], mask: np.ndarray, key: str
) -> dict:
    """Validated image + mask -> the four tensors (raises ``bad_rle`` / ``empty_mask``).

    A transform with ``keep_empty`` (the evaluation transform) keeps a sample whose mask is empty (a
    degenerate polygon): the reference evaluations score it."""
    keep_empty = bool(getattr(transform, "keep_empty", False))
    check_image_mask(orig_size, mask, key, allow_empty=keep_empty)
    out = transform(image, mask)
    return out if keep_empty else check_mask(out, key)


def default_transform(transform: SampleTransform | None) -> SampleTransform:
    return transform if transform is not None else SampleTransform()

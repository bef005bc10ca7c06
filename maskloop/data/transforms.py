"""The four tensors of a sample, all computed from the original image pixels.

=================  ===========================  ==========================================
key                shape / dtype                 made how
=================  ===========================  ==========================================
``pixel_values``   (3, S, S) float32             original -> bicubic resize to S x S ->
                                                 /255 -> ImageNet mean/std (MLLM input)
``g_pixel_values`` (3, G, G) uint8 0..255        original -> bicubic resize to G x G
                                                 (SAM2 input; SAM2 normalises itself)
``prompt_masks``   (grid, grid) uint8 {0, 1}     original mask -> nearest resize (region
                                                 prompt cells, 16 x 16 by default), by
                                                 Sa2VA's rule (see ``prompt_resize``)
``masks``          (G, G) float32 {0, 1}         original mask -> nearest resize (target)
=================  ===========================  ==========================================

S = ``image_size`` (448), G = ``sam_size`` (1024). Both image tensors are direct resizes of
the decoded original: the 1024 image is never made from the 448 tensor and nothing is
ever un-normalised. Resizing is direct (no aspect-preserving padding), as in Sa2VA, with
PIL's **bicubic** filter for images (``Image.Resampling.BICUBIC``) and **nearest** for
masks.  The region prompt cells follow Sa2VA's data and inference code, which resize the
original mask with ``torch.nn.functional.interpolate(mode="nearest")`` — cell i samples
source row ``floor(i * H / grid)`` — not PIL's centre-sampled nearest
(``prompt_resize="pil"`` keeps that older rule).

JPEG draft mode: when ``draft=True`` and the image given is a not-yet-decoded PIL JPEG,
:meth:`SampleTransform.prepare` calls ``img.draft('RGB', (D, D))`` with
``D = max(S, G)`` before decoding. libjpeg then decodes at 1/2, 1/4 or 1/8 scale only
when the result stays >= D on *both* axes, so no output is ever upsampled from a
smaller decode. (For an SA-1B image, 1500 px on the short side, and G = 1024 the scale
stays 1/1; draft pays off for larger JPEGs or smaller targets.) The dataset readers pass
:attr:`SampleTransform.draft_size` to :func:`maskloop.data.io.open_image`, which does the
same thing for files.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, JpegImagePlugin

__all__ = ["SampleTransform", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BICUBIC = Image.Resampling.BICUBIC
_NEAREST = Image.Resampling.NEAREST


class SampleTransform:
    """Original image (+ mask) -> the four model tensors. Sizes come from the config."""

    def __init__(
        self,
        image_size: int = 448,
        sam_size: int = 1024,
        prompt_grid: int = 16,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        draft: bool = True,
        prompt_resize: str = "sa2va",
    ):
        if prompt_resize not in ("sa2va", "pil"):
            raise ValueError(f"prompt_resize={prompt_resize!r}: choose 'sa2va' (torch nearest) or 'pil'")
        self.prompt_resize = prompt_resize
        self.image_size = int(image_size)
        self.sam_size = int(sam_size)
        self.prompt_grid = int(prompt_grid)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)
        self.draft = bool(draft)

    def __repr__(self) -> str:
        return (
            f"SampleTransform(image_size={self.image_size}, sam_size={self.sam_size}, "
            f"prompt_grid={self.prompt_grid}, draft={self.draft})"
        )

    @property
    def draft_size(self) -> int | None:
        """Smallest decode size that keeps both outputs from being upsampled (None: off)."""
        return max(self.image_size, self.sam_size) if self.draft else None

    # ---- image ------------------------------------------------------------------------
    def prepare(self, img: Image.Image) -> Image.Image:
        """Decode (with draft mode for a still-undecoded JPEG) and convert to RGB."""
        if self.draft and isinstance(img, JpegImagePlugin.JpegImageFile) and img.tile:
            d = self.draft_size
            img.draft("RGB", (d, d))
        return img if img.mode == "RGB" else img.convert("RGB")

    def image(self, img: Image.Image) -> dict[str, torch.Tensor]:
        """-> ``pixel_values`` (3,S,S) float32 normalised, ``g_pixel_values`` (3,G,G) uint8."""
        img = self.prepare(img)
        s, g = self.image_size, self.sam_size
        small = img if img.size == (s, s) else img.resize((s, s), _BICUBIC)
        x = np.asarray(small, dtype=np.float32) * (1.0 / 255.0)  # (S, S, 3)
        x = (x - self.mean) / self.std
        pixel_values = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
        big = img if img.size == (g, g) else img.resize((g, g), _BICUBIC)
        g_pixel_values = torch.from_numpy(np.ascontiguousarray(np.asarray(big, dtype=np.uint8).transpose(2, 0, 1)))
        return {"pixel_values": pixel_values, "g_pixel_values": g_pixel_values}

    # ---- mask -------------------------------------------------------------------------
    def mask(self, mask: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Bool/0-1 mask (H, W) -> ``prompt_masks`` (grid,grid) uint8, ``masks`` (G,G) float32."""
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu().numpy()
        m = np.asarray(mask)
        if m.ndim != 2:
            raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
        pil = Image.fromarray((m > 0).astype(np.uint8) * 255)  # mode "L"
        grid, g = self.prompt_grid, self.sam_size
        if self.prompt_resize == "sa2va":
            src = torch.from_numpy((m > 0).astype(np.float32))[None, None]
            prompt = torch.nn.functional.interpolate(src, size=(grid, grid), mode="nearest")[0, 0].numpy() > 0.5
        else:
            prompt = np.asarray(pil.resize((grid, grid), _NEAREST)) > 127
        full = np.asarray(pil.resize((g, g), _NEAREST)) > 127
        return {
            "prompt_masks": torch.from_numpy(prompt.astype(np.uint8)),
            "masks": torch.from_numpy(full.astype(np.float32)),
        }

    # ---- both -------------------------------------------------------------------------
    def __call__(self, image: Image.Image, mask: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.image(image)
        out.update(self.mask(mask))
        return out

    def pair(self, image1, mask1, image2, mask2) -> dict[str, torch.Tensor]:
        """Two (image, mask) views -> the eight tensors with ``1``/``2`` suffixes.

        When ``image2 is image1`` the image tensors are computed once and shared.
        """
        im1 = self.image(image1)
        im2 = im1 if image2 is image1 else self.image(image2)
        m1 = self.mask(mask1)
        m2 = m1 if mask2 is mask1 else self.mask(mask2)
        out: dict[str, torch.Tensor] = {}
        for suffix, parts in (("1", (im1, m1)), ("2", (im2, m2))):
            for part in parts:
                for k, v in part.items():
                    out[k + suffix] = v
        return out

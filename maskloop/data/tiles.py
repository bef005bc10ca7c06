"""InternVL's dynamic tiling, as Sa2VA's image inference uses it (SPEC §1).

An image of W x H is cut into ``cols x rows`` tiles of S x S (S = 448), ``min_num <= cols*rows <=
max_num`` (1..12 in Sa2VA), the grid whose aspect ratio ``cols/rows`` is closest to ``W/H``; the image
is resized (bicubic) to ``cols*S x rows*S`` and cut row-major.  When there is more than one tile and
``use_thumbnail`` is set, the whole image resized to S x S follows as a last tile, the *thumbnail*.
The last tile (the thumbnail, or the only tile) always shows the whole image, so region prompts — 16 x 16
masks of the whole image — are gathered from its tokens.

Tie-breaking follows InternVL's ``find_closest_aspect_ratio``: candidates are visited by increasing
tile count (the order of InternVL's candidate set, sorted stably by area); a candidate with a strictly
smaller ratio difference wins, and one with an *equal* difference replaces the current choice when the
image's area exceeds half the candidate grid's pixel area.

Batches: a tiled sample's ``pixel_values`` is (n, 3, S, S) with ``num_tiles`` = n; collate
(:func:`maskloop.data.mixture.collate`) concatenates the tiles of a batch into (sum n, 3, S, S) and
stacks ``num_tiles`` (B,), which the model uses to lay each row's ``n * 256`` image tokens out.

The evaluation entry point::

    inputs = tiled_inputs(image, cfg, masks=None)   # PIL image (original pixels), ModelConfig
    # {'pixel_values': (n,3,S,S) float32, 'num_tiles': tensor(n), 'g_pixel_values': (3,G,G) uint8,
    #  + with masks [(H,W), ...]: 'prompt_masks' (R,g,g) uint8, 'num_regions': tensor(R), 'masks' (R,G,G)}
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from maskloop.data.transforms import SampleTransform

__all__ = ["grid_candidates", "closest_grid", "tile_images", "TiledTransform", "tiled_inputs", "transform_for"]

_BICUBIC = Image.Resampling.BICUBIC


@lru_cache(maxsize=64)
def grid_candidates(min_num: int = 1, max_num: int = 12) -> tuple[tuple[int, int], ...]:
    """(cols, rows) grids with min_num <= cols*rows <= max_num, in InternVL's visiting order.

    InternVL builds a Python set of the grids (by tile count n, then cols, then rows) and sorts it
    stably by tile count; within one tile count the order is that set's iteration order.  It decides
    between equally close grids of the same tile count (e.g. a 5:8 image between 1x4 and 2x2), so it is
    reproduced by building the same set the same way.
    """
    grids = set()
    for n in range(min_num, max_num + 1):
        for c in range(1, n + 1):
            for r in range(1, n + 1):
                if min_num <= c * r <= max_num:
                    grids.add((c, r))
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def closest_grid(width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448) -> tuple[int, int]:
    """The (cols, rows) tile grid InternVL picks for a ``width x height`` image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for c, r in grid_candidates(min_num, max_num):
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * c * r:
            best = (c, r)
    return best


def tile_images(img: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                use_thumbnail: bool = True) -> list[Image.Image]:
    """RGB image -> its tiles (row-major), + the thumbnail when there is more than one tile."""
    cols, rows = closest_grid(img.width, img.height, min_num, max_num, image_size)
    s = image_size
    big = img.resize((cols * s, rows * s), _BICUBIC)
    tiles = [big.crop((x * s, y * s, (x + 1) * s, (y + 1) * s)) for y in range(rows) for x in range(cols)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(img.resize((s, s), _BICUBIC))
    return tiles


class TiledTransform(SampleTransform):
    """:class:`SampleTransform` whose ``pixel_values`` are InternVL's dynamic tiles (n, 3, S, S).

    ``g_pixel_values``, ``prompt_masks`` and ``masks`` are those of :class:`SampleTransform` (the whole
    image, the whole mask): the 16 x 16 prompt mask lines up with the last tile (thumbnail).
    """

    def __init__(self, image_size: int = 448, sam_size: int = 1024, prompt_grid: int = 16, min_num: int = 1,
                 max_num: int = 12, use_thumbnail: bool = True, **kw):
        # no JPEG draft decoding: the grid is chosen from the original size (its area breaks ties) and may
        # need up to max_num * S pixels on a side, so a reduced decode could change the grid or upsample
        kw["draft"] = False
        super().__init__(image_size, sam_size, prompt_grid, **kw)
        self.min_num, self.max_num, self.use_thumbnail = int(min_num), int(max_num), bool(use_thumbnail)

    @classmethod
    def from_config(cls, cfg, **kw) -> TiledTransform:
        return cls(cfg.vision.image_size, cfg.sam2.image_size, cfg.prompt_grid, cfg.min_dynamic_patch,
                   cfg.max_dynamic_patch, cfg.use_thumbnail, **kw)

    def __repr__(self) -> str:
        return (f"TiledTransform(image_size={self.image_size}, sam_size={self.sam_size}, "
                f"prompt_grid={self.prompt_grid}, tiles={self.min_num}..{self.max_num}, "
                f"use_thumbnail={self.use_thumbnail})")

    def normalise(self, tile: Image.Image) -> torch.Tensor:
        x = (np.asarray(tile, dtype=np.float32) * (1.0 / 255.0) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def image(self, img: Image.Image) -> dict[str, torch.Tensor]:
        img = self.prepare(img)
        out = super().image(img)  # g_pixel_values (and the single-tile pixel_values, replaced below)
        tiles = tile_images(img, self.min_num, self.max_num, self.image_size, self.use_thumbnail)
        out["pixel_values"] = torch.stack([self.normalise(t) for t in tiles])
        out["num_tiles"] = torch.tensor(len(tiles), dtype=torch.long)
        return out


def transform_for(cfg, **kw) -> SampleTransform:
    """The data transform a model config asks for: :class:`TiledTransform` when ``cfg.tiles``, else the
    single-tile :class:`SampleTransform` (the training default)."""
    if cfg.tiles:
        return TiledTransform.from_config(cfg, **kw)
    return SampleTransform(image_size=cfg.vision.image_size, sam_size=cfg.sam2.image_size,
                           prompt_grid=cfg.prompt_grid, **kw)


def tiled_inputs(image: Image.Image, cfg, masks=None, draft: bool = False) -> dict[str, torch.Tensor]:
    """Inputs of one original image as Sa2VA's image inference makes them (see the module doc).

    ``masks``: None, one (H, W) mask or a list of them (the regions of a region prompt, in order).
    With ``cfg.tiles`` False (or a one-tile grid) ``pixel_values`` holds the single resized tile.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if cfg.tiles:
        tf = TiledTransform.from_config(cfg, draft=draft)
    else:
        tf = TiledTransform(cfg.vision.image_size, cfg.sam2.image_size, cfg.prompt_grid, 1, 1, False, draft=draft)
    out = tf.image(image)
    if masks is not None:
        ms = [masks] if (isinstance(masks, (np.ndarray, torch.Tensor)) and masks.ndim == 2) else list(masks)
        if not ms:
            raise ValueError("tiled_inputs: masks is an empty list (pass None for no region)")
        for i, m in enumerate(ms):
            if tuple(m.shape) != (image.height, image.width):
                raise ValueError(f"region mask {i + 1} is {tuple(m.shape)} but the image is {image.height}x{image.width}: "
                                 "give masks at the original image's size (H, W)")
        parts = [tf.mask(m) for m in ms]
        out["prompt_masks"] = torch.stack([p["prompt_masks"] for p in parts])
        out["masks"] = torch.stack([p["masks"] for p in parts])
        out["num_regions"] = torch.tensor(len(ms), dtype=torch.long)
    return out

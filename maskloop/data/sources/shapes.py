"""The shapes world: a synthetic stand-in for every real data source.

Small images (default 64x64) with 2-4 coloured shapes on a dark noisy background, fully
deterministic by ``(seed, index)``. Each object has a shape, a colour, a size and a
position; its instance mask is its visible part (objects do not overlap, so that is the
whole shape). From the attributes we generate

* **referring expressions** that pick out exactly one object: the shortest attribute
  phrase that is unique in the image ("the triangle", "the red circle", "the small blue
  square", "the large red square"), and, when two objects share all attributes, a
  relation to a uniquely described anchor ("the green triangle left of the red square");
  :func:`resolve_expression` is the reference interpreter of that little grammar;
* **captions** (region descriptions): "a small red triangle in the top left".

Every word that can appear is in :data:`SHAPES_VOCAB` (see :func:`all_words`); the demo's
tiny tokenizer is built from it (plus the prompt templates' own words).

Datasets (torch ``Dataset``; items are the four tensors of
:class:`maskloop.data.transforms.SampleTransform` plus ``dataset`` and text keys):

* :class:`ShapesReferDataset` — expression -> mask (RefCOCO-like);
* :class:`ShapesRegionCaptionDataset` — mask -> caption (DAM-like);
* :class:`ShapesPairDataset` — two frames of a scene whose objects move and rescale,
  the same object in both (SA-V-like); ``...1`` / ``...2`` keys;
* :class:`ShapesMaskOnlyDataset` — masks only, ``caption`` None (SA-1B-like);
* :class:`ShapesClipDataset` — moving-object clips: frames + per-frame masks of one object and its
  expression (MeViS-like; :func:`move_clip`).

Train and held-out data are made with different seeds (``seed="train"`` / ``"val"`` /
``"test"`` or any int); every scene is drawn from ``np.random.default_rng([seed, index])``.

:func:`write_shapes_as` writes the same world in the released on-disk formats (RefCOCO,
SA-1B, DAM) so the real-format readers can be exercised on it.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from maskloop.lru import BytesLRU

# ----------------------------------------------------------------------------- vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (55, 185, 70),
    "blue": (55, 100, 235),
    "yellow": (235, 210, 45),
    "purple": (150, 65, 205),
    "white": (235, 235, 235),
}
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# (row, col) of the object's centre in a 3x3 grid -> phrase used in captions
REGION_PHRASES: dict[tuple[str, str], str] = {
    ("top", "left"): "in the top left",
    ("top", "center"): "at the top",
    ("top", "right"): "in the top right",
    ("middle", "left"): "on the left",
    ("middle", "center"): "in the center",
    ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left",
    ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}
_FUNCTION_WORDS = ("a", "the")


def all_words() -> list[str]:
    """Every word that can appear in a shapes-world caption or referring expression (sorted)."""
    words = set(_FUNCTION_WORDS) | set(SHAPES) | set(COLORS) | set(SIZES)
    for phrase in (*RELATIONS, *REGION_PHRASES.values()):
        words.update(phrase.split())
    return sorted(words)


SHAPES_VOCAB: tuple[str, ...] = tuple(all_words())

SPLIT_SEEDS: dict[str, int] = {"train": 1_000_003, "val": 2_000_003, "test": 3_000_017}

# ----------------------------------------------------------------------------- scenes

_SMALL_R = (0.070, 0.100)  # radius as a fraction of the image side
_LARGE_R = (0.140, 0.180)
_EXTENT = 1.1  # bounding-circle radius / r, valid for all three shapes
_GAP = 0.03  # min free space between objects, fraction of the image side


@dataclass(frozen=True)
class ShapeObject:
    """One object. Coordinates in pixels of the source image; ``r`` is the shape radius."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    r: float
    rgb: tuple[int, int, int]

    @property
    def attributes(self) -> tuple[str, str, str]:
        return (self.size, self.color, self.shape)

    def moved(self, cx: float, cy: float, r: float) -> ShapeObject:
        return ShapeObject(self.shape, self.color, self.size, cx, cy, r, self.rgb)


@dataclass
class Scene:
    """A rendered scene: ``image`` (H, W, 3) uint8, ``masks`` (N, H, W) bool visible parts."""

    image: np.ndarray
    objects: list[ShapeObject]
    masks: np.ndarray
    background: tuple[int, int, int] = (20, 20, 20)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.image.shape[0])


def shape_mask(obj: ShapeObject, size: int) -> np.ndarray:
    """(size, size) bool raster of the full shape, sampled at pixel centres."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xs - obj.cx, ys - obj.cy
    r = obj.r
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    if obj.shape == "triangle":
        (x0, y0), (x1, y1), (x2, y2) = _triangle_vertices(obj)

        def side(ax, ay, bx, by):
            return (bx - ax) * (ys - ay) - (by - ay) * (xs - ax)

        s0, s1, s2 = side(x0, y0, x1, y1), side(x1, y1, x2, y2), side(x2, y2, x0, y0)
        return ((s0 >= 0) & (s1 >= 0) & (s2 >= 0)) | ((s0 <= 0) & (s1 <= 0) & (s2 <= 0))
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def _triangle_vertices(obj: ShapeObject) -> list[tuple[float, float]]:
    r = obj.r
    return [(obj.cx, obj.cy - 1.05 * r), (obj.cx - 1.05 * r, obj.cy + 0.8 * r), (obj.cx + 1.05 * r, obj.cy + 0.8 * r)]


def shape_polygon(obj: ShapeObject, n_circle: int = 32) -> list[float]:
    """The shape's outline as a COCO polygon [x1, y1, x2, y2, ...] in pixel coordinates."""
    if obj.shape == "circle":
        t = np.linspace(0, 2 * np.pi, n_circle, endpoint=False)
        pts = list(zip(obj.cx + obj.r * np.cos(t), obj.cy + obj.r * np.sin(t)))
    elif obj.shape == "square":
        h = 0.82 * obj.r
        pts = [(obj.cx - h, obj.cy - h), (obj.cx + h, obj.cy - h), (obj.cx + h, obj.cy + h), (obj.cx - h, obj.cy + h)]
    else:
        pts = _triangle_vertices(obj)
    return [round(float(v), 2) for p in pts for v in p]


def _render(objects: Sequence[ShapeObject], size: int, background: tuple[int, int, int],
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw objects in order (later on top); returns image (H,W,3) uint8, visible masks (N,H,W)."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = background
    img += rng.normal(0.0, 5.0, img.shape)
    full = [shape_mask(o, size) for o in objects]
    for o, m in zip(objects, full):
        img[m] = np.asarray(o.rgb, np.float32) + rng.normal(0.0, 4.0, (int(m.sum()), 3))
    visible = np.zeros((len(objects), size, size), bool)
    covered = np.zeros((size, size), bool)
    for k in range(len(objects) - 1, -1, -1):
        visible[k] = full[k] & ~covered
        covered |= full[k]
    return np.clip(img, 0, 255).round().astype(np.uint8), visible


def _place(rng: np.random.Generator, size: int, radii: Sequence[float],
           fixed: Sequence[tuple[float, float, float]] = (), tries: int = 200) -> list[tuple[float, float]] | None:
    """Centres for circles of the given radii, inside the image and apart from each other."""
    placed = list(fixed)
    out = []
    for r in radii:
        ext = r * _EXTENT
        for _ in range(tries):
            cx, cy = rng.uniform(ext + 1, size - ext - 1, size=2)
            if all((cx - x) ** 2 + (cy - y) ** 2 >= (ext + e + _GAP * size) ** 2 for x, y, e in placed):
                break
        else:
            return None
        placed.append((cx, cy, ext))
        out.append((float(cx), float(cy)))
    return out


def make_scene(
    rng: np.random.Generator,
    image_size: int = 64,
    n_objects: tuple[int, int] = (2, 4),
    colors: Sequence[str] | None = None,
    p_duplicate: float = 0.25,
    max_tries: int = 50,
) -> Scene:
    """Draw a random scene in which every object has a unique referring expression.

    ``n_objects``: inclusive range. ``p_duplicate``: chance that an object copies the
    attributes of an earlier one (so relational expressions get exercised).
    """
    if image_size < 24:
        raise ValueError(f"image_size={image_size} is too small for the shapes world; use >= 24")
    colors = list(colors or COLORS)
    for _ in range(max_tries):
        n = int(rng.integers(n_objects[0], n_objects[1] + 1))
        attrs: list[tuple[str, str, str]] = []
        for k in range(n):
            if k > 0 and rng.random() < p_duplicate:
                attrs.append(attrs[int(rng.integers(k))])
            else:
                attrs.append((SIZES[rng.integers(2)], colors[rng.integers(len(colors))], SHAPES[rng.integers(3)]))
        radii = [image_size * rng.uniform(*(_SMALL_R if s == "small" else _LARGE_R)) for s, _, _ in attrs]
        centres = _place(rng, image_size, radii)
        if centres is None:
            continue
        objects = []
        for (s, c, sh), r, (cx, cy) in zip(attrs, radii, centres):
            rgb = tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in COLORS[c])
            objects.append(ShapeObject(sh, c, s, cx, cy, float(r), rgb))
        if any(referring_expression(objects, k, image_size) is None for k in range(n)):
            continue
        bg = tuple(int(v) for v in rng.integers(12, 45, size=3))
        image, masks = _render(objects, image_size, bg, rng)
        if not masks.reshape(n, -1).any(1).all():
            continue
        return Scene(image, objects, masks, bg)
    raise RuntimeError(f"could not draw a valid shapes scene in {max_tries} tries (image_size={image_size})")


def move_scene(scene: Scene, rng: np.random.Generator, max_shift: float = 0.15,
               scale_range: tuple[float, float] = (0.8, 1.25), tries: int = 50) -> Scene:
    """A second 'frame' of ``scene``: every object shifted and rescaled, identities kept.

    Objects stay inside the image and apart; if no such motion is found in ``tries``
    draws, the objects keep their place and only the noise changes.
    """
    size = scene.size
    objs = scene.objects
    for _ in range(tries):
        moved = []
        for o in objs:
            r = o.r * rng.uniform(*scale_range)
            ext = r * _EXTENT
            cx = float(np.clip(o.cx + rng.uniform(-max_shift, max_shift) * size, ext + 1, size - ext - 1))
            cy = float(np.clip(o.cy + rng.uniform(-max_shift, max_shift) * size, ext + 1, size - ext - 1))
            moved.append(o.moved(cx, cy, float(r)))
        ok = all(
            (a.cx - b.cx) ** 2 + (a.cy - b.cy) ** 2 >= ((a.r + b.r) * _EXTENT + _GAP * size) ** 2
            for i, a in enumerate(moved) for b in moved[i + 1:]
        )
        if ok:
            break
    else:
        moved = list(objs)
    image, masks = _render(moved, size, scene.background, rng)
    if not masks.reshape(len(moved), -1).any(1).all():  # cannot happen without overlap; be safe
        moved = list(objs)
        image, masks = _render(moved, size, scene.background, rng)
    return Scene(image, moved, masks, scene.background)


# ----------------------------------------------------------------------------- language


def region_phrase(obj: ShapeObject, image_size: int) -> str:
    third = image_size / 3.0
    row = "top" if obj.cy < third else ("middle" if obj.cy < 2 * third else "bottom")
    col = "left" if obj.cx < third else ("center" if obj.cx < 2 * third else "right")
    return REGION_PHRASES[(row, col)]


def caption_for(obj: ShapeObject, image_size: int) -> str:
    """Region description, e.g. 'a small red triangle in the top left'."""
    return f"a {obj.size} {obj.color} {obj.shape} {region_phrase(obj, image_size)}"


def _match(objects: Sequence[ShapeObject], shape: str, color: str | None, size: str | None,
           location: str | None = None, image_size: int | None = None) -> list[int]:
    """Objects of ``shape`` with the given colour / size / location (None: any); a location is the region
    phrase of the object's centre (:func:`region_phrase`), so it needs ``image_size``."""
    if location is not None and image_size is None:
        raise ValueError(f"the location {location!r} needs the image size")
    return [
        i for i, o in enumerate(objects)
        if o.shape == shape and (color is None or o.color == color) and (size is None or o.size == size)
        and (location is None or region_phrase(o, image_size) == location)
    ]


def _holds(o: ShapeObject, a: ShapeObject, rel: str) -> bool:
    """Relation of o to anchor a, compared on object centres."""
    if rel == "left of":
        return o.cx < a.cx
    if rel == "right of":
        return o.cx > a.cx
    if rel == "above":
        return o.cy < a.cy
    if rel == "below":
        return o.cy > a.cy
    raise ValueError(f"unknown relation {rel!r}")


def _np(size: str | None, color: str | None, shape: str, location: str | None = None) -> str:
    return " ".join(w for w in ("the", size, color, shape, location) if w)


# the location phrases of the referring grammar: the captions' region phrases, longest first for parsing
LOCATIONS: tuple[str, ...] = tuple(sorted(REGION_PHRASES.values(), key=lambda p: -len(p.split())))


def _parse_np(words: list[str], i: int) -> tuple[tuple[str | None, str | None, str, str | None], int]:
    if i >= len(words) or words[i] != "the":
        raise ValueError("expected 'the'")
    i += 1
    size = color = location = None
    if i < len(words) and words[i] in SIZES:
        size, i = words[i], i + 1
    if i < len(words) and words[i] in COLORS:
        color, i = words[i], i + 1
    if i >= len(words) or words[i] not in SHAPES:
        raise ValueError("expected a shape word")
    shape, i = words[i], i + 1
    for loc in LOCATIONS:
        lw = loc.split()
        if words[i:i + len(lw)] == lw:
            location, i = loc, i + len(lw)
            break
    return (size, color, shape, location), i


def resolve_expression(objects: Sequence[ShapeObject], text: str, image_size: int | None = None) -> list[int]:
    """Indices of the objects a shapes-world expression can refer to (the reference semantics).

    Grammar: ``NP [(left of|right of|above|below) NP]`` with ``NP = the [size] [color] shape [location]``,
    a location being one of the captions' region phrases ("in the top left", "at the top", ...,
    :data:`REGION_PHRASES`): the 3x3 cell of the object's centre (:func:`region_phrase`), so an
    expression with a location needs ``image_size``.
    With a relation, a candidate matches if the relation holds to *some* object matching
    the anchor phrase. An expression is unambiguous iff this returns exactly one index.
    Raises ValueError on text outside the grammar.
    """
    words = text.lower().strip().rstrip(".").split()
    try:
        (size, color, shape, loc), i = _parse_np(words, 0)
        cands = _match(objects, shape, color, size, loc, image_size)
        if i == len(words):
            return cands
        rel = None
        for r in RELATIONS:
            rw = r.split()
            if words[i:i + len(rw)] == rw:
                rel, i = r, i + len(rw)
                break
        if rel is None:
            raise ValueError("expected a relation")
        (a_size, a_color, a_shape, a_loc), i = _parse_np(words, i)
        if i != len(words):
            raise ValueError("trailing words")
        anchors = _match(objects, a_shape, a_color, a_size, a_loc, image_size)
    except ValueError as e:
        raise ValueError(f"not a shapes-world expression: {text!r} ({e})") from None
    return [c for c in cands if any(a != c and _holds(objects[c], objects[a], rel) for a in anchors)]


_ATTR_SUBSETS = ((False, False), (False, True), (True, False), (True, True))  # (use size, use color)


def _plain_expressions(objects: Sequence[ShapeObject], idx: int) -> list[str]:
    """Relation-free unique expressions for objects[idx], shortest first."""
    o = objects[idx]
    out = []
    for use_size, use_color in _ATTR_SUBSETS:
        size, color = (o.size if use_size else None), (o.color if use_color else None)
        if _match(objects, o.shape, color, size) == [idx]:
            out.append(_np(size, color, o.shape))
    return out


def referring_expressions(objects: Sequence[ShapeObject], idx: int, image_size: int) -> list[str]:
    """All generated unique expressions for objects[idx], shortest (minimal) first.

    Relation-free phrases when any is unique; otherwise relational ones, where the
    target lies clearly (>= 8% of the image side) on the named side of an anchor that
    has its own unique relation-free phrase. Empty when the object cannot be singled out.
    """
    plain = _plain_expressions(objects, idx)
    if plain:
        return plain
    o = objects[idx]
    margin = 0.08 * image_size
    out: list[tuple[int, int, str]] = []
    for j, a in enumerate(objects):
        anchor_phrases = _plain_expressions(objects, j) if j != idx else []
        if not anchor_phrases:
            continue
        for rel in RELATIONS:
            d = {"left of": a.cx - o.cx, "right of": o.cx - a.cx, "above": a.cy - o.cy, "below": o.cy - a.cy}[rel]
            if d < margin:
                continue
            for use_size, use_color in _ATTR_SUBSETS:
                size, color = (o.size if use_size else None), (o.color if use_color else None)
                text = f"{_np(size, color, o.shape)} {rel} {anchor_phrases[0]}"
                if resolve_expression(objects, text) == [idx]:
                    out.append((len(text.split()), len(out), text))
                    break
    return [t for _, _, t in sorted(out)]


EXPRESSION_POLICIES = ("minimal", "colour", "varied")


def varied_expressions(objects: Sequence[ShapeObject], idx: int, image_size: int) -> list[str]:
    """The unique relation-free expressions for objects[idx] that name its colour, with or without its size
    and / or its location: "the red triangle", "the small red triangle", "the red triangle in the top left",
    "the small red triangle in the top left" (those of them that single it out; shortest first)."""
    o = objects[idx]
    where = region_phrase(o, image_size)
    out = []
    for use_size, use_loc in ((False, False), (True, False), (False, True), (True, True)):
        size, loc = (o.size if use_size else None), (where if use_loc else None)
        if _match(objects, o.shape, o.color, size, loc, image_size) == [idx]:
            out.append(_np(size, o.color, o.shape, loc))
    return out


def referring_expression(objects: Sequence[ShapeObject], idx: int, image_size: int,
                         policy: str = "minimal", rng: np.random.Generator | None = None) -> str | None:
    """One unique expression for objects[idx] (None if there is none).

    ``policy``: ``"minimal"`` — the shortest unique phrase (about half of them name the shape
    alone, "the triangle"); ``"colour"`` — the shortest unique phrase that names the target's
    colour ("the red triangle"), as people over-specify colour when they refer; the minimal
    one when no phrase with the colour is unique; ``"varied"`` — one drawn with ``rng`` (uniformly)
    among :func:`varied_expressions`, the colour-naming phrases that may also name the size and / or
    the location the way the captions do ("the red triangle in the top left"); the ``"colour"`` one
    when none of them is unique (objects that only a relation singles out).
    """
    if policy not in EXPRESSION_POLICIES:
        raise ValueError(f"unknown expression policy {policy!r}; choose one of {EXPRESSION_POLICIES}")
    if policy == "varied":
        if rng is None:
            raise ValueError("the 'varied' expression policy draws among expressions: pass rng")
        exprs = varied_expressions(objects, idx, image_size)
        if exprs:
            return exprs[int(rng.integers(len(exprs)))]
        policy = "colour"
    exprs = referring_expressions(objects, idx, image_size)
    if policy == "colour":
        colour = objects[idx].color
        named = [e for e in exprs if colour in e.split()[:4]]  # the target's own noun phrase, not the anchor's
        exprs = named or exprs
    return exprs[0] if exprs else None


# ----------------------------------------------------------------------------- datasets


def _seed_int(seed: int | str) -> int:
    if isinstance(seed, str):
        if seed not in SPLIT_SEEDS:
            raise ValueError(f"unknown split seed {seed!r}; use an int or one of {sorted(SPLIT_SEEDS)}")
        return SPLIT_SEEDS[seed]
    return int(seed)


class SceneCache(BytesLRU):
    """A bounded most-recently-used cache of drawn scenes, keyed by what determines them (seed, index, image
    size, object count range, colours).  Drawing a scene (placement, rendering, the uniqueness checks) took
    two thirds of a shapes item's time (2.1 of 3.2 ms at 64 px), and the demo reads each of its training
    scenes ~20 times (two SFT stages and the dual loop, several dataset kinds over the same seed).  Holds at
    most ``max_bytes`` of image and mask arrays (a 64 px scene is ~30 kB); ``max_bytes`` 0 turns it off."""

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        super().__init__(max_bytes, lambda sc: sc.image.nbytes + sc.masks.nbytes)
        self.hits = self.misses = 0

    def get(self, key) -> Scene | None:
        sc = super().get(key)
        if sc is None:
            self.misses += 1
        else:
            self.hits += 1
        return sc

    def clear(self) -> None:
        super().clear()
        self.hits = self.misses = 0


SCENE_CACHE = SceneCache()  # shared by every shapes dataset of this process (each DataLoader worker has its own)


class _ShapesBase(Dataset):
    """``n`` scenes drawn from ``seed``; item ``i`` uses scene ``i`` and one object of it.

    ``transform``: a :class:`~maskloop.data.transforms.SampleTransform` (or anything with
    its ``__call__`` / ``pair``); when None, one is built from ``mllm_size``,
    ``sam_size`` and ``prompt_grid`` (the tiny demo uses small sizes, e.g. 64/64/16).
    ``as_pair``: single-image datasets return the ``...1``/``...2`` keys (frame 2 = frame 1).
    ``name``: the item's ``dataset`` value (default per class, e.g. ``shapes_refer``).
    ``expression_policy``: which unique expression an item carries (:func:`referring_expression`).
    """

    dataset_name = "shapes"
    _stream = 0  # separates the random streams of the dataset kinds

    def __init__(
        self,
        n: int,
        seed: int | str = "train",
        image_size: int = 64,
        transform: Callable | None = None,
        mllm_size: int = 448,
        sam_size: int = 1024,
        prompt_grid: int = 16,
        n_objects: tuple[int, int] = (2, 4),
        colors: Sequence[str] | None = None,
        as_pair: bool = False,
        name: str | None = None,
        expression_policy: str = "minimal",
    ) -> None:
        if expression_policy not in EXPRESSION_POLICIES:
            raise ValueError(f"unknown expression_policy {expression_policy!r}; choose one of {EXPRESSION_POLICIES}")
        self.expression_policy = expression_policy
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        self.n = int(n)
        self.seed = _seed_int(seed)
        self.image_size = int(image_size)
        self.n_objects = n_objects
        self.colors = list(colors) if colors else None
        self.as_pair = bool(as_pair)
        self.name = name or self.dataset_name
        if transform is None:
            from maskloop.data.transforms import SampleTransform

            transform = SampleTransform(image_size=mllm_size, sam_size=sam_size, prompt_grid=prompt_grid)
        self.transform = transform

    def __len__(self) -> int:
        return self.n

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index), stream])

    def scene(self, index: int) -> Scene:
        """The deterministic scene behind item ``index`` (drawn once, then from :data:`SCENE_CACHE`; its
        arrays are read-only, as every dataset kind of the same seed and index shares it)."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} scenes")
        key = (self.seed, int(index), self.image_size, tuple(self.n_objects),
               tuple(self.colors) if self.colors else None)
        sc = SCENE_CACHE.get(key)
        if sc is None:
            sc = make_scene(self._rng(index, 0), self.image_size, self.n_objects, self.colors)
            sc.image.setflags(write=False)
            sc.masks.setflags(write=False)
            SCENE_CACHE.put(key, sc)
        return sc

    def target(self, index: int, scene: Scene) -> int:
        """Which object of the scene item ``index`` is about."""
        return int(self._rng(index, 1 + self._stream).integers(len(scene.objects)))

    def raw(self, index: int) -> dict[str, Any]:
        """Untransformed item: image (H,W,3) uint8, mask (H,W) bool, texts, the scene."""
        sc = self.scene(index)
        k = self.target(index, sc)
        return {
            "image": sc.image,
            "mask": sc.masks[k],
            "object_index": k,
            "caption": caption_for(sc.objects[k], sc.size),
            "expression": referring_expression(sc.objects, k, sc.size, self.expression_policy,
                                               self._rng(index, 20)),
            "scene": sc,
        }

    def _single(self, r: dict[str, Any]) -> dict[str, Any]:
        """The four tensors, or with ``as_pair`` the eight ``...1``/``...2`` ones (frame 2 = frame 1)."""
        item = dict(self.transform(Image.fromarray(r["image"]), r["mask"]))
        if self.as_pair:
            item = {k + sfx: v for sfx in ("1", "2") for k, v in item.items()}
        return item


class ShapesReferDataset(_ShapesBase):
    """Referring segmentation: ``expression`` -> ``masks`` (RefCOCO-like).

    ``with_other``: items also carry ``other_expression`` and ``other_masks``, another object of the
    same image (for :func:`maskloop.eval.refer.evaluate_text_sensitivity`).
    """

    dataset_name = "shapes_refer"
    _stream = 0

    def __init__(self, *args, with_other: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.with_other = bool(with_other)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.raw(index)
        item = self._single(r)
        item.update(dataset=self.name, expression=r["expression"], caption=r["caption"])
        if self.with_other:  # the next object of the same scene (evaluate_text_sensitivity)
            sc = r["scene"]
            j = (r["object_index"] + 1) % len(sc.objects)
            item["other_expression"] = referring_expression(sc.objects, j, sc.size, self.expression_policy,
                                                            self._rng(index, 21))
            item["other_masks"] = self.transform(Image.fromarray(r["image"]), sc.masks[j])["masks"]
        return item


class ShapesRegionCaptionDataset(_ShapesBase):
    """Region captioning: ``prompt_masks`` / ``masks`` -> ``caption`` (DAM-like)."""

    dataset_name = "shapes_caption"
    _stream = 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.raw(index)
        item = self._single(r)
        item.update(dataset=self.name, caption=r["caption"], expression=r["expression"])
        return item


class ShapesMaskOnlyDataset(_ShapesBase):
    """Masks without text (SA-1B-like): ``caption`` is None.

    ``as_pair=True`` yields the ``...1`` / ``...2`` keys with image2 = image1 and
    mask2 = mask1 (the single-image form of Loop 1), like the real readers' ``as_pair``.
    """

    dataset_name = "shapes_mask"
    _stream = 2

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self._single(self.raw(index))
        item.update(dataset=self.name, caption=None)
        return item


class ShapesPairDataset(_ShapesBase):
    """Two frames of one scene, objects moved and rescaled in frame 2 (SA-V-like).

    Items carry ``pixel_values1`` ... ``masks2`` (the same object in both frames) and
    the object's ``caption`` (as seen in frame 1).
    """

    dataset_name = "shapes_pair"
    _stream = 3

    def __init__(self, *args, max_shift: float = 0.15, scale_range: tuple[float, float] = (0.8, 1.25),
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_shift = max_shift
        self.scale_range = scale_range

    def frames(self, index: int) -> tuple[Scene, Scene, int]:
        """(frame 1, frame 2, object index) behind item ``index``."""
        s1 = self.scene(index)
        s2 = move_scene(s1, self._rng(index, 10), self.max_shift, self.scale_range)
        return s1, s2, self.target(index, s1)

    def raw(self, index: int) -> dict[str, Any]:
        s1, s2, k = self.frames(index)
        return {
            "image1": s1.image, "mask1": s1.masks[k], "image2": s2.image, "mask2": s2.masks[k],
            "object_index": k, "caption": caption_for(s1.objects[k], s1.size), "scene1": s1, "scene2": s2,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.raw(index)
        item = dict(self.transform.pair(Image.fromarray(r["image1"]), r["mask1"],
                                        Image.fromarray(r["image2"]), r["mask2"]))
        item.update(dataset=self.name, caption=r["caption"])
        return item


def move_clip(scene: Scene, rng: np.random.Generator, num_frames: int, speed: float = 0.03) -> list[Scene]:
    """``num_frames`` frames of ``scene`` (frame 0 is the scene itself) whose objects glide with a constant
    velocity (``speed``: fraction of the image side per frame) and bounce off the borders; a step that
    would make two objects overlap reverses both velocities, so objects stay apart and every expression
    of frame 0 keeps meaning the same object (positions relative to the image may change)."""
    size = scene.size
    objs = list(scene.objects)
    ang = rng.uniform(0, 2 * np.pi, len(objs))
    vel = np.stack([np.cos(ang), np.sin(ang)], 1) * speed * size
    frames = [scene]
    for _ in range(num_frames - 1):
        nxt = []
        for k, o in enumerate(objs):
            ext = o.r * _EXTENT
            cx, cy = o.cx + vel[k, 0], o.cy + vel[k, 1]
            if not ext + 1 <= cx <= size - ext - 1:
                vel[k, 0] *= -1
                cx = float(np.clip(o.cx + vel[k, 0], ext + 1, size - ext - 1))
            if not ext + 1 <= cy <= size - ext - 1:
                vel[k, 1] *= -1
                cy = float(np.clip(o.cy + vel[k, 1], ext + 1, size - ext - 1))
            nxt.append(o.moved(float(cx), float(cy), o.r))
        for i in range(len(nxt)):
            for j in range(i + 1, len(nxt)):
                a, b = nxt[i], nxt[j]
                if (a.cx - b.cx) ** 2 + (a.cy - b.cy) ** 2 < ((a.r + b.r) * _EXTENT + _GAP * size) ** 2:
                    vel[i] *= -1
                    vel[j] *= -1
                    nxt[i], nxt[j] = objs[i], objs[j]
        objs = nxt
        image, masks = _render(objs, size, scene.background, rng)
        frames.append(Scene(image, list(objs), masks, scene.background))
    return frames


class ShapesClipDataset(_ShapesBase):
    """Moving-object clips (MeViS-like): item ``i`` is a :class:`~maskloop.data.sources.rvos.Clip` of
    ``num_frames`` frames of scene ``i`` with the per-frame masks of one object and its referring
    expression (unique in frame 0), under ``clip``; ``expression`` and ``dataset`` as the other kinds."""

    dataset_name = "shapes_clip"
    _stream = 4

    def __init__(self, *args, num_frames: int = 8, speed: float = 0.03, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.expression_policy == "varied":  # a location is where the object starts, not where it stays
            raise ValueError("expression_policy 'varied' names locations, which moving objects leave; use "
                             "'minimal' or 'colour' for clips")
        self.num_frames = int(num_frames)
        self.speed = speed

    def frames(self, index: int) -> tuple[list[Scene], int]:
        s0 = self.scene(index)
        return move_clip(s0, self._rng(index, 11), self.num_frames, self.speed), self.target(index, s0)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from maskloop.data.sources.rvos import Clip

        scenes, k = self.frames(index)
        text = referring_expression(scenes[0].objects, k, scenes[0].size, self.expression_policy)
        clip = Clip([Image.fromarray(s.image) for s in scenes], np.stack([s.masks[k] for s in scenes]),
                    list(range(len(scenes))), text, f"{self.name}/{index}")
        return {"clip": clip, "expression": text, "dataset": self.name, "caption": None}


# ----------------------------------------------------------------------------- on-disk formats


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of an (H, W) bool mask with ``counts`` as str (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _jpeg_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _scenes(n: int, seed: int | str, image_size: int) -> list[Scene]:
    s = _seed_int(seed)
    return [make_scene(np.random.default_rng([s, i, 0]), image_size) for i in range(n)]


def _write_refcoco(root: Path, scenes: list[Scene], split: str, segmentation: str,
                   dataset: str) -> dict[str, Path]:
    img_dir = root / "images" / "train2014"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir = root / dataset
    ann_dir.mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    images, anns, refs = [], [], []
    sent_id = 0
    for i, sc in enumerate(scenes):
        image_id = i + 1
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        (img_dir / file_name).write_bytes(_jpeg_bytes(sc.image))
        h, w = sc.image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for k, (o, m) in enumerate(zip(sc.objects, sc.masks)):
            ann_id = image_id * 100 + k
            seg = [shape_polygon(o)] if segmentation == "polygon" else _rle(m)
            anns.append({
                "id": ann_id, "image_id": image_id, "category_id": SHAPES.index(o.shape) + 1,
                "segmentation": seg, "area": float(m.sum()), "bbox": _bbox(m), "iscrowd": 0,
            })
            exprs = referring_expressions(sc.objects, k, sc.size)[:3]
            sentences = []
            for e in exprs:
                sentences.append({"tokens": e.split(), "raw": e, "sent": e, "sent_id": sent_id})
                sent_id += 1
            refs.append({
                "ref_id": len(refs), "ann_id": ann_id, "image_id": image_id, "split": split,
                "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
                "category_id": SHAPES.index(o.shape) + 1,
                "file_name": f"COCO_train2014_{image_id:012d}_{k}.jpg",
            })
    instances = {"images": images, "annotations": anns, "categories": cats}
    split_by = "umd" if dataset == "refcocog" else "unc"
    (ann_dir / "instances.json").write_text(json.dumps(instances))
    with open(ann_dir / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return {"root": root, "refs": ann_dir / f"refs({split_by}).p", "instances": ann_dir / "instances.json",
            "images": img_dir}


def _write_sa1b(root: Path, scenes: list[Scene]) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    for i, sc in enumerate(scenes):
        name = f"sa_{i + 1}"
        (root / f"{name}.jpg").write_bytes(_jpeg_bytes(sc.image))
        h, w = sc.image.shape[:2]
        annotations = []
        for k, (o, m) in enumerate(zip(sc.objects, sc.masks)):
            annotations.append({
                "id": (i + 1) * 100 + k, "segmentation": _rle(m), "bbox": _bbox(m), "area": int(m.sum()),
                "predicted_iou": 0.95, "stability_score": 0.97,
                "point_coords": [[round(o.cx, 2), round(o.cy, 2)]], "crop_box": [0.0, 0.0, float(w), float(h)],
            })
        meta = {"image": {"image_id": i + 1, "width": w, "height": h, "file_name": f"{name}.jpg"},
                "annotations": annotations}
        (root / f"{name}.json").write_text(json.dumps(meta))
    return {"root": root}


def _write_dam(root: Path, scenes: list[Scene], split: str, shard_size: int) -> dict[str, Path]:
    split_dir = root / split
    img_dir = split_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    annotations: dict[str, list[dict[str, Any]]] = {}
    tar = None
    for i, sc in enumerate(scenes):
        sid = f"{i:08d}"
        regions = [{"caption": caption_for(o, sc.size), "mask_rle": _rle(m)} for o, m in zip(sc.objects, sc.masks)]
        annotations[sid] = regions
        if i % shard_size == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(img_dir / f"{i // shard_size:08d}.tar", "w")
        for name, data in ((f"{sid}.jpg", _jpeg_bytes(sc.image)), (f"{sid}.pickle", pickle.dumps(regions, protocol=2))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    if tar is not None:
        tar.close()
    (split_dir / "annotations.json").write_text(json.dumps(annotations))
    return {"root": root, "split": split_dir, "annotations": split_dir / "annotations.json", "images": img_dir}


def write_shapes_as(
    kind: str,
    root: str | Path,
    n: int,
    seed: int | str = "train",
    image_size: int = 64,
    split: str | None = None,
    segmentation: str = "polygon",
    shard_size: int = 8,
    dataset: str = "refcoco",
) -> dict[str, Path]:
    """Write ``n`` shapes scenes in a released on-disk format; returns the key paths.

    kind:
      * ``'refcoco'``: the refer-toolkit layout read by
        :class:`maskloop.data.sources.refcoco.RefCOCODataset`: ``root/{dataset}/refs(unc).p``
        (``refs(umd).p`` for refcocog; a pickled list of refs: ref_id, ann_id, image_id,
        split, sentences[{tokens, raw, sent, sent_id}], sent_ids, category_id, file_name),
        ``root/{dataset}/instances.json`` (COCO images / annotations / categories;
        ``segmentation`` 'polygon' as released, or 'rle') and
        ``root/images/train2014/COCO_train2014_%012d.jpg``. One ref per object, with up to
        3 unique expressions as its sentences; ``split`` (default 'train') goes in every ref.
      * ``'sa1b'``: ``root/sa_N.jpg`` + ``root/sa_N.json`` ({image, annotations} with COCO RLE).
      * ``'dam'``: ``root/{split}/annotations.json`` (id -> list of {caption, mask_rle}) and
        ``root/{split}/images/NNNNNNNN.tar`` shards of ``<id>.jpg`` + ``<id>.pickle`` (the
        pickle: the image's list of region dicts, plain data only); ``split`` default
        'COCOStuff'; ``shard_size`` images per shard.
    Images are JPEG (quality 95), so pixels differ slightly from :func:`make_scene`'s.
    """
    root = Path(root)
    scenes = _scenes(n, seed, image_size)
    if kind == "refcoco":
        if segmentation not in ("polygon", "rle"):
            raise ValueError(f"segmentation must be 'polygon' or 'rle', got {segmentation!r}")
        return _write_refcoco(root, scenes, split or "train", segmentation, dataset)
    if kind == "sa1b":
        return _write_sa1b(root, scenes)
    if kind == "dam":
        return _write_dam(root, scenes, split or "COCOStuff", shard_size)
    raise ValueError(f"write_shapes_as: unknown kind {kind!r}; supported: 'refcoco', 'sa1b', 'dam' "
                     "('sav' is not written by this helper: use maskloop.data.fixtures)")


__all__ = [
    "COLORS", "RELATIONS", "SCENE_CACHE", "SHAPES", "SHAPES_VOCAB", "SIZES", "SPLIT_SEEDS", "SceneCache",
    "Scene", "ShapeObject", "ShapesClipDataset", "ShapesMaskOnlyDataset", "ShapesPairDataset", "ShapesReferDataset",
    "ShapesRegionCaptionDataset", "all_words", "caption_for", "make_scene", "move_clip", "move_scene",
    "EXPRESSION_POLICIES", "referring_expression", "referring_expressions", "resolve_expression", "shape_mask",
    "shape_polygon", "write_shapes_as",
]

"""Low-level readers shared by the dataset sources.

* :func:`safe_load_pickle` -- a restricted unpickler for the pickles that released datasets
  ship (RefCOCO's ``refs(unc).p``, the per-sample ``<id>.pickle`` inside DAM tar shards).
  A pickle can name any importable callable and have the loader call it; this one only
  admits plain builtin containers and scalars, so a hostile file raises
  :class:`UnsafePickleError` before anything runs.
* COCO RLE helpers: :func:`rle_counts` parses the compressed ``counts`` string (the
  5-bits-per-character, delta-coded format of ``pycocotools``) in pure Python so that an
  RLE can be *validated* (runs non-negative, summing to ``h*w``) before it reaches the C
  decoder, which does no bounds checking. :func:`decode_segmentation` turns a COCO
  segmentation (compressed or uncompressed RLE dict, or a polygon list) into a bool mask.
* :func:`open_image` opens an image from a path or bytes, optionally with PIL's JPEG
  draft mode (decode at a reduced DCT scale that is still at least the requested size),
  and returns it with the *original* stored size, which is what masks are annotated at.
* :class:`TarShard` / :func:`scan_tar` -- random access to members of uncompressed tar
  shards by (offset, size) without keeping a ``tarfile`` object around (fork-safe, and
  an index of offsets can be cached as JSON).

Errors are raised as :class:`maskloop.data.robust.SampleError` with a reason from
:mod:`maskloop.data.robust` so the robust wrapper can count them.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, JpegImagePlugin

from .robust import SampleError

__all__ = [
    "UnsafePickleError",
    "safe_load_pickle",
    "rle_counts",
    "validate_rle",
    "decode_segmentation",
    "open_image",
    "read_json",
    "scan_tar",
    "FileLRU",
]

# --------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------

#: (module, name) pairs a pickle may reference. Only plain data types: no callables with
#: side effects, no ``object.__reduce__`` reconstructors, nothing outside ``builtins``.
_SAFE_GLOBALS = frozenset(
    (module, name)
    for module in ("builtins", "__builtin__")  # protocols 0-2 name Python 2's module
    for name in (
        "dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray",
        "int", "float", "complex", "bool", "NoneType", "slice", "range",
    )
)


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a pickle references anything but plain builtin containers/scalars."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # noqa: D401
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to load pickle: it references {module}.{name}, but only plain builtin "
            "containers and scalars (dict, list, tuple, set, str, bytes, int, float, bool) are "
            "allowed. The file is not a plain-data pickle (it may be hostile); re-create it "
            "from the original release."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing to load pickle: it uses persistent ids")


def safe_load_pickle(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview) -> Any:
    """Load a pickle that may only contain builtin containers and scalars.

    Python-2 pickles (the RefCOCO refs files were written by Python 2) are read with
    ``encoding="utf-8"`` (``errors="replace"``): their byte strings come back as ``str``.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        f = io.BytesIO(bytes(path_or_bytes))
        return _RestrictedUnpickler(f, encoding="utf-8", errors="replace").load()
    with open(path_or_bytes, "rb") as fh:
        return _RestrictedUnpickler(fh, encoding="utf-8", errors="replace").load()


# --------------------------------------------------------------------------------------
# COCO RLE / polygons
# --------------------------------------------------------------------------------------


def rle_counts(counts: str | bytes) -> list[int]:
    """Parse a compressed COCO RLE ``counts`` string into run lengths.

    Format (as documented for pycocotools): each run is a little-endian sequence of
    5-bit groups, one character each, stored as ``chr(48 + group | 0x20 if more)``; the
    last group's bit 0x10 is the sign. From the third run on, a run is stored as the
    difference to the run two places before it.
    """
    if isinstance(counts, str):
        data = counts.encode("ascii", errors="strict")
    else:
        data = bytes(counts)
    out: list[int] = []
    pos, n = 0, len(data)
    while pos < n:
        value, shift, more = 0, 0, True
        while more:
            if pos >= n:
                raise ValueError("RLE counts string ends inside a run")
            c = data[pos] - 48
            if c < 0 or c > 63:
                raise ValueError(f"RLE counts string has an invalid character {chr(data[pos])!r}")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and (c & 0x10):
                value |= -1 << shift
        if len(out) > 2:
            value += out[-2]
        out.append(value)
    return out


def validate_rle(rle: dict) -> tuple[int, int]:
    """Check a COCO RLE dict; return its (h, w). Raises ``SampleError('bad_rle')``."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
        runs = list(counts) if isinstance(counts, (list, tuple)) else rle_counts(counts)
    except SampleError:
        raise
    except Exception as e:  # noqa: BLE001 - anything malformed is a bad RLE
        raise SampleError("bad_rle", detail=f"malformed RLE: {e}") from e
    if h <= 0 or w <= 0:
        raise SampleError("bad_rle", detail=f"RLE size {h}x{w} is empty")
    if any(int(r) < 0 for r in runs):
        raise SampleError("bad_rle", detail="RLE has a negative run")
    total = int(sum(int(r) for r in runs))
    if total != h * w:
        raise SampleError("bad_rle", detail=f"RLE runs sum to {total}, expected h*w = {h * w}")
    return h, w


def _decode(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_util

    # pycocotools (<= 2.0.10) calls np.array(copy=False) on its Cython RLE object, which
    # NumPy 2 answers with a DeprecationWarning per mask: harmless, silenced here only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_util.decode(rle).astype(bool)


def decode_segmentation(seg: Any, height: int | None = None, width: int | None = None) -> np.ndarray:
    """COCO segmentation (RLE dict or polygon list) -> bool mask (H, W).

    ``height``/``width`` are required for polygons and checked against an RLE's size.
    """
    from pycocotools import mask as mask_util

    if isinstance(seg, dict):
        h, w = validate_rle(seg)
        if height is not None and width is not None and (h, w) != (height, width):
            raise SampleError("bad_rle", detail=f"mask is {h}x{w} but the image is {height}x{width}")
        if isinstance(seg["counts"], (list, tuple)):
            rle = mask_util.frPyObjects({"size": [h, w], "counts": [int(c) for c in seg["counts"]]}, h, w)
        else:
            counts = seg["counts"]
            rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        return _decode(rle)
    if isinstance(seg, (list, tuple)):
        if height is None or width is None:
            raise ValueError("polygon segmentations need the image height and width")
        polys = []
        for poly in seg:
            # what pycocotools' frPyObjects decodes is kept, degenerate ones included (the reference
            # evaluations score them); what it refuses (e.g. 4 numbers, which it tries to read as a box) is bad_rle
            if not isinstance(poly, (list, tuple)) or len(poly) < 4:
                raise SampleError("bad_rle", detail="polygon must be a flat list of (x, y) coordinates (>= 4 numbers)")
            try:
                p = [float(v) for v in poly]
            except (TypeError, ValueError) as e:
                raise SampleError("bad_rle", detail=f"polygon has a non-numeric value: {e}") from e
            if not all(np.isfinite(p)):
                raise SampleError("bad_rle", detail="polygon has a non-finite coordinate")
            polys.append(p)
        if not polys:
            raise SampleError("empty_mask", detail="segmentation has no polygons")
        try:
            rles = mask_util.frPyObjects(polys, height, width)
        except Exception as e:  # noqa: BLE001 - pycocotools raises a bare Exception for what it cannot read
            raise SampleError("bad_rle", detail=f"pycocotools cannot decode the polygon: {e}") from e
        return _decode(mask_util.merge(rles))
    raise SampleError("bad_rle", detail=f"unknown segmentation type {type(seg).__name__}")


# --------------------------------------------------------------------------------------
# Images and JSON
# --------------------------------------------------------------------------------------


def open_image(
    src: str | os.PathLike | bytes, draft_size: int | None = None, key: str | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Open and fully decode an image as RGB.

    Returns ``(image, (width, height))`` where the size is the *stored* size before any
    draft reduction (masks are annotated at that size). With ``draft_size`` and a JPEG
    at least twice that size on both axes, PIL decodes at 1/2, 1/4 or 1/8 DCT scale,
    choosing the smallest scale whose result is still >= ``draft_size`` on both axes.
    ``key`` names the item in errors (default: the path).
    Missing files raise ``missing_file``; undecodable or truncated ones ``corrupt_image``
    (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False on purpose).
    """
    name = key or ("<bytes>" if isinstance(src, (bytes, bytearray)) else os.fspath(src))
    try:
        fh = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else open(src, "rb")
    except FileNotFoundError as e:
        raise SampleError("missing_file", key=name, detail="image file not found") from e
    try:
        with fh:
            img = Image.open(fh)
            size = img.size
            if draft_size and isinstance(img, JpegImagePlugin.JpegImageFile):
                img.draft("RGB", (draft_size, draft_size))
            img = img.convert("RGB")  # forces the full decode while the file is open
    except SampleError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SampleError("corrupt_image", key=name, detail=f"cannot decode image: {e}") from e
    return img, size


def read_json(path: str | os.PathLike | bytes, key: str | None = None) -> Any:
    """Read JSON from a path (or bytes); ``missing_file`` / ``bad_json`` on failure."""
    if isinstance(path, (bytes, bytearray)):
        name, raw = key or "<bytes>", bytes(path)
    else:
        name = key or os.fspath(path)
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError as e:
            raise SampleError("missing_file", key=name, detail="json file not found") from e
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleError("bad_json", key=name, detail=f"cannot parse json: {e}") from e


# --------------------------------------------------------------------------------------
# Tar shards and open-file LRU
# --------------------------------------------------------------------------------------


def scan_tar(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Map member basename -> (data offset, size) for the regular files of a tar."""
    out: dict[str, tuple[int, int]] = {}
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if m.isfile():
                out[os.path.basename(m.name)] = (int(m.offset_data), int(m.size))
    return out


class FileLRU:
    """A small per-process LRU of open binary files (tar shards, zips).

    Re-created lazily after ``fork`` (DataLoader workers), so handles are never shared
    between processes.
    """

    def __init__(self, capacity: int = 8, opener=None):
        self.capacity = max(1, int(capacity))
        self._opener = opener  # a picklable callable path -> file-like; None = open(path, "rb")
        self._files: OrderedDict[str, Any] = OrderedDict()
        self._pid = os.getpid()

    def get(self, path: str):
        if self._pid != os.getpid():
            self._files = OrderedDict()
            self._pid = os.getpid()
        f = self._files.get(path)
        if f is not None:
            self._files.move_to_end(path)
            return f
        f = self._opener(path) if self._opener is not None else open(path, "rb")
        self._files[path] = f
        while len(self._files) > self.capacity:
            _, old = self._files.popitem(last=False)
            try:
                old.close()
            except Exception:  # noqa: BLE001
                pass
        return f

    def read(self, path: str, offset: int, size: int) -> bytes:
        f = self.get(path)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise SampleError("corrupt_image", key=path, detail=f"shard is truncated at offset {offset}")
        return data

    def close(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass
        self._files.clear()

    def __getstate__(self):
        return {"capacity": self.capacity, "_opener": self._opener}

    def __setstate__(self, state):
        self.__init__(state["capacity"], state["_opener"])

"""Low-level readers shared by the dataset sources.

* :func:`safe_load_pickle` -- a restricted unpickler for the pickles that released datasets
  ship (RefCOCO's ``refs(unc).p``, the per-sample ``<id>.pickle`` inside DAM tar shards).
  A pickle can name any importable callable and have the loader call it; this one only
  admits plain builtin containers and scalars, so a hostile file raises
  :class:`UnsafePickleError` before anything runs.
* COCO RLE helpers: :func:`parse_rle_counts` parses the compressed ``counts`` string (the
  5-bits-per-character, delta-coded format of ``pycocotools``) itself (NumPy, vectorised)
  so that :func:`check_rle` can *validate* every RLE (well-formed string, no run left open
  by a final continuation bit, runs non-negative and summing to ``h*w``, size equal to the
  image's) before it reaches pycocotools' C code, which does no bounds checking.
  :func:`decode_segmentation` (the only path from file data to ``pycocotools.mask.decode``)
  turns a COCO segmentation (compressed or uncompressed RLE dict, or a polygon list) into
  a bool mask; :func:`rle_area` counts foreground pixels without decoding.
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

from .robust import DataError, SampleError

__all__ = [
    "UnsafePickleError",
    "safe_load_pickle",
    "rle_counts",
    "parse_rle_counts",
    "check_rle",
    "validate_rle",
    "rle_area",
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
#
# pycocotools' C routines trust their input: ``rleFrString`` reads characters until it has
# seen one without the continuation bit, so a string whose last character still carries it
# is read past its end (an out-of-bounds read; in-process it can corrupt the heap), and
# ``rleDecode`` writes the runs into an h*w buffer without checking that they sum to h*w
# (too short: uninitialised pixels; too long: a heap overflow). Every RLE therefore goes
# through :func:`check_rle` first, which parses the counts itself and refuses anything
# pycocotools would not read exactly as we do.

#: Most characters one run may take. pycocotools' C parser shifts each 5-bit group as a
#: 32-bit ``int``, so only runs (deltas) of at most 6 groups, i.e. in [-2**29, 2**29), are
#: read without overflow; its encoder never writes more for masks below 2**29 pixels.
MAX_RUN_CHARS = 6
#: Largest mask (h*w) accepted: what PIL would still open as an image (twice
#: ``Image.MAX_IMAGE_PIXELS``, its decompression-bomb limit), and never above 2**29 - 1
#: (the counts pycocotools can represent exactly, see :data:`MAX_RUN_CHARS`).
MAX_RLE_PIXELS = min(2 * (Image.MAX_IMAGE_PIXELS or (1 << 28)), (1 << 29) - 1)


def _bad_rle(detail: str) -> SampleError:
    return SampleError("bad_rle", detail=detail)


def parse_rle_counts(counts: str | bytes) -> np.ndarray:
    """Parse a compressed COCO RLE ``counts`` string into run lengths (int64 array).

    Format (that of pycocotools): each run is a little-endian sequence of 5-bit groups,
    one character each, stored as ``chr(48 + group)`` with ``0x20`` set on every group but
    the run's last; bit ``0x10`` of the last group is the sign. From the fourth run on a
    run is stored as the difference to the run two places before it.

    Raises :class:`SampleError` ``bad_rle`` for a character outside ``'0'..'o'``, a string
    whose last character still carries the continuation bit (the run never ends), a run
    longer than :data:`MAX_RUN_CHARS` characters, or a negative run. Vectorised (NumPy):
    a few microseconds per mask, so whole SA-V annotation files can be checked at index time.
    """
    if isinstance(counts, str):
        try:
            data = counts.encode("ascii")
        except UnicodeEncodeError as e:
            raise _bad_rle(f"RLE counts string has a non-ASCII character at {e.start}") from None
    elif isinstance(counts, (bytes, bytearray, memoryview)):
        data = bytes(counts)
    else:
        raise _bad_rle(f"RLE counts must be a string or a list of ints, got {type(counts).__name__}")
    c = np.frombuffer(data, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    bad = np.flatnonzero((c < 0) | (c > 63))
    if bad.size:
        raise _bad_rle(f"RLE counts string has an invalid character {chr(data[bad[0]])!r} at {int(bad[0])}")
    more = (c & 0x20) != 0
    if more[-1]:
        raise _bad_rle("RLE counts string ends inside a run (its last character carries the continuation bit)")
    ends = np.flatnonzero(~more)  # last character of each run
    starts = np.concatenate([[0], ends[:-1] + 1])
    nchar = ends - starts + 1
    if int(nchar.max()) > MAX_RUN_CHARS:
        k = int(np.argmax(nchar > MAX_RUN_CHARS))
        raise _bad_rle(f"RLE run {k} is encoded with {int(nchar[k])} characters (at most {MAX_RUN_CHARS})")
    group = np.arange(c.size) - np.repeat(starts, nchar)  # index of each character inside its run
    x = np.add.reduceat((c & 0x1F) << (5 * group), starts)
    sign = (c[ends] & 0x10) != 0
    x = x - (sign.astype(np.int64) << (5 * nchar))  # sign-extend from the last group
    runs = x.copy()  # undo the delta coding: run[i] = x[i] + run[i-2] for i > 2
    if runs.size > 3:
        runs[3::2] = np.cumsum(x[1::2])[1:]  # odd runs: x[1] + x[3] + ...
    if runs.size > 4:
        runs[4::2] = np.cumsum(x[2::2])[1:]  # even runs from 2 on: x[2] + x[4] + ...
    if runs.size and int(runs.min()) < 0:
        raise _bad_rle(f"RLE has a negative run ({int(runs.min())}) at {int(np.argmin(runs))}")
    return runs


def rle_counts(counts: str | bytes) -> list[int]:
    """:func:`parse_rle_counts` as a list of Python ints."""
    return parse_rle_counts(counts).tolist()


def _rle_size(rle: Any) -> tuple[int, int]:
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise _bad_rle("an RLE must be a dict with 'size' [h, w] and 'counts'")
    size = rle["size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise _bad_rle(f"RLE 'size' must be [h, w], got {size!r}"[:200])
    hw = []
    for v in size:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not float(v).is_integer():
            raise _bad_rle(f"RLE 'size' must hold two integers, got {size!r}"[:200])
        hw.append(int(v))
    h, w = hw
    if h <= 0 or w <= 0:
        raise _bad_rle(f"RLE size {h}x{w} is empty")
    if h * w > MAX_RLE_PIXELS:
        raise _bad_rle(f"RLE size {h}x{w} is larger than any image we read ({MAX_RLE_PIXELS} pixels)")
    return h, w


def _uncompressed_runs(counts: list | tuple, n: int) -> np.ndarray:
    if len(counts) > n + 1:
        raise _bad_rle(f"RLE has {len(counts)} runs for {n} pixels")
    for r in counts:
        if isinstance(r, bool) or not isinstance(r, (int, float, np.integer, np.floating)) or not float(r).is_integer():
            raise _bad_rle(f"RLE counts list holds a non-integer {r!r}"[:200])
    runs = np.asarray([int(r) for r in counts], dtype=np.int64)
    if runs.size and int(runs.min()) < 0:
        raise _bad_rle(f"RLE has a negative run ({int(runs.min())})")
    return runs


def check_rle(rle: Any, height: int | None = None, width: int | None = None) -> tuple[dict, np.ndarray]:
    """Validate a COCO RLE dict; return ``(clean, runs)``.

    ``clean`` is the RLE as pycocotools may safely read it (``{"size": [h, w], "counts":
    bytes}``, uncompressed counts compressed by pycocotools only after the check) and
    ``runs`` the run lengths (int64). Checked: ``size`` is two positive integers (at most
    :data:`MAX_RLE_PIXELS` pixels) and, when ``height``/``width`` are given, equals them;
    ``counts`` is a well-formed compressed string (:func:`parse_rle_counts`) or a list of
    non-negative integers; the runs sum to exactly ``h*w``. Anything else raises
    :class:`SampleError` ``bad_rle`` (one line naming what is wrong).
    """
    h, w = _rle_size(rle)
    if height is not None and width is not None and (h, w) != (int(height), int(width)):
        raise _bad_rle(f"mask is {h}x{w} but the image is {int(height)}x{int(width)}")
    counts = rle["counts"]
    if isinstance(counts, (list, tuple)):
        runs = _uncompressed_runs(counts, h * w)
    else:
        runs = parse_rle_counts(counts)
    total = int(runs.sum()) if runs.size else 0
    if total != h * w:
        raise _bad_rle(f"RLE runs sum to {total}, expected h*w = {h}*{w} = {h * w}")
    if isinstance(counts, (list, tuple)):
        from pycocotools import mask as mask_util

        clean = mask_util.frPyObjects({"size": [h, w], "counts": runs.tolist()}, h, w)
    else:
        clean = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else bytes(counts)}
    return clean, runs


def validate_rle(rle: Any, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """Check a COCO RLE dict (see :func:`check_rle`); return its (h, w)."""
    clean, _ = check_rle(rle, height, width)
    return int(clean["size"][0]), int(clean["size"][1])


def rle_area(rle: Any, height: int | None = None, width: int | None = None) -> int:
    """Foreground pixels of a COCO RLE (validated; the odd runs summed, no decoding)."""
    _, runs = check_rle(rle, height, width)
    return int(runs[1::2].sum())


def _decode(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_util

    # pycocotools (<= 2.0.10) calls np.array(copy=False) on its Cython RLE object, which
    # NumPy 2 answers with a DeprecationWarning per mask: harmless, silenced here only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_util.decode(rle).astype(bool)


def decode_segmentation(seg: Any, height: int | None = None, width: int | None = None) -> np.ndarray:
    """COCO segmentation (RLE dict or polygon list) -> bool mask (H, W).

    The one place masks from files reach pycocotools: an RLE is validated by
    :func:`check_rle` first (its size must equal ``height``/``width`` when given), a polygon
    must be flat lists of >= 3 finite (x, y) points within a few image sizes of the image.
    ``height``/``width`` are required for polygons.
    """
    if isinstance(seg, dict):
        clean, _ = check_rle(seg, height, width)
        return _decode(clean)
    if isinstance(seg, (list, tuple)):
        if height is None or width is None:
            raise ValueError("polygon segmentations need the image height and width")
        if int(height) <= 0 or int(width) <= 0 or int(height) * int(width) > MAX_RLE_PIXELS:
            raise _bad_rle(f"polygon image size {height}x{width} is empty or too large")
        lim = 4.0 * max(int(height), int(width))  # pycocotools rasterises every edge: bound its length
        polys = []
        for poly in seg:
            # what pycocotools' frPyObjects decodes is kept, degenerate ones included (the reference
            # evaluations score them); what it refuses (e.g. 4 numbers, which it tries to read as a box) is bad_rle
            if not isinstance(poly, (list, tuple)) or len(poly) < 4:
                raise _bad_rle("polygon must be a flat list of (x, y) coordinates (>= 4 numbers)")
            try:
                p = [float(v) for v in poly]
            except (TypeError, ValueError) as e:
                raise _bad_rle(f"polygon has a non-numeric value: {e}") from e
            if not all(np.isfinite(p)):
                raise _bad_rle("polygon has a non-finite coordinate")
            if max(abs(v) for v in p) > lim:
                raise _bad_rle(f"polygon has a coordinate far outside the {height}x{width} image")
            polys.append(p)
        if not polys:
            raise SampleError("empty_mask", detail="segmentation has no polygons")
        from pycocotools import mask as mask_util

        try:
            rles = mask_util.frPyObjects(polys, int(height), int(width))
        except Exception as e:  # noqa: BLE001 - pycocotools raises a bare Exception for what it cannot read
            raise _bad_rle(f"pycocotools cannot decode the polygon: {e}") from e
        return _decode(mask_util.merge(rles))
    raise _bad_rle(f"unknown segmentation type {type(seg).__name__}")


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


def read_json_list(path: Path, holds: str) -> list:
    """A dataset's JSON file whose top level is a list (of ``holds``); one :class:`DataError` (the whole
    dataset is unusable) for a file that cannot be read or parsed, or whose top level is not a list."""
    try:
        data = read_json(path)
    except SampleError as e:
        raise DataError(f"cannot read {path}: {e.detail}") from e
    if not isinstance(data, list):
        raise DataError(f"{path} should hold a list of {holds}, found {type(data).__name__}")
    return data


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

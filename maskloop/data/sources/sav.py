"""SA-V (Segment Anything Video) readers: pairs of frames of one masklet.

Released layout (read as downloaded, e.g. ``sav_train/sav_000/``)::

    sav_<vid>.mp4            # 24 fps H.264 video
    sav_<vid>_manual.json    # manually annotated masklets
    sav_<vid>_auto.json      # automatic masklets (optional, ``use_auto=True``)

A json holds ``video_id``, ``video_frame_count``, ``video_height``, ``video_width``, ...
and the masklets: ``masklet`` is a list over *annotated* frames (annotation runs at
6 fps, i.e. every 4th video frame: annotated frame ``k`` is video frame ``4 * k``) of lists
over objects of COCO RLEs ``{"size": [h, w], "counts": str}``; ``masklet_id`` lists the
objects' ids (plus ``masklet_num``, ``masklet_first_appeared_frame``, ``masklet_type``,
... which are not needed here). An object that is not visible in a frame has an empty RLE.

:class:`SAVDataset` makes one sample per (masklet, annotated frame where it is visible).
Its partner frame is another visible annotated frame of the same masklet, ``frame_gap``
annotated frames later (``int`` or inclusive ``(min, max)`` range, searched forward first,
then backward; chosen deterministically from ``seed`` and the index). A masklet seen in a
single frame pairs the frame with itself. The sample has the ``1``/``2`` tensors of
:meth:`SampleTransform.pair`.

Video decoding uses **PyAV** (``av``): maintained Python bindings to FFmpeg whose wheels
bundle FFmpeg (no system install), which can seek to the key frame before a target and
decode only the frames needed, with frame timestamps to index frames exactly. torchvision
is not a dependency of this project, decord is unmaintained, and OpenCV's reader cannot
report exact frame positions after a seek.

:class:`SAVPairsDataset` reads our own pre-extracted pair format, written from the release
by :func:`write_sav_pairs` (``maskloop data write-sav-pairs``). One ``.npz`` per pair
(``np.savez``, read with ``allow_pickle=False``), format version 1:

=============  ============================  ============================================
array          dtype / shape                 meaning
=============  ============================  ============================================
``image1``     uint8 (n,)                    frame 1 as JPEG bytes (so draft mode applies)
``image2``     uint8 (m,)                    frame 2 as JPEG bytes
``mask1``      str, 0-d                      COCO compressed RLE counts of mask 1
``mask2``      str, 0-d                      COCO compressed RLE counts of mask 2
``size``       int64 (2,)                    (height, width) of frames and masks
``frames``     int64 (2,)                    video frame indices of the two frames
``video_id``   str, 0-d                      e.g. ``sav_000001``
``masklet_id`` int64, 0-d                    object id within the video's json
``source``     str, 0-d                      ``manual`` or ``auto``
``version``    int64, 0-d                    1
=============  ============================  ============================================

Files are named ``{video_id}/{video_id}_{source}_m{masklet_id}_f{frame1}_f{frame2}.npz``.
"""

from __future__ import annotations

import io
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from ...lru import SmallCache
from ..io import check_rle, decode_segmentation, open_image, read_json, rle_area
from ..robust import RobustDataset, SampleError, check_mask
from ..transforms import SampleTransform
from .common import check_image_mask, default_transform

__all__ = ["SAVDataset", "SAVPairsDataset", "write_sav_pairs", "read_video_frames", "iter_video_frames"]

ANNOT_STRIDE = 4  # 24 fps video, masklets annotated at 6 fps
_SEEK_GAP = 48  # frames: farther than this, seek instead of decoding forward
_NPZ_KEYS = ("image1", "image2", "mask1", "mask2", "size")


# --------------------------------------------------------------------------------------
# Video decoding
# --------------------------------------------------------------------------------------


def iter_video_frames(path: str | os.PathLike, indices: Iterable[int]) -> Iterator[tuple[int, Image.Image]]:
    """Yield ``(frame_index, RGB PIL image)`` for the requested frames, in ascending order.

    Seeks to the key frame before a target and decodes forward; frame indices come from
    presentation timestamps (``round((pts - start) * time_base * fps)``). Raises
    ``SampleError('missing_file' | 'bad_video')``.
    """
    import av

    want = sorted({int(i) for i in indices})
    if not want:
        return
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SampleError("missing_file", key=path, detail="video file not found")
    try:
        container = av.open(path)
    except Exception as e:  # noqa: BLE001 - every FFmpeg failure means a bad video
        raise SampleError("bad_video", key=path, detail=f"cannot open video: {e}") from e
    with container:
        try:
            stream = container.streams.video[0]
        except IndexError as e:
            raise SampleError("bad_video", key=path, detail="no video stream") from e
        stream.thread_type = "AUTO"
        rate = Fraction(stream.average_rate or stream.guessed_rate or 24)
        tb = Fraction(stream.time_base)
        start = stream.start_time or 0
        pos, last, decoder = 0, -(10**9), None
        try:
            while pos < len(want):
                target = want[pos]
                if decoder is None or target - last > _SEEK_GAP or target <= last:
                    container.seek(start + int(target / rate / tb), stream=stream, backward=True, any_frame=False)
                    decoder = container.decode(stream)
                    last = -(10**9)
                progressed = False
                for frame in decoder:
                    progressed = True
                    idx = last + 1 if frame.pts is None else int(round((frame.pts - start) * tb * rate))
                    last = idx
                    if idx < target:
                        continue
                    if idx > target:
                        raise SampleError("bad_video", key=path, detail=f"frame {target} not found (next is {idx})")
                    yield idx, frame.to_image()
                    pos += 1
                    if pos >= len(want) or want[pos] - idx > _SEEK_GAP:
                        break
                    target = want[pos]
                else:
                    if pos < len(want):
                        raise SampleError("bad_video", key=path,
                                          detail=f"video ends before frame {want[pos]} (last decoded {last})")
                if not progressed:
                    raise SampleError("bad_video", key=path, detail=f"no frames decoded around frame {target}")
        except SampleError:
            raise
        except Exception as e:  # noqa: BLE001
            raise SampleError("bad_video", key=path, detail=f"decoding failed: {e}") from e


def read_video_frames(path: str | os.PathLike, indices: Iterable[int]) -> dict[int, Image.Image]:
    """``{frame_index: RGB PIL image}`` for the requested frames (see :func:`iter_video_frames`)."""
    return dict(iter_video_frames(path, indices))


# --------------------------------------------------------------------------------------
# Release reader
# --------------------------------------------------------------------------------------


def _gap_range(frame_gap: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(frame_gap, int):
        return frame_gap, frame_gap
    lo, hi = (int(v) for v in frame_gap)
    if lo < 0 or hi < lo:
        raise ValueError(f"frame_gap range must be 0 <= min <= max, got {frame_gap}")
    return lo, hi


class SAVDataset(RobustDataset):
    """SA-V release (mp4 + ``*_manual.json`` / ``*_auto.json``) -> masklet frame pairs."""

    def __init__(
        self,
        root: str | os.PathLike | Sequence[str | os.PathLike],
        transform: SampleTransform | None = None,
        frame_gap: int | Sequence[int] = (1, 4),
        use_manual: bool = True,
        use_auto: bool = False,
        max_videos: int | None = None,
        max_frames_per_masklet: int | None = None,
        seed: int = 0,
        annot_stride: int = ANNOT_STRIDE,
        max_retries: int = 16,
        name: str = "sav",
    ):
        super().__init__(max_retries=max_retries)
        self.name = name
        self.transform = default_transform(transform)
        self.gap = _gap_range(frame_gap)
        self.seed = int(seed)
        self.annot_stride = int(annot_stride)
        self._json_cache = SmallCache(2)
        suffixes = (["_manual.json"] if use_manual else []) + (["_auto.json"] if use_auto else [])
        if not suffixes:
            raise ValueError("enable use_manual and/or use_auto")
        roots = [root] if isinstance(root, (str, os.PathLike)) else list(root)
        jsons: list[Path] = []
        for r in roots:
            r = Path(r)
            if not r.exists():
                raise FileNotFoundError(f"SA-V path {r} does not exist; point it at the folder with sav_*.mp4 and sav_*_manual.json")
            jsons += [p for s in suffixes for p in (r.rglob(f"sav_*{s}") if r.is_dir() else [r] if r.name.endswith(s) else [])]
        jsons = sorted(set(jsons))

        # per annotation file: (json path, mp4 path, masklet ids, [visible annotated frames per masklet])
        self.videos: list[tuple[str, str, list, list[np.ndarray]]] = []
        vid_of, obj_of, frame_of = [], [], []
        videos_seen: list[str] = []
        for jp in jsons:
            mp4 = re.sub(r"_(manual|auto)\.json$", ".mp4", str(jp))
            if max_videos is not None and mp4 not in videos_seen and len(videos_seen) >= max_videos:
                continue
            try:
                data = read_json(jp)
                masklet = data["masklet"]
                if not isinstance(masklet, list) or not masklet:
                    raise SampleError("bad_json", detail="'masklet' must be a non-empty list of frames")
                n_obj = len(masklet[0])
                ids = list(data.get("masklet_id", range(n_obj)))
                if any(len(f) != n_obj for f in masklet) or len(ids) != n_obj:
                    raise SampleError("bad_json", detail="frames have different numbers of masklets")
                areas = self._areas(str(jp), masklet, ids)
            except SampleError as e:
                self.record_bad(e.reason, str(jp), e.detail)
                continue
            except (KeyError, TypeError, ValueError, IndexError) as e:
                self.record_bad("bad_json", str(jp), f"not an SA-V masklet json: {e}")
                continue
            if mp4 not in videos_seen:
                videos_seen.append(mp4)
            frames_per_obj = []
            v = len(self.videos)
            for j in range(n_obj):
                frames = np.nonzero(areas[:, j] > 0)[0]
                frames_per_obj.append(frames)
                use = frames
                if max_frames_per_masklet is not None and len(frames) > max_frames_per_masklet:
                    use = frames[np.linspace(0, len(frames) - 1, max_frames_per_masklet).round().astype(int)]
                vid_of.append(np.full(len(use), v, np.int32))
                obj_of.append(np.full(len(use), j, np.int32))
                frame_of.append(use.astype(np.int32))
            self.videos.append((str(jp), mp4, ids, frames_per_obj))
        self._vid, self._obj, self._frame = (np.concatenate(xs) if xs else np.zeros(0, np.int32)
                                             for xs in (vid_of, obj_of, frame_of))
        self.check_not_empty()

    def _areas(self, json_path: str, masklet: list, ids: list) -> np.ndarray:
        """(frames, objects) foreground areas, every RLE validated (never handed to pycocotools
        unchecked); a bad RLE is counted ``bad_rle`` and its frame is not used (area 0)."""
        areas = np.zeros((len(masklet), len(ids)), np.int64)
        bad: list[tuple[str, str]] = []
        for k, frame in enumerate(masklet):
            for j, rle in enumerate(frame):
                try:
                    areas[k, j] = rle_area(rle)
                except SampleError as e:
                    bad.append((f"{json_path}#masklet{ids[j]}/frame{k}", e.detail))
        if bad and len(bad) == areas.size:  # nothing usable: one bad file, not one item per RLE
            raise SampleError("bad_rle", key=json_path, detail=f"every RLE is malformed, e.g. {bad[0][0]}: {bad[0][1]}")
        for key, detail in bad:
            self.record_bad("bad_rle", key, detail)
        return areas

    def __len__(self) -> int:
        return len(self._vid)

    def partner(self, index: int) -> int:
        """Annotated frame paired with sample ``index``'s frame (deterministic)."""
        v, j, k = int(self._vid[index]), int(self._obj[index]), int(self._frame[index])
        frames = self.videos[v][3][j]
        lo, hi = self.gap
        d = frames - k
        cands = frames[(d >= lo) & (d <= hi) & (d != 0)]
        if len(cands) == 0:
            cands = frames[(-d >= lo) & (-d <= hi) & (d != 0)]
        if len(cands) == 0:
            return k
        rng = np.random.default_rng([self.seed, index])
        return int(cands[rng.integers(len(cands))])

    def _mask_key(self, v: int, j: int, k: int) -> str:
        return f"{self.videos[v][0]}#masklet{self.videos[v][2][j]}/frame{k}"

    def item_keys(self, index: int):
        v, j, k = int(self._vid[index]), int(self._obj[index]), int(self._frame[index])
        return (self.videos[v][1], self.videos[v][0], self._mask_key(v, j, k))

    def raw_pair(self, index: int, with_frames: bool = True) -> dict:
        """Untransformed pair: frames (PIL), RLE dicts, frame indices and ids."""
        v, j, k1 = int(self._vid[index]), int(self._obj[index]), int(self._frame[index])
        k2 = self.partner(index)
        json_path, mp4, ids, _ = self.videos[v]
        data = self._json_cache.get(json_path, lambda: read_json(json_path))
        rles = []
        for k in (k1, k2):
            try:
                rles.append(data["masklet"][k][j])
            except (KeyError, IndexError, TypeError) as e:
                raise SampleError("bad_json", key=json_path, detail=f"no masklet {ids[j]} at frame {k}") from e
        f1, f2 = k1 * self.annot_stride, k2 * self.annot_stride
        frames = read_video_frames(mp4, [f1, f2]) if with_frames else {}
        return {"video": mp4, "json": json_path, "masklet_id": ids[j], "obj": j, "annot_frames": (k1, k2),
                "frames": (f1, f2), "rles": rles, "images": (frames.get(f1), frames.get(f2))}

    def load(self, index: int) -> dict:
        raw = self.raw_pair(index)
        v, j = int(self._vid[index]), int(self._obj[index])
        masks = []
        for k, rle, img in zip(raw["annot_frames"], raw["rles"], raw["images"]):
            key = self._mask_key(v, j, k)
            try:
                masks.append(decode_segmentation(rle, img.size[1], img.size[0]))  # RLE size must be the frame's
            except SampleError as e:
                e.key = key
                raise
        img1, img2 = raw["images"]
        for img, m, k in ((img1, masks[0], raw["annot_frames"][0]), (img2, masks[1], raw["annot_frames"][1])):
            check_image_mask(img.size, m, self._mask_key(v, j, k))
        if raw["frames"][0] == raw["frames"][1]:
            img2, masks[1] = img1, masks[0]
        sample = self.transform.pair(img1, masks[0], img2, masks[1])
        return check_mask(sample, self._mask_key(v, j, raw["annot_frames"][0]))


# --------------------------------------------------------------------------------------
# Pre-extracted npz pairs
# --------------------------------------------------------------------------------------


def _encode_jpeg(img: Image.Image, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _rle_string(rle: dict) -> str:
    """Compressed counts string of a (validated) RLE; an uncompressed one is compressed."""
    counts = check_rle(rle)[0]["counts"]
    return counts.decode("ascii") if isinstance(counts, bytes) else str(counts)


def write_sav_pairs(
    release_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    frame_gap: int | Sequence[int] = (1, 4),
    use_manual: bool = True,
    use_auto: bool = False,
    max_videos: int | None = None,
    max_frames_per_masklet: int | None = None,
    quality: int = 95,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Convert an SA-V release folder into the npz pair format of :class:`SAVPairsDataset`.

    Each video is decoded once (only the needed frames). Bad videos/annotations are
    skipped and counted. Returns ``{"written": n, "skipped": {"sav/reason": n}, "out_dir": ...}``.
    """
    ds = SAVDataset(release_root, frame_gap=frame_gap, use_manual=use_manual, use_auto=use_auto,
                    max_videos=max_videos, max_frames_per_masklet=max_frames_per_masklet, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_video: dict[int, list[int]] = {}
    for i in range(len(ds)):
        by_video.setdefault(int(ds._vid[i]), []).append(i)
    written = 0
    it = by_video.items()
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(by_video), desc="sav pairs", unit="video")
    for v, indices in it:
        json_path, mp4, _, _ = ds.videos[v]
        source = "auto" if json_path.endswith("_auto.json") else "manual"
        video_id = Path(mp4).stem
        try:
            raws = [ds.raw_pair(i, with_frames=False) for i in indices]
            need = {f for r in raws for f in r["frames"]}
            jpegs = {f: _encode_jpeg(img, quality) for f, img in iter_video_frames(mp4, need)}
        except SampleError as e:
            ds.record_bad(e.reason, e.key or mp4, e.detail)
            continue
        (out / video_id).mkdir(exist_ok=True)
        for r in raws:
            try:
                h, w = (int(x) for x in r["rles"][0]["size"])
                for rle in r["rles"]:
                    decode_segmentation(rle, h, w)  # validate before writing
            except (SampleError, KeyError, TypeError, ValueError) as e:
                ds.record_bad(getattr(e, "reason", "bad_rle"), f"{json_path}#masklet{r['masklet_id']}", str(e))
                continue
            f1, f2 = r["frames"]
            name = out / video_id / f"{video_id}_{source}_m{r['masklet_id']}_f{f1:05d}_f{f2:05d}.npz"
            np.savez(
                name, image1=jpegs[f1], image2=jpegs[f2],
                mask1=np.array(_rle_string(r["rles"][0])), mask2=np.array(_rle_string(r["rles"][1])),
                size=np.array([h, w], np.int64), frames=np.array([f1, f2], np.int64),
                video_id=np.array(video_id), masklet_id=np.array(int(r["masklet_id"]), np.int64),
                source=np.array(source), version=np.array(1, np.int64),
            )
            written += 1
    return {"written": written, "skipped": ds.skip_counts(), "out_dir": str(out)}


class SAVPairsDataset(RobustDataset):
    """Reads the npz pair format written by :func:`write_sav_pairs` (see module docstring)."""

    def __init__(
        self,
        root: str | os.PathLike | Sequence[str | os.PathLike],
        transform: SampleTransform | None = None,
        max_retries: int = 16,
        name: str = "sav",
    ):
        super().__init__(max_retries=max_retries)
        self.name = name
        self.transform = default_transform(transform)
        roots = [root] if isinstance(root, (str, os.PathLike)) else list(root)
        files: list[str] = []
        for r in roots:
            r = Path(r)
            if not r.exists():
                raise FileNotFoundError(f"SA-V pairs folder {r} does not exist; write it with `maskloop data write-sav-pairs`")
            files += [str(p) for p in (r.rglob("*.npz") if r.is_dir() else [r])]
        self.files = sorted(files)
        self.check_not_empty("no .npz pair files found")

    def __len__(self) -> int:
        return len(self.files)

    def item_keys(self, index: int):
        return (self.files[index],)

    def load(self, index: int) -> dict:
        path = self.files[index]
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in _NPZ_KEYS if k not in z.files]
                if missing:
                    raise SampleError("bad_npz", key=path, detail=f"missing arrays {missing}")
                arrays = {k: z[k] for k in _NPZ_KEYS}
        except SampleError:
            raise
        except FileNotFoundError as e:
            raise SampleError("missing_file", key=path, detail="npz file not found") from e
        except Exception as e:  # noqa: BLE001 - zip/format/pickle errors
            raise SampleError("bad_npz", key=path, detail=f"cannot read npz: {e}") from e
        try:
            h, w = (int(x) for x in arrays["size"])
            m1 = decode_segmentation({"size": [h, w], "counts": str(arrays["mask1"])})
            m2 = decode_segmentation({"size": [h, w], "counts": str(arrays["mask2"])})
        except SampleError as e:
            e.key = path
            raise
        except (TypeError, ValueError) as e:
            raise SampleError("bad_npz", key=path, detail=f"bad size/mask arrays: {e}") from e
        imgs = []
        for k in ("image1", "image2"):
            img, size = open_image(arrays[k].tobytes(), self.transform.draft_size, key=f"{path}:{k}")
            imgs.append((img, size))
        for (_, size), m in zip(imgs, (m1, m2)):
            check_image_mask(size, m, path)
        sample = self.transform.pair(imgs[0][0], m1, imgs[1][0], m2)
        return check_mask(sample, path)


"""SA-V masklets as clips (the SA-V release as :class:`~maskloop.data.sources.sav.SAVDataset` reads it):
item ``i`` is one masklet, ``clip_len`` consecutive annotated frames (SA-V annotates every 4th frame of its
24 fps videos) starting at a frame where the object is visible, with its per-frame masks (empty where the
object is absent).  SA-V masklets carry no text: ``Clip.text`` is ``""`` — a video recipe captions or
prompts them itself (the loops' mask -> caption -> mask).  Batched with
:class:`~maskloop.data.clips.ClipDataset` / :func:`~maskloop.data.clips.collate_clips`.

The index (annotation jsons, their RLEs) is :class:`SAVDataset`'s, with its skip-and-count: a bad json or
RLE is counted there at index time; a video or RLE that fails while a clip is read is counted here and
another clip is read.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ...lru import SmallCache
from ..io import decode_segmentation, read_json
from ..robust import RobustDataset, SampleError, merge_skip_counts
from .rvos import Clip
from .sav import ANNOT_STRIDE, SAVDataset, read_video_frames


class SAVClipDataset(RobustDataset):
    """SA-V masklet clips of ``clip_len`` annotated frames (fewer when the masklet's video is shorter)."""

    def __init__(self, root: str | os.PathLike | Sequence[str | os.PathLike], clip_len: int = 8,
                 use_manual: bool = True, use_auto: bool = False, max_videos: int | None = None, seed: int = 0,
                 annot_stride: int = ANNOT_STRIDE, max_retries: int = 16, name: str = "sav_clips"):
        super().__init__(max_retries=max_retries)
        if clip_len < 1:
            raise ValueError(f"clip_len must be >= 1, got {clip_len}")
        self.name = name
        self.clip_len = int(clip_len)
        self.seed = int(seed)
        self.annot_stride = int(annot_stride)
        self.index = SAVDataset(root, use_manual=use_manual, use_auto=use_auto, max_videos=max_videos,
                                annot_stride=annot_stride, name=name)
        self._json_cache = SmallCache(2)
        self.masklets = [(v, j) for v, (_, _, _, vis) in enumerate(self.index.videos)
                         for j, frames in enumerate(vis) if len(frames)]
        self.check_not_empty()

    def __len__(self) -> int:
        return len(self.masklets)

    def skip_counts(self) -> dict[str, int]:
        return merge_skip_counts(self.index.skip_counts(), super().skip_counts())

    def item_keys(self, index: int):
        v, _ = self.masklets[index]
        return self.index.videos[v][:2]  # the annotation json and the mp4

    def window(self, index: int, n_annot: int) -> list[int]:
        """Annotated-frame indices of clip ``index``: ``clip_len`` consecutive ones from a visible frame
        (deterministic in ``seed`` and ``index``), moved back to fit in the video."""
        v, j = self.masklets[index]
        visible = self.index.videos[v][3][j]
        start = int(visible[np.random.default_rng([self.seed, index]).integers(len(visible))])
        start = max(0, min(start, n_annot - self.clip_len))
        return list(range(start, min(start + self.clip_len, n_annot)))

    def load(self, index: int) -> dict:
        v, j = self.masklets[index]
        json_path, mp4, ids, _ = self.index.videos[v]
        masklet = self._json_cache.get(json_path, lambda: read_json(json_path))["masklet"]
        ks = self.window(index, len(masklet))
        frames = read_video_frames(mp4, [k * self.annot_stride for k in ks])
        imgs, masks = [], []
        for k in ks:
            img = frames[k * self.annot_stride]
            key = f"{json_path}#masklet{ids[j]}/frame{k}"
            try:
                m = decode_segmentation(masklet[k][j], img.size[1], img.size[0])  # RLE size must be the frame's
            except SampleError as e:
                e.key = key
                raise
            imgs.append(img)
            masks.append(m)
        key = f"{json_path}#masklet{ids[j]}"
        clip = Clip(imgs, np.stack(masks), [k * self.annot_stride for k in ks], "", key)
        return {"clip": clip, "text": "", "key": key}


__all__ = ["SAVClipDataset"]

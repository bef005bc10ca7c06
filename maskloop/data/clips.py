"""Referring video clips for training: a clip's frames and per-frame masks as model tensors, and the
collate that batches clips (a video referring recipe's data path: MeViS / ReVOS / Ref-DAVIS17 through
:mod:`maskloop.data.sources.rvos`, the shapes world's moving-object clips).

* :class:`ClipTransform`: a :class:`~maskloop.data.sources.rvos.Clip` -> per-frame tensors, each frame's
  four tensors made from its original pixels and its own mask (:class:`~maskloop.data.transforms.SampleTransform`);
* :class:`ClipDataset`: a clip source (any dataset whose items hold ``clip``) -> transformed samples; the
  source's skip-and-count (a bad frame, RLE or json is counted and another clip read) is kept, its
  ``skipped`` reports travel with the samples;
* :func:`collate_clips`: samples -> a batch with a frame axis, clips of different lengths padded at the
  end (``frame_mask`` False there).

Shapes of a sample (T frames): ``pixel_values`` (T, 3, S, S) float, ``g_pixel_values`` (T, 3, G, G) uint8,
``masks`` (T, G, G) float {0, 1}, ``prompt_masks`` (T, g, g) uint8, ``present`` (T,) bool (the object is
visible: MeViS / SA-V objects leave and re-enter), ``frame_indices`` (T,) long (positions in the video),
``num_frames`` T; ``expression``, ``key``, ``dataset``.  A batch of B clips: the same with a leading
B axis and T = the longest clip, ``frame_mask`` (B, T) bool, ``num_frames`` (B,) long.
"""

from __future__ import annotations

import numpy as np
import torch

from maskloop.data.mixture import collate
from maskloop.data.robust import SampleError
from maskloop.data.transforms import SampleTransform

CLIP_KEYS = ("pixel_values", "g_pixel_values", "masks", "prompt_masks", "present", "frame_indices")


class ClipTransform:
    """A :class:`~maskloop.data.sources.rvos.Clip` -> the per-frame tensors of a training sample."""

    def __init__(self, transform: SampleTransform | None = None):
        self.transform = transform or SampleTransform()

    def __call__(self, clip) -> dict:
        if clip.masks is None:
            raise ValueError(f"clip {clip.key} has no masks (a split released without ground truth): "
                             "train on a split with masks (MeViS train / valid_u, ReVOS train, DAVIS train)")
        T = len(clip.frames)
        if clip.masks.shape[0] != T:
            raise SampleError("bad_clip", key=clip.key, detail=f"{clip.masks.shape[0]} masks for {T} frames")
        per = []
        for t, (img, m) in enumerate(zip(clip.frames, clip.masks)):
            if tuple(m.shape) != (img.size[1], img.size[0]):
                raise SampleError("size_mismatch", key=f"{clip.key}#{clip.frame_indices[t]}",
                                  detail=f"mask {tuple(m.shape)} vs frame {img.size[1]}x{img.size[0]}")
            per.append(self.transform(img, m))
        out = {k: torch.stack([p[k] for p in per]) for k in ("pixel_values", "g_pixel_values", "masks", "prompt_masks")}
        out["present"] = torch.from_numpy(np.asarray(clip.masks).reshape(T, -1).any(1))
        out["frame_indices"] = torch.as_tensor(clip.frame_indices, dtype=torch.long)
        out["num_frames"] = T
        out["expression"] = clip.text
        out["key"] = clip.key
        return out


class ClipDataset(torch.utils.data.Dataset):
    """Transformed clips of ``source`` (items with ``clip``: the referring video readers, with ``clip_len``
    frames per clip, or :class:`~maskloop.data.sources.shapes.ShapesClipDataset`)."""

    def __init__(self, source, transform: SampleTransform | None = None):
        if getattr(source, "has_masks", True) is False:
            raise ValueError(f"{getattr(source, 'name', source)!r} has no ground-truth masks (a test split): "
                             "a clip dataset for training needs a split with masks")
        self.source = source
        self.clip_transform = ClipTransform(transform)
        self.name = getattr(source, "name", "clips")

    def __len__(self) -> int:
        return len(self.source)

    def skip_counts(self) -> dict[str, int]:
        return self.source.skip_counts() if hasattr(self.source, "skip_counts") else {}

    def __getitem__(self, index: int) -> dict:
        item = self.source[index]
        out = self.clip_transform(item["clip"])
        for k in ("dataset", "skipped", "skipped_keys"):
            if k in item:
                out[k] = item[k]
        out.setdefault("dataset", self.name)
        return out


def collate_clips(samples: list[dict]) -> dict:
    """Clip samples -> one batch: the per-frame tensors (B, T, ...) with T the longest clip (shorter clips
    zero padded at the end), ``frame_mask`` (B, T) bool (True on real frames), ``num_frames`` (B,) long;
    other keys as :func:`maskloop.data.mixture.collate` batches them (``skipped`` summed)."""
    if not samples:
        return {}
    T = max(int(s["num_frames"]) for s in samples)
    padded = []
    for s in samples:
        n = int(s["num_frames"])
        p = dict(s)
        for k in CLIP_KEYS:
            v = s[k]
            if v.shape[0] != n:
                raise ValueError(f"clip {s.get('key')}: {k} has {v.shape[0]} frames, num_frames is {n}")
            if n < T:
                v = torch.cat([v, v.new_zeros(T - n, *v.shape[1:])])
            p[k] = v
        p["frame_mask"] = torch.arange(T) < n
        p["num_frames"] = torch.tensor(n)
        padded.append(p)
    return collate(padded)


__all__ = ["CLIP_KEYS", "ClipDataset", "ClipTransform", "collate_clips"]

"""The video training data path: clips (frames + per-frame masks + expression) as tensors and batched,
on the shapes world and the released-layout fixtures (MeViS, ReVOS); bad files skipped and counted."""

import numpy as np
import pytest
import torch
from conftest import corrupt_video_source

from maskloop.data.clips import ClipDataset, collate_clips
from maskloop.data.fixtures import write_mevis
from maskloop.data.sources.mevis import MeViSDataset
from maskloop.data.sources.shapes import ShapesClipDataset
from maskloop.data.transforms import SampleTransform

TF = SampleTransform(image_size=32, sam_size=64, prompt_grid=8)


def _frame_by_frame(clip):
    """Reference: each frame and its own mask through the image transform, one at a time."""
    return [TF(img, m) for img, m in zip(clip.frames, clip.masks)]


def test_shapes_clips_batched_and_aligned():
    src = ShapesClipDataset(3, seed="val", image_size=64, num_frames=4)
    ds = ClipDataset(src, TF)
    batch = collate_clips([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 4, 3, 32, 32) and batch["g_pixel_values"].dtype == torch.uint8
    assert batch["masks"].shape == (3, 4, 64, 64) and batch["prompt_masks"].shape == (3, 4, 8, 8)
    assert batch["frame_mask"].all() and batch["num_frames"].tolist() == [4, 4, 4]
    for b in range(3):
        clip = src[b]["clip"]
        assert batch["expression"][b] == clip.text and batch["key"][b] == clip.key
        for t, ref in enumerate(_frame_by_frame(clip)):
            for k in ("pixel_values", "g_pixel_values", "masks", "prompt_masks"):
                assert torch.equal(batch[k][b, t], ref[k]), (b, t, k)
        assert not torch.equal(batch["masks"][b, 0], batch["masks"][b, -1])  # the object moves


def test_clips_of_different_lengths_padded():
    a = ClipDataset(ShapesClipDataset(1, seed="val", image_size=64, num_frames=5), TF)[0]
    b = ClipDataset(ShapesClipDataset(1, seed="val", image_size=64, num_frames=2), TF)[0]
    batch = collate_clips([a, b])
    assert batch["pixel_values"].shape[:2] == (2, 5) and batch["num_frames"].tolist() == [5, 2]
    assert batch["frame_mask"].tolist() == [[True] * 5, [True, True, False, False, False]]
    assert torch.equal(batch["masks"][1, :2], b["masks"]) and not batch["masks"][1, 2:].any()
    assert batch["frame_indices"][1, :2].tolist() == [0, 1]


def test_mevis_clips_masks_follow_their_frames(tmp_path):
    info = write_mevis(tmp_path, "valid_u")
    src = MeViSDataset(info["root"], clip_len=3, seed=1)
    ds = ClipDataset(src, TF)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_clips)
    seen = 0
    for batch in loader:
        for b, key in enumerate(batch["key"]):
            idx = batch["frame_indices"][b].tolist()
            assert idx == sorted(idx) and len(set(idx)) == 3
            gt = info["gt"][key][idx]  # the released masks of exactly those frames
            for t in range(3):
                assert torch.equal(batch["masks"][b, t], TF.mask(gt[t])["masks"])
            assert batch["present"][b].tolist() == gt.reshape(3, -1).any(1).tolist()
            seen += 1
    assert seen == len(info["expected_expressions"]) and ds.skip_counts() == {}
    with pytest.raises(ValueError, match="no ground-truth masks"):
        ClipDataset(MeViSDataset(write_mevis(tmp_path / "v", "valid", with_masks=False)["root"]), TF)


@pytest.mark.parametrize("kind", ["mevis", "revos"])
def test_bad_files_skipped_and_counted(tmp_path, kind):
    info, src = corrupt_video_source(tmp_path, kind)
    ds = ClipDataset(src, TF)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=len(ds), collate_fn=collate_clips))
    batch = batches[0]
    good = set(info["expected_expressions"])
    assert set(batch["key"]) == good  # every readable clip; a bad one is replaced by a readable one
    assert ds.skip_counts() == {f"{kind}/{r}": n for r, n in info["expected_skips"].items()}
    # the skips found while reading travel with the batch (index-time ones stay in skip_counts only)
    assert batch["skipped"] and batch["skipped"].items() <= ds.skip_counts().items()
    for b, key in enumerate(batch["key"]):
        gt = info["gt"][key]
        n = int(batch["num_frames"][b])
        assert n == gt.shape[0]
        for t in range(n):
            assert torch.equal(batch["masks"][b, t], TF.mask(gt[t])["masks"])
    assert np.isfinite(batch["pixel_values"].numpy()).all()


def test_sav_masklet_clips(tmp_path):
    """SA-V masklets as clips: consecutive annotated frames (every 4th video frame), each frame's mask the
    masklet's RLE of that frame, frames the mp4's own; a broken video skipped and counted."""
    from pycocotools import mask as mask_utils

    from maskloop.data import fixtures as F
    from maskloop.data.io import read_json
    from maskloop.data.sources.sav import read_video_frames
    from maskloop.data.sources.sav_clips import SAVClipDataset

    info = F.write_sav(tmp_path / "sav", num_videos=2, size=(32, 48), num_frames=16, auto=False)
    src = SAVClipDataset(info["root"], clip_len=3)
    assert len(src) == 4  # 2 videos x 2 masklets
    ds = ClipDataset(src, TF)
    batch = collate_clips([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (4, 3, 3, 32, 32) and batch["expression"] == [""] * 4
    for b, key in enumerate(batch["key"]):
        json_path, masklet = key.split("#masklet")
        masklets = read_json(json_path)["masklet"]
        idx = batch["frame_indices"][b].tolist()
        assert idx[1] - idx[0] == idx[2] - idx[1] == 4  # consecutive annotated frames
        frames = read_video_frames(json_path.replace("_manual.json", ".mp4"), idx)
        for t, f in enumerate(idx):
            rle = masklets[f // 4][int(masklet)]
            gt = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
            ref = TF(frames[f], gt)
            assert torch.equal(batch["masks"][b, t], ref["masks"]) and torch.equal(batch["pixel_values"][b, t],
                                                                                   ref["pixel_values"])
        assert batch["present"][b, 0]  # a clip starts where its object is visible
    assert src.skip_counts() == {}
    broken = tmp_path / "sav" / "sav_000001.mp4"
    broken.write_bytes(broken.read_bytes()[:200])
    src = SAVClipDataset(info["root"], clip_len=3)
    keys = [ClipDataset(src, TF)[i]["key"] for i in range(len(src))]
    assert all("sav_000002" in k for k in keys)  # the broken video's masklets replaced by readable ones
    assert src.skip_counts() == {"sav_clips/bad_video": 1}

"""Referring-video readers on fixtures in the released layouts (MeViS, ReVOS, Ref-DAVIS17): ground truth,
clips, bad files skipped and counted, the evaluation loop and the submission layout."""

import zipfile

import numpy as np
import pytest
from conftest import corrupt_video_source
from PIL import Image

from maskloop.data.fixtures import write_mevis, write_ref_davis, write_revos
from maskloop.data.robust import SampleError
from maskloop.data.sources.davis import RefDAVISDataset, parse_expression_line
from maskloop.data.sources.mevis import MeViSDataset
from maskloop.data.sources.revos import ReVOSDataset
from maskloop.data.sources.rvos import zip_submission
from maskloop.eval.video import evaluate_video_dataset


def read_all(ds):
    """Every readable expression's (frames, gt) through the evaluation path; bad ones counted."""
    out = {}
    for e in ds.iter_expressions():
        try:
            frames = [ds.frame(e, t) for t in range(len(e.frame_names))]
            gts = np.stack([ds.gt_mask(e, t, f.size) for t, f in enumerate(frames)]) if ds.has_masks else None
        except SampleError as err:
            ds.record_bad(err.reason, err.key, err.detail)
            continue
        out[e.key] = (frames, gts)
    return out


def oracle(ds, shift=0):
    """A segmenter returning the ground truth (rolled by ``shift`` pixels)."""
    by_text = {}
    for e in ds.expressions:
        by_text.setdefault(e.video, {})[e.text] = e

    def seg(frame_at, frames, T, texts):
        first = frame_at(0)
        vid = next(v for v, d in by_text.items() if all(t in d for t in texts) and
                   len(d[texts[0]].frame_names) == T and ds.frame(d[texts[0]], 0).tobytes() == first.tobytes())
        for t, img in enumerate(frames()):
            m = np.stack([ds.gt_mask(by_text[vid][x], t, img.size) for x in texts])
            yield t, np.roll(m, shift, axis=-1)

    return seg


def test_mevis_reader_gt_and_clips(tmp_path):
    info = write_mevis(tmp_path, "valid_u")
    ds = MeViSDataset(info["root"])
    assert sorted(e.key for e in ds.expressions) == info["expected_expressions"]
    got = read_all(ds)
    for key, (frames, gt) in got.items():
        np.testing.assert_array_equal(gt, info["gt"][key])
        assert len(frames) == gt.shape[0] and frames[0].size == (64, 48)
    assert not got[ds.expressions[1].key][1][0].any()  # object 1 is absent from frame 0 (null RLE)
    clip = MeViSDataset(info["root"], clip_len=3)[0]["clip"]
    assert len(clip.frames) == 3 and clip.masks.shape == (3, 48, 64) and clip.frame_indices == sorted(clip.frame_indices)
    np.testing.assert_array_equal(clip.masks, info["gt"][clip.key][clip.frame_indices])
    assert ds.skip_counts() == {}


def test_mevis_valid_without_masks(tmp_path):
    info = write_mevis(tmp_path, "valid", with_masks=False)
    ds = MeViSDataset(info["root"])
    assert not ds.has_masks and ds[0]["clip"].masks is None and ds.gt_mask(ds.expressions[0], 0, (64, 48)) is None


@pytest.mark.parametrize("kind", ["mevis", "revos"])
def test_bad_files_skipped_and_counted(tmp_path, kind):
    info, ds = corrupt_video_source(tmp_path, kind)
    got = read_all(ds)
    assert sorted(got) == sorted(info["expected_expressions"])
    assert ds.skip_counts() == {f"{kind}/{r}": n for r, n in info["expected_skips"].items()}
    for key, (_, gt) in got.items():
        np.testing.assert_array_equal(gt, info["gt"][key])


def test_revos_groups_and_splits(tmp_path):
    info = write_revos(tmp_path)
    ds = ReVOSDataset(info["root"], "valid")
    assert {e.key: e.group for e in ds.expressions} == info["groups"]
    assert "/" in ds.expressions[0].video  # ReVOS video names hold the source folder
    assert len(ReVOSDataset(info["root"], "train").expressions) == 3
    res = evaluate_video_dataset(ds, oracle(ds))
    assert set(res["groups"]) == {"referring", "reasoning", "overall"}
    assert res["groups"]["overall"]["J&F"] == pytest.approx(1.0) and res["groups"]["reasoning"]["n"] == 3


def test_ref_davis_reader(tmp_path):
    info = write_ref_davis(tmp_path)
    ds = RefDAVISDataset(info["root"], "val", text_dir=info["text_dir"])
    assert len(ds.expressions) == 3 * 2 * 4
    assert {e.video for e in ds.expressions} == set(info["videos"])  # 'clasic-car' mapped to 'classic-car'
    assert ds.groups() == ["annot1", "annot1_full_video", "annot2", "annot2_full_video"]
    assert any(e.text.endswith("é") for e in ds.expressions if e.group == "annot2")  # latin-1 decoded
    got = read_all(ds)
    for e in ds.expressions:
        np.testing.assert_array_equal(got[e.key][1], info["gt"][(e.video, e.group, e.targets[0])])
    assert RefDAVISDataset(info["root"], "train", text_dir=info["text_dir"]).expressions[0].video == "classic-car"
    assert parse_expression_line('dog-scale 2 "the dog on the left"') == ("dogs-scale", 2, "the dog on the left")
    assert parse_expression_line("no quotes 1") is None


def test_ref_davis_bad_files(tmp_path):
    info = write_ref_davis(tmp_path, corrupt=True)
    ds = RefDAVISDataset(info["root"], "val", text_dir=info["text_dir"])
    res = evaluate_video_dataset(ds, oracle(ds))
    assert ds.skip_counts() == {f"refdavis/{r}": n for r, n in info["expected_skips"].items()}
    assert res["expressions"] == 2 * 2 * 4  # the video with the truncated frame is left out
    assert res["groups"]["overall"]["J&F"] == pytest.approx(1.0)


def test_eval_loop_scores_and_submission(tmp_path):
    from maskloop.eval.video import db_iou, f_measure

    info = write_mevis(tmp_path / "data", "valid_u")
    ds = MeViSDataset(info["root"])
    res = evaluate_video_dataset(ds, oracle(ds, shift=2), submission_dir=tmp_path / "sub")
    for key, r in res["per_expression"].items():
        gt = info["gt"][key]
        pred = np.roll(gt, 2, axis=-1)
        assert r["J"] == pytest.approx(np.mean([db_iou(g, p) for g, p in zip(gt, pred)]))
        assert r["F"] == pytest.approx(np.mean([f_measure(g, p) for g, p in zip(gt, pred)]))
    e = ds.expressions[0]
    png = np.asarray(Image.open(tmp_path / "sub" / "Annotations" / e.video / e.exp_id / f"{e.frame_names[3]}.png"))
    np.testing.assert_array_equal(png > 0, np.roll(info["gt"][e.key][3], 2, axis=-1))
    assert set(np.unique(png)) <= {0, 255}
    z = zip_submission(tmp_path / "sub")
    names = zipfile.ZipFile(z).namelist()
    assert f"{e.video}/{e.exp_id}/{e.frame_names[0]}.png" in names and len(names) == 9 * 6


def test_shapes_clips_and_frame_strip(tmp_path):
    from maskloop.data.sources.shapes import ShapesClipDataset, resolve_expression
    from maskloop.eval.video import save_frame_strip

    ds = ShapesClipDataset(4, seed="val", image_size=64, num_frames=8)
    for i in range(len(ds)):
        item = ds[i]
        clip = item["clip"]
        assert len(clip.frames) == 8 and clip.masks.shape == (8, 64, 64)
        assert clip.masks.reshape(8, -1).any(1).all()  # the object is visible in every frame
        scenes, k = ds.frames(i)
        assert resolve_expression(scenes[0].objects, clip.text) == [k]
        assert not np.array_equal(clip.masks[0], clip.masks[-1])  # it moves
        for s in scenes:  # objects never overlap
            assert (s.masks.sum(0) <= 1).all()
    again = ds[1]["clip"]
    np.testing.assert_array_equal(again.masks, ds[1]["clip"].masks)  # deterministic
    p = save_frame_strip(clip.frames, clip.masks, tmp_path / "strip.png", gt=clip.masks, n=4, side=64)
    assert Image.open(p).size == (4 * 64 + 6, 2 * 64 + 2)

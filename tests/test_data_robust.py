"""Skip-and-count on damaged fixtures, all-bad sources, the restricted unpickler, data check."""

import io
import json
import os
import pickle
import tarfile

import pytest
import torch

from maskloop.data import (
    DAMDataset,
    DataError,
    OpenImagesDataset,
    RefCOCODataset,
    SA1BDataset,
    SampleTransform,
    SAVDataset,
    SAVPairsDataset,
    UnsafePickleError,
    collate,
    safe_load_pickle,
    write_sav_pairs,
)
from maskloop.data import fixtures as F
from maskloop.data.check import main_check

T = SampleTransform(56, 128, 4)


def _read_all(ds):
    """Every index through __getitem__ (skipping re-routes to the next valid one)."""
    out = [ds[i] for i in range(len(ds))]
    for s in out:
        assert s["masks"].sum() > 0 if "masks" in s else s["masks1"].sum() > 0
    return out


def _counts(ds):
    return {k.split("/", 1)[1]: v for k, v in ds.skip_counts().items()}


def _assert_matches(ds, manifest):
    want = F.count_reasons(manifest)
    assert _counts(ds) == want, (ds.bad_items(), manifest)
    assert len(set(want)) >= 4  # every kind of damage was exercised


def test_sa1b_folder_and_tar_corrupted(tmp_path):
    for as_tar in (False, True):
        root = tmp_path / f"sa1b{as_tar}"
        F.write_sa1b(root, num_images=16, as_tar=as_tar, images_per_tar=4, size=(32, 40))
        manifest = F.corrupt_fraction(root, "sa1b", frac=0.3, seed=1)
        assert len(manifest) == 5
        ds = SA1BDataset(root, transform=T)
        out = _read_all(ds)
        _assert_matches(ds, manifest)
        skipped = collate(out)["skipped"]
        assert sum(skipped.values()) == sum(ds.skip_counts().values()) - sum(
            1 for m in manifest if m["reason"] in ("bad_json", "missing_file"))  # index-time ones are not in samples


def test_refcoco_corrupted(tmp_path):
    F.write_refcoco(tmp_path, num_images=14, size=(32, 40))
    manifest = F.corrupt_fraction(tmp_path, "refcoco", frac=0.3, seed=2)
    ds = RefCOCODataset(tmp_path, split="all", transform=T)
    _read_all(ds)
    _assert_matches(ds, manifest)


@pytest.mark.parametrize("zipped", [False, True])
def test_openimages_corrupted(tmp_path, zipped):
    F.write_openimages(tmp_path, num_images=20, size=(32, 40), zipped=zipped)
    manifest = F.corrupt_fraction(tmp_path, "openimages", frac=0.3, seed=3)
    ds = OpenImagesDataset(tmp_path, transform=T)
    _read_all(ds)
    _assert_matches(ds, manifest)


def test_dam_corrupted(tmp_path):
    F.write_dam(tmp_path, splits=("LVIS",), num_images=14, size=(32, 40))
    manifest = F.corrupt_fraction(tmp_path, "dam", frac=0.3, seed=4)
    ds = DAMDataset(tmp_path, transform=T, cache_dir=tmp_path / "cache")
    _read_all(ds)
    _assert_matches(ds, manifest)


def test_sav_release_and_pairs_corrupted(tmp_path):
    F.write_sav(tmp_path / "sav", num_videos=13, size=(32, 48), auto=False)
    res = write_sav_pairs(tmp_path / "sav", tmp_path / "pairs", max_frames_per_masklet=1)
    manifest = F.corrupt_fraction(tmp_path / "sav", "sav", frac=0.3, seed=5)
    ds = SAVDataset(tmp_path / "sav", transform=T)
    _read_all(ds)
    _assert_matches(ds, manifest)

    assert res["written"] == 26
    pm = F.corrupt_fraction(tmp_path / "pairs", "sav_pairs", frac=0.3, seed=6)
    pairs = SAVPairsDataset(tmp_path / "pairs", transform=T)
    _read_all(pairs)
    _assert_matches(pairs, pm)


def test_all_bad_source_raises_clear_error(tmp_path):
    F.write_sa1b(tmp_path, num_images=4, size=(32, 40))
    F.corrupt_fraction(tmp_path, "sa1b", frac=1.0, modes=["corrupt_image"])
    ds = SA1BDataset(tmp_path, transform=T)
    with pytest.raises(DataError) as e:
        ds[0]
    msg = str(e.value)
    assert "'sa1b'" in msg and "corrupt_image" in msg and "unusable" in msg
    # everything bad at index time: the error comes from the constructor
    F.corrupt_fraction(tmp_path, "sa1b", frac=1.0, modes=["bad_json"])
    with pytest.raises(DataError, match="sa1b.*bad_json"):
        SA1BDataset(tmp_path, transform=T)


def test_bounded_retries(tmp_path):
    F.write_sa1b(tmp_path, num_images=12, size=(32, 40))
    F.corrupt_fraction(tmp_path, "sa1b", frac=0.5, modes=["corrupt_image"], seed=0)
    ds = SA1BDataset(tmp_path, transform=T, max_retries=1)
    with pytest.raises(DataError, match="max_retries=1"):
        for i in range(len(ds)):
            ds[i]
    ds = SA1BDataset(tmp_path, transform=T)
    _read_all(ds)  # a bad image is detected once; its other samples are skipped unread
    assert _counts(ds) == {"corrupt_image": 6}


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


def test_restricted_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps(_Evil())
    with pytest.raises(UnsafePickleError, match="posix.system|os.system|nt.system"):
        safe_load_pickle(payload)
    assert not (tmp_path / "PWNED_MARKER").exists()
    nested = pickle.dumps([{"sent": "ok", "x": _Evil()}], protocol=2)
    with pytest.raises(UnsafePickleError):
        safe_load_pickle(nested)
    assert not (tmp_path / "PWNED_MARKER").exists()
    with pytest.raises(UnsafePickleError):
        safe_load_pickle(pickle.dumps(io.BytesIO))  # any class reference outside builtins
    data = [{"a": (1, 2.5, None, True), "b": {"x", "y"}, "c": frozenset([1]), "d": [1 + 2j]}]
    for proto in range(0, pickle.HIGHEST_PROTOCOL + 1):
        assert safe_load_pickle(pickle.dumps(data, protocol=proto)) == data
    assert safe_load_pickle(pickle.dumps({"raw": b"\x00\xff"}, protocol=4)) == {"raw": b"\x00\xff"}
    (tmp_path / "ok.p").write_bytes(pickle.dumps(data, protocol=2))
    assert safe_load_pickle(tmp_path / "ok.p") == data


def test_malicious_refs_and_dam_pickles_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    F.write_refcoco(tmp_path / "ref", num_images=2)
    (tmp_path / "ref" / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([_Evil()]))
    with pytest.raises(DataError, match="refusing"):
        RefCOCODataset(tmp_path / "ref")
    F.write_dam(tmp_path / "dam", splits=("PACO",), num_images=3)
    shard = tmp_path / "dam" / "PACO" / "images" / "00000000.tar"
    with tarfile.open(shard) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            data = pickle.dumps(_Evil()) if name == "000000000001.pickle" else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    ds = DAMDataset(tmp_path / "dam", transform=T, mask_from="pickle", cache_dir=tmp_path / "c")
    _read_all(ds)
    assert _counts(ds) == {"bad_pickle": 1}
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_collate_merges_and_rejects_mixed(tmp_path):
    F.write_sa1b(tmp_path / "a", num_images=2, size=(32, 40))
    ds = SA1BDataset(tmp_path / "a", transform=T)
    b = collate([ds[0], ds[1]])
    assert b["pixel_values"].shape == (2, 3, 56, 56) and b["caption"] == [None, None]
    assert b["dataset"] == ["sa1b", "sa1b"] and b["skipped"] == {}
    pair = SA1BDataset(tmp_path / "a", transform=T, as_pair=True)[0]
    with pytest.raises(DataError, match="as_pair"):
        collate([ds[0], pair])
    b = collate([{"x": torch.zeros(2), "skipped": ["s/r"]}, {"x": torch.ones(2), "skipped": ["s/r", "s/q"]}])
    assert b["skipped"] == {"s/r": 2, "s/q": 1} and "same_image" not in b
    # pairs say whether every image 2 is its image 1 (the same tensor): single-image sources read as pairs do
    pairs = collate([pair, SA1BDataset(tmp_path / "a", transform=T, as_pair=True)[1]])
    assert pairs["same_image"] is True and torch.equal(pairs["pixel_values1"], pairs["pixel_values2"])
    other = dict(pair, pixel_values2=pair["pixel_values1"].clone())  # equal values, another tensor: not assumed
    assert collate([pair, other])["same_image"] is False


def test_data_check_cli(tmp_path, capsys):
    F.write_sa1b(tmp_path / "good", num_images=6, size=(32, 40))
    manifest = F.corrupt_fraction(tmp_path / "good", "sa1b", frac=0.5, seed=0)
    F.write_dam(tmp_path / "dam", splits=("SAV",), num_images=2)
    rc = main_check(["--source", "sa1b", str(tmp_path / "good"), "--source", "dam:splits=SAV", str(tmp_path / "dam"),
                     "--image-size", "28", "--sam-size", "32", "--prompt-grid", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "bad items by reason" in out and "== dam:splits=SAV" in out
    for m in manifest:
        assert f"[{m['reason']}]" in out
    F.write_sa1b(tmp_path / "bad", num_images=2, size=(32, 40))
    F.corrupt_fraction(tmp_path / "bad", "sa1b", frac=1.0, modes=["corrupt_image"])
    rc = main_check(["--source", "sa1b", str(tmp_path / "bad"), "--sam-size", "32", "--no-progress"])
    assert rc == 1 and "UNUSABLE" in capsys.readouterr().out
    rc = main_check(["--source", "refcoco", str(tmp_path / "nothing"), "--no-progress"])
    assert rc == 1


def test_cli_parser_wiring(tmp_path):
    import argparse

    from maskloop.data.check import add_data_parser

    p = argparse.ArgumentParser()
    add_data_parser(p.add_subparsers(dest="cmd"))
    F.write_sav(tmp_path / "sav", num_videos=1, size=(32, 48), auto=False)
    args = p.parse_args(["data", "write-sav-pairs", str(tmp_path / "sav"), str(tmp_path / "out"), "--max-gap", "2"])
    assert args.func(args) == 0
    assert len(list((tmp_path / "out").rglob("*.npz"))) == 7
    args = p.parse_args(["data", "check", "--source", "sav-pairs", str(tmp_path / "out"), "--sam-size", "32",
                         "--no-progress"])
    assert args.func(args) == 0
    json.dumps(vars(args), default=str)

"""Open Images masks found in every layout users have them in, without settings; misses say where we looked."""

import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from maskloop.data import OpenImagesDataset, SampleTransform
from maskloop.data import fixtures as F
from maskloop.data.robust import DataError

T = SampleTransform(56, 64, 4)
N = 6  # images: ids start with 0..5, so six zips


def _zipped(root: Path) -> Path:
    F.write_openimages(root, num_images=N, zipped=True)
    assert len(list(root.glob("train-masks-*.zip"))) == N
    return root


def _unzip_each(root: Path, into) -> None:
    for z in sorted(root.glob("train-masks-*.zip")):
        dst = into(z)
        dst.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(z) as f:
            f.extractall(dst)
        z.unlink()


def layout(kind: str, root: Path) -> Path:
    """The zipped fixture rearranged the way ``kind`` leaves it on disk; returns the root to pass."""
    _zipped(root)
    if kind == "zips":
        return root
    if kind == "zips_in_masks_folder":
        (root / "train-masks").mkdir()
        for z in root.glob("train-masks-*.zip"):
            z.rename(root / "train-masks" / z.name)
        return root
    if kind == "per_zip_folders":  # unzip train-masks-0.zip -d train-masks-0, ...
        _unzip_each(root, lambda z: root / z.stem)
        return root
    if kind == "per_zip_folders_in_masks_folder":
        _unzip_each(root, lambda z: root / "train-masks" / z.stem)
        return root
    if kind == "one_folder":
        _unzip_each(root, lambda z: root / "train-masks")
        return root
    if kind.startswith("fiftyone"):  # ~/fiftyone/open-images-v7/train/{data,labels,metadata}
        zoo = root / "fiftyone" / "open-images-v7"
        split = zoo / "train"
        (split / "labels").mkdir(parents=True)
        (split / "metadata").mkdir()
        shutil.move(str(root / "train"), str(split / "data"))
        shutil.move(str(root / "train-annotations-object-segmentation.csv"), str(split / "labels" / "segmentations.csv"))
        rows = (root / "oidv7-class-descriptions.csv").read_text().splitlines()[1:]  # boxable csv: no header
        (split / "metadata" / "classes.csv").write_text("\n".join(rows) + "\n")
        (root / "oidv7-class-descriptions.csv").unlink()
        _unzip_each(root, lambda z: split / "labels" / "masks" / z.stem[-1].upper())
        return zoo if kind == "fiftyone_zoo_dir" else split
    raise ValueError(kind)


KINDS = ["one_folder", "per_zip_folders", "per_zip_folders_in_masks_folder", "zips_in_masks_folder",
         "fiftyone_zoo_dir", "fiftyone_split_dir"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = _zipped(tmp_path_factory.mktemp("oi_zips"))
    ds = OpenImagesDataset(root, transform=T)
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("kind", KINDS)
def test_every_layout_gives_the_samples_of_the_zips(tmp_path, kind, reference):
    ds = OpenImagesDataset(layout(kind, tmp_path), transform=T)  # no settings
    assert len(ds) == len(reference)
    for i, ref in enumerate(reference):
        s = ds[i]
        assert not ds.bad_items(), ds.bad_items()
        assert s["caption"] == ref["caption"]
        for k in ("pixel_values", "g_pixel_values", "prompt_masks", "masks"):
            assert torch.equal(s[k], ref[k]), (kind, i, k)


def test_a_missing_mask_names_every_place_looked(tmp_path):
    root = layout("per_zip_folders", tmp_path)
    victim = sorted((root / "train-masks-0").glob("*.png"))[0]
    victim.unlink()
    ds = OpenImagesDataset(root, transform=T)
    for i in range(len(ds)):
        ds[i]
    bad = {k: (r, d) for k, r, d in ds.bad_items()}
    reason, detail = bad[victim.name]
    assert reason == "missing_file"
    for place in ("train-masks/", "train-masks/train-masks-0/", f"{root}/train-masks-0/", "train-masks-0.zip"):
        assert place in detail, (place, detail)


def test_no_masks_anywhere_is_one_error_listing_the_layouts(tmp_path):
    root = _zipped(tmp_path)
    for z in root.glob("train-masks-*.zip"):
        z.unlink()
    with pytest.raises(DataError) as e:
        OpenImagesDataset(root, transform=T)
    msg = str(e.value)
    for place in ("train-masks", "train-masks-0", "train-masks-0.zip", "masks_dir="):
        assert place in msg

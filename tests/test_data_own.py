"""Own data: the coco / folder / sa2va kinds on fixtures (with bad rows), import round trip, CLI, config."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from maskloop.data import SampleTransform
from maskloop.data.check import _scan
from maskloop.data.fixtures_own import write_own_coco, write_own_folder, write_own_sa2va
from maskloop.data.import_ import import_dataset
from maskloop.data.robust import SampleError
from maskloop.data.sources import OWN_KINDS, OwnCOCODataset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
T = SampleTransform(56, 64, 4)
WRITERS = {"coco": write_own_coco, "folder": write_own_folder, "sa2va": write_own_sa2va}
MODES = {"coco": ("masks", "refer", "caption"), "folder": ("masks", "refer", "caption"), "sa2va": ("masks", "refer")}


def _good_samples(ds):
    """Every readable sample, in index order (bad ones skipped, as data check does)."""
    out = []
    for i in range(len(ds)):
        if ds._known_bad(i):
            continue
        try:
            out.append(ds.load(i))
        except Exception as e:  # noqa: BLE001
            ds.record_bad(getattr(e, "reason", "error"), str(getattr(e, "key", None) or i), "")
            ds._bad_indices.add(i)
    return out


def _expected(man, mode):
    if mode == "masks":
        return [(img, None) for img, _, _ in man["good"]]
    if mode == "refer":
        return [(img, e) for img, exprs, _ in man["good"] for e in exprs]
    return [(img, cap) for img, _, cap in man["good"] if cap]


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_each_format_reads_its_good_rows_and_counts_the_bad(tmp_path, kind):
    man = WRITERS[kind](tmp_path / kind)
    for mode in MODES[kind]:
        ds = OWN_KINDS[kind](man["root"], mode=mode, transform=T)
        ok, usable = _scan(ds, kind, None, False)
        want = _expected(man, mode)
        assert usable and ok == len(want), (mode, ok, len(want))
        got = _good_samples(OWN_KINDS[kind](man["root"], mode=mode, transform=T))
        texts = [s.get("expression") if mode == "refer" else s["caption"] for s in got]
        assert texts == [t for _, t in want], mode
        for s in got:
            assert s["masks"].sum() > 0 and s["pixel_values"].shape == (3, 56, 56)
        if mode == "masks":  # every bad row of the fixture, each once, by reason
            assert dict(Counter(r for _, r, _ in ds.bad_items())) == man["expected_bad"]
            assert sum(ds.skip_counts().values()) == sum(man["expected_bad"].values())
    if kind == "sa2va":
        with pytest.raises(ValueError, match="no region captions"):
            OWN_KINDS[kind](man["root"], mode="caption")


def _reference_masks(kind, man):
    """The good regions' (H, W) masks decoded straight from the files, as each format defines them."""
    root = Path(man["root"])
    out = []
    if kind == "folder":
        for img in sorted({g[0] for g in man["good"]}):
            stem = Path(img).stem
            if (root / "masks" / f"{stem}.png").is_file():
                ids = np.asarray(Image.open(root / "masks" / f"{stem}.png"))
                out += [ids == v for v in np.unique(ids) if v]
            else:
                out += [np.asarray(Image.open(p)) > 0 for p in sorted((root / "masks" / stem).glob("*.png"))]
    elif kind == "sa2va":
        import json

        for item in json.loads((root / "annotations.json").read_text())[:4]:
            w, h = Image.open(root / "images" / item["image"]).size
            for segs in item["mask"]:  # Sa2VA: each segment through frPyObjects([seg]), summed
                m = np.zeros((h, w), np.uint8)
                for seg in segs:
                    m += mask_util.decode(mask_util.frPyObjects([seg], h, w)).squeeze()
                out.append(m > 0)
    else:
        import json

        data = json.loads((root / "annotations.json").read_text())
        hw = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
        for a in data["annotations"][: len(man["good"])]:
            h, w = hw[a["image_id"]]
            seg = a["segmentation"]
            rle = mask_util.merge(mask_util.frPyObjects(seg, h, w)) if isinstance(seg, list) else \
                {"size": seg["size"], "counts": seg["counts"].encode()}
            out.append(mask_util.decode(rle) > 0)
    return out


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_masks_equal_a_direct_decode_of_the_files(tmp_path, kind):
    man = WRITERS[kind](tmp_path / kind)
    ds = OWN_KINDS[kind](man["root"], mode="masks", transform=T)
    refs = _reference_masks(kind, man)
    assert len(refs) == len(man["good"])
    got = []
    for r in range(len(ds.regions)):
        try:
            got.append(ds.read_region(r)[2])
        except SampleError:
            continue
    assert len(got) == len(refs)
    for a, b in zip(got, refs):
        assert a.shape == b.shape and np.array_equal(a, b)


def _comparable(s):
    return {k: v for k, v in s.items() if k not in ("skipped", "dataset")}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_import_round_trip_gives_the_same_samples(tmp_path, kind):
    man = WRITERS[kind](tmp_path / "src")
    res = import_dataset(kind, man["root"], tmp_path / "out", progress=False)
    assert res["annotations"] == len(man["good"])
    assert dict(Counter(r for _, r, _ in res["bad"])) == man["expected_bad"]
    for mode in MODES[kind]:
        a = _good_samples(OWN_KINDS[kind](man["root"], mode=mode, transform=T))
        b = _good_samples(OwnCOCODataset(tmp_path / "out", mode=mode, transform=T))
        assert len(a) == len(b) == len(_expected(man, mode))
        for sa, sb in zip(a, b):
            sa, sb = _comparable(sa), _comparable(sb)
            assert sa.keys() == sb.keys()
            for k in sa:
                if isinstance(sa[k], torch.Tensor):
                    assert torch.equal(sa[k], sb[k]), (mode, k)
                else:
                    assert sa[k] == sb[k], (mode, k)
    # the output is clean: nothing is skipped when it is read again
    again = OwnCOCODataset(tmp_path / "out", transform=T)
    assert _scan(again, "coco", None, False)[0] == len(man["good"]) and not again.bad_items()


def test_cli_import_check_and_errors(tmp_path, capsys):
    from maskloop.cli import main

    man = write_own_folder(tmp_path / "src")
    assert main(["data", "import", "--from", "folder", man["root"], "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {len(man['good'])} regions" in out and "corrupt_mask=1" in out
    assert main(["data", "check", "--source", "coco:mode=refer", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "0 skipped" in capsys.readouterr().out
    assert main(["data", "check", "--source", "folder", man["root"], "--no-progress"]) == 0
    assert "empty_mask=1" in capsys.readouterr().out
    # a second import into the same folder is refused with one error line
    assert main(["data", "import", "--from", "folder", man["root"], "--out", str(tmp_path / "out")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["data", "import", "--from", "nope", man["root"], "--out", str(tmp_path / "o2")]) == 2


def test_own_data_config_names_readable_sources(tmp_path):
    """configs/own_data.yaml: a valid train config whose every source builds on an imported folder."""
    from maskloop.config import load_yaml
    from maskloop.train.engine import TrainConfig

    cfg_path = Path(__file__).resolve().parents[1] / "configs" / "own_data.yaml"
    raw = load_yaml(cfg_path)
    cfg = TrainConfig.from_mapping(raw)
    man = write_own_coco(tmp_path / "src")
    import_dataset("coco", man["root"], tmp_path / "mydata", progress=False)
    assert set(cfg.data) >= {"pairs", "refer"}
    for stream, specs in cfg.data.items():
        for spec in specs:
            spec = {k: v for k, v in spec.items() if k not in ("repeat", "weight")}
            kind = spec.pop("kind")
            spec["root"] = str(tmp_path / "mydata")
            ds = OWN_KINDS[kind](transform=T, **spec)
            assert len(ds) > 0, stream
            if stream == "pairs":
                assert "masks2" in ds[0]
            if stream == "refer":
                assert ds[0]["expression"]


def test_own_data_config_trains_loop1_with_referring_batches(tmp_path, monkeypatch):
    """A 2-step Loop-1 run (a referring batch, then a Loop-1 batch) of configs/own_data.yaml (tiny preset) on an imported folder.

    The engine's source table (train/engine.py build_source) learns the own kinds at merge
    (``kinds.update(OWN_KINDS)``); until then this test adds them the same way."""
    import maskloop.train.engine as E
    from maskloop.config import load_yaml
    from maskloop.data.transforms import SampleTransform

    orig = E.build_source

    def build_source(spec, model):
        if spec["kind"] not in OWN_KINDS:
            return orig(spec, model)
        c, spec = model.cfg, dict(spec)
        kind = spec.pop("kind")
        spec.pop("repeat", None), spec.pop("weight", None)
        tf = SampleTransform(c.vision.image_size, c.sam2.image_size, c.prompt_grid)
        return OWN_KINDS[kind](transform=tf, **spec)

    monkeypatch.setattr(E, "build_source", build_source)
    man = write_own_folder(tmp_path / "photos", num_images=6)
    import_dataset("folder", man["root"], tmp_path / "my_data", progress=False)
    raw = load_yaml(Path(__file__).resolve().parents[1] / "configs" / "own_data.yaml")
    for specs in raw["data"].values():
        for s in specs:
            s["root"] = str(tmp_path / "my_data")
    raw.update(model="tiny", run_dir=str(tmp_path / "run"), steps=2, batch_size=2, accumulation=1, caption_len=6,
               topk=8, num_workers=0, progress=False, ckpt_every=0, log_every=1, refer_ratio=0.5, lr=1e-3)
    torch.manual_seed(0)
    history = E.Trainer(E.TrainConfig.from_mapping(raw)).fit()
    assert len(history) == 2 and all(np.isfinite(r["loss"]) for r in history)

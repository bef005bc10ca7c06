"""Hostile or broken inputs at the data layer (issue #22, data side).

* RLE validation in front of pycocotools (item 9): the compressed-counts parser against
  pycocotools' own encoder and C decoder; truncated-continuation and short-run RLEs in
  fixtures skipped as ``bad_rle``. Everything that hands strings to pycocotools' C code
  runs in a subprocess, so a regression (an out-of-bounds read, a heap overflow) fails
  the test instead of killing the test runner.
* Skip counts with DataLoader workers (item 3): :class:`SkipCounter` exact with 0 and 2
  workers, across a save/restore, and across 2 gloo ranks.
* Worker errors (item 6): one-line :class:`DataError` through a 2-worker DataLoader.
* Caption mask of another size (item 7): same aspect ratio resized with a warning, another
  aspect ratio skipped as ``mask_size``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from maskloop.data import (
    DataError,
    MixtureDataset,
    MixtureSampler,
    OpenImagesDataset,
    SA1BDataset,
    SampleError,
    SampleTransform,
    collate,
)
from maskloop.data import fixtures as F
from maskloop.data.io import check_rle, parse_rle_counts
from maskloop.data.robust import RobustDataset, SkipCounter

REPO = Path(__file__).resolve().parents[1]
T = SampleTransform(28, 32, 4)


def _run_py(code: str, timeout: int = 120) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last. A crash (signal,
    heap corruption) shows up as a non-zero return code here, not as a dead test runner."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("MASKLOOP_DEBUG", None)
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=str(REPO))
    assert p.returncode == 0, f"subprocess died (rc {p.returncode}):\n{p.stderr[-3000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def _ref_runs(m: np.ndarray) -> list[int]:
    """Reference COCO runs of a mask: column-major, alternating 0/1 runs starting with 0."""
    flat = m.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] == 1 else runs


# ---------------------------------------------------------------------------------------
# item 9: RLE
# ---------------------------------------------------------------------------------------


def _random_masks(rng, n):
    for t in range(n):
        if t % 100 == 0:  # a few large masks: long runs (5-6 characters) and large deltas
            h, w = int(rng.integers(1500, 2500)), int(rng.integers(1500, 2500))
        else:
            h, w = (int(v) for v in rng.integers(1, 70, 2))
        kind = t % 5
        if kind == 0:
            m = rng.random((h, w)) < rng.choice([0.01, 0.5, 0.99])
        elif kind == 1:
            m = np.zeros((h, w), bool)
            m[int(rng.integers(h)):, int(rng.integers(w)):] = True
        elif kind == 2:
            m = np.full((h, w), bool(t % 2))
        elif kind == 3:
            m = np.zeros((h, w), bool)
            m.flat[int(rng.integers(h * w))] = True
        else:
            yy, xx = np.mgrid[:h, :w]
            m = (yy - h * rng.random()) ** 2 + (xx - w * rng.random()) ** 2 < (rng.random() * max(h, w)) ** 2
        yield m


def test_rle_parser_round_trip_against_pycocotools_encoder():
    """Encode random masks with pycocotools; our parser gives exactly the reference runs and
    our fixture encoder writes exactly pycocotools' string."""
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(0)
    n = 0
    for m in _random_masks(rng, 300):
        r = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        runs = parse_rle_counts(r["counts"])
        ref = _ref_runs(m)
        assert runs.tolist() == ref
        clean, runs2 = check_rle({"size": [int(v) for v in r["size"]], "counts": r["counts"].decode()},
                                 m.shape[0], m.shape[1])
        assert runs2.tolist() == ref and clean["counts"] == r["counts"]
        assert F.encode_counts(ref) == r["counts"].decode()
        n += 1
    assert n == 300


def test_rle_validator_refusals():
    good = F.encode_counts([3, 4, 5])  # 12 pixels
    assert check_rle({"size": [3, 4], "counts": good})[1].tolist() == [3, 4, 5]
    cases = {
        "ends inside a run": good + chr(48 + 0x20),  # continuation bit on the last character
        "sum to 11": F.encode_counts([3, 4, 4]),  # short
        "sum to 13": F.encode_counts([3, 4, 6]),  # long
        "invalid character": good[:-1] + "~",
        "non-ASCII": good + "é",
        "7 characters": good + "P" * 6 + "0",  # an over-long run (the C parser would overflow)
    }
    for why, counts in cases.items():
        with pytest.raises(SampleError, match=why) as e:
            check_rle({"size": [3, 4], "counts": counts})
        assert e.value.reason == "bad_rle"
    for why, rle in {
        "negative run": {"size": [3, 4], "counts": [3, -1, 10]},
        "non-integer": {"size": [3, 4], "counts": [3, 4.5, 4.5]},
        "must be \\[h, w\\]": {"size": [12], "counts": [12]},
        "empty": {"size": [0, 4], "counts": []},
        "larger than any image": {"size": [100000, 100000], "counts": [10**10]},
        "dict with 'size'": {"counts": good},
        "mask is 3x4 but the image is 4x3": {"size": [3, 4], "counts": good},
    }.items():
        with pytest.raises(SampleError, match=why):
            check_rle(rle, *((4, 3) if "image" in why else (None, None)))
    # an uncompressed list is checked the same way (sum) before pycocotools compresses it
    with pytest.raises(SampleError, match="sum to 11"):
        check_rle({"size": [3, 4], "counts": [3, 4, 4]})


def test_rle_parser_agrees_with_pycocotools_decoder_on_random_strings():
    """Random (also non-canonical) counts strings: whatever our validator accepts, pycocotools'
    C decoder reads as exactly our runs; what it refuses never reaches it. In a subprocess."""
    res = _run_py("""
        import json
        import numpy as np
        from maskloop.data.io import check_rle, decode_segmentation, parse_rle_counts
        from maskloop.data.robust import SampleError
        rng = np.random.default_rng(1)
        accepted = refused = 0
        for t in range(1500):
            if t % 2:   # canonical runs, then non-canonical padding (an extra group) on some runs
                runs = rng.integers(0, 40, int(rng.integers(1, 30))).tolist()
                runs[0] = max(runs[0], 0)
                chars = []
                for i, r in enumerate(runs):
                    x = r - (runs[i - 2] if i > 2 else 0)
                    groups = []
                    while True:
                        g = x & 0x1F; x >>= 5
                        last = (x == -1) if (g & 0x10) else (x == 0)
                        groups.append(g)
                        if last:
                            break
                    if rng.random() < 0.3 and len(groups) < 6:  # redundant sign-extension group
                        groups.append(0x1F if groups[-1] & 0x10 else 0)
                    chars += [chr(48 + (g | 0x20 if k < len(groups) - 1 else g)) for k, g in enumerate(groups)]
                s = "".join(chars)
            else:       # arbitrary strings over the alphabet
                s = "".join(chr(48 + int(c)) for c in rng.integers(0, 64, int(rng.integers(1, 25))))
            try:
                runs = parse_rle_counts(s)
                total = int(runs.sum())
                if total <= 0:
                    raise SampleError("bad_rle")
                h = next(d for d in (7, 5, 3, 2, 1) if total % d == 0)
                check_rle({"size": [h, total // h], "counts": s})
            except SampleError:
                refused += 1
                continue
            m = decode_segmentation({"size": [h, total // h], "counts": s})  # pycocotools' C decoder
            ref = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool).reshape(total // h, h).T
            assert np.array_equal(m, ref), s
            accepted += 1
        print(json.dumps({"accepted": accepted, "refused": refused}))
    """)
    assert res["accepted"] > 500 and res["refused"] > 250, res


def test_truncated_and_short_rles_in_fixtures_are_skipped_as_bad_rle(tmp_path):
    """SA-1B, DAM and SA-V fixtures with a truncated-continuation and a short-run RLE: every
    reader skips them as ``bad_rle`` (exact counts), and the process stays alive."""
    res = _run_py(f"""
        import json
        from pathlib import Path
        from maskloop.data import DAMDataset, SA1BDataset, SAVDataset, SampleTransform
        from maskloop.data import fixtures as F
        from maskloop.data.io import decode_segmentation
        from maskloop.data.robust import SampleError
        root = Path({str(tmp_path)!r})
        t = SampleTransform(28, 32, 4)
        modes = ["rle_truncated", "rle_short"]
        out = {{}}
        F.write_sa1b(root / "sa1b", num_images=6, size=(24, 32))
        man = F.corrupt_fraction(root / "sa1b", "sa1b", frac=0.34, modes=modes)
        ds = SA1BDataset(root / "sa1b", transform=t)
        n_ok = sum(1 for i in range(len(ds)) if ds[i] is not None)
        out["sa1b"] = [ds.skip_counts(), F.count_reasons(man), n_ok]
        F.write_dam(root / "dam", splits=("PACO",), num_images=6, size=(24, 32))
        man = F.corrupt_fraction(root / "dam", "dam", frac=0.34, modes=modes)
        ds = DAMDataset(root / "dam", transform=t, cache_dir=root / "c")
        for i in range(len(ds)):
            ds[i]
        out["dam"] = [ds.skip_counts(), F.count_reasons(man), 0]
        F.write_sav(root / "sav", num_videos=2, size=(24, 32), num_frames=8)
        man = F.corrupt_fraction(root / "sav", "sav", frac=1.0, modes=modes)
        ds = SAVDataset(root / "sav", transform=t)  # SA-V areas are computed at index time
        out["sav"] = [ds.skip_counts(), F.count_reasons(man), 0]
        errs = []
        for counts in ("0P", "3" + chr(48 + 0x20)):  # continuation bit on the last character
            try:
                decode_segmentation({{"size": [1, 3], "counts": counts}})
            except SampleError as e:
                errs.append(e.reason)
        out["direct"] = errs
        print(json.dumps(out))
    """)
    for name in ("sa1b", "dam", "sav"):
        got, want, _ = res[name]
        assert got == {f"{name}/bad_rle": 2} and want == {"bad_rle": 2}, (name, res[name])
    assert res["direct"] == ["bad_rle", "bad_rle"]


# ---------------------------------------------------------------------------------------
# item 3: skip counts with workers, across a resume, across ranks
# ---------------------------------------------------------------------------------------


def _planted_sa1b(root: Path):
    """SA-1B with 3 annotations per image and planted damage; a corrupt image is shared by
    3 samples, which land in different workers (each would report it)."""
    F.write_sa1b(root, num_images=10, size=(24, 32), anns_per_image=3)
    manifest = F.corrupt_fraction(root, "sa1b", frac=0.5, seed=3,
                                  modes=["corrupt_image", "rle_truncated", "bad_json", "rle_short", "missing_file"])
    want = {f"sa1b/{k}": v for k, v in F.count_reasons(manifest).items()}
    assert sum(want.values()) == 5 and len(want) == 4
    return want


def _loader(ds, workers: int, state: dict | None = None):
    mix = MixtureDataset({"sa1b": ds})
    sampler = MixtureSampler(mix, num_replicas=1, rank=0, seed=5)
    if state is not None:
        sampler.load_state_dict(state)
    return mix, sampler, DataLoader(mix, batch_size=2, sampler=sampler, collate_fn=collate, num_workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_counter_exact_with_workers_and_across_restore(tmp_path, workers):
    want = _planted_sa1b(tmp_path / "sa1b")
    # one whole epoch
    counter = SkipCounter()
    mix, _, dl = _loader(SA1BDataset(tmp_path / "sa1b", transform=T), workers)
    counter.update(mix)  # index-time skips (bad json, missing image) found in this process
    for batch in dl:
        counter.update(batch)
    counter.update(mix)  # at log time: a no-op with workers, everything with 0 workers
    assert counter.counts() == want
    # half an epoch, checkpoint (through JSON), a fresh process-like restart, the rest
    counter = SkipCounter()
    mix, sampler, dl = _loader(SA1BDataset(tmp_path / "sa1b", transform=T), workers)
    counter.update(mix)
    it, consumed = iter(dl), 0
    for _ in range(len(dl) // 2):
        batch = next(it)
        counter.update(batch)
        consumed += len(batch["dataset"])
    state = json.loads(json.dumps({"counter": counter.state_dict(), "sampler": sampler.state_dict(consumed=consumed)}))
    del it
    assert 0 < counter.total() < sum(want.values()) or counter.counts() == want
    restored = SkipCounter()
    restored.load_state_dict(state["counter"])
    assert restored.counts() == counter.counts()
    mix, _, dl = _loader(SA1BDataset(tmp_path / "sa1b", transform=T), workers, state["sampler"])
    restored.update(mix)  # index-time skips again: already counted, not added twice
    for batch in dl:
        restored.update(batch)
    restored.update(mix)
    assert restored.counts() == want
    assert restored.log_dict()["data_skipped"] == sum(want.values())


def test_skip_counter_unit():
    c = SkipCounter(max_keys=3)
    b1 = collate([{"x": torch.zeros(1), "skipped": ["sa1b/bad_rle", "sa1b/corrupt_image"],
                   "skipped_keys": ["a.json#1", "a.jpg"]}, {"x": torch.zeros(1)}])
    assert b1["skipped"] == {"sa1b/bad_rle": 1, "sa1b/corrupt_image": 1}
    assert c.update(b1) == 2 and c.update(b1) == 0  # the same items again (another worker): not recounted
    assert c.update({"x": torch.zeros(2), "caption": ["a", "b"]}) == 0  # a batch without skip fields
    assert c.update({"skipped": {"dam/empty_mask": 2}}) == 2  # counts without keys: added as they are
    c.add("dam/bad_rle", "r1")
    c.add("dam/bad_rle", "r2")  # beyond max_keys: counted, no longer de-duplicated
    assert c.counts() == {"dam/bad_rle": 2, "dam/empty_mask": 2, "sa1b/bad_rle": 1, "sa1b/corrupt_image": 1}
    assert c.add("sa1b/corrupt_image", "a.jpg") is False  # a kept key still de-duplicates
    d = SkipCounter()
    d.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert d.counts() == c.counts() and d.total() == c.total() == 6
    assert c.reduce() == c.counts()  # no process group: the local counts
    with pytest.raises(ValueError, match="version"):
        d.load_state_dict({"version": 9})


def _gloo_worker(rank: int, world: int, port: int, out: str):
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        c = SkipCounter()
        c.add("sa1b/corrupt_image", "shared.jpg")  # met on both ranks: counted once
        c.add("sa1b/bad_rle", f"only-rank{rank}.json#1")
        c.add("dam/empty_mask")  # key-less counts are summed
        first = c.reduce()
        c.add("sa1b/bad_rle", "later.json#2")  # only the new item travels on the next call
        second = c.reduce()
        Path(out, f"{rank}.json").write_text(json.dumps({"first": first, "second": second, "state": c.state_dict()}))
    finally:
        tdist.destroy_process_group()


def test_skip_counter_reduce_across_two_gloo_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gloo_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="fork")
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    first = {"dam/empty_mask": 2, "sa1b/bad_rle": 2, "sa1b/corrupt_image": 1}
    assert res[0]["first"] == res[1]["first"] == first
    assert res[0]["second"] == res[1]["second"] == {**first, "sa1b/bad_rle": 3}
    assert res[0]["state"] == res[1]["state"]  # any rank's state is the checkpoint


# ---------------------------------------------------------------------------------------
# item 6: errors inside workers
# ---------------------------------------------------------------------------------------


class _AllBad(RobustDataset):
    name = "planted"

    def __init__(self):
        super().__init__(max_retries=3)

    def __len__(self):
        return 8

    def load(self, i):
        raise SampleError("corrupt_image", key=f"img{i}.jpg", detail="truncated")


class _Buggy(Dataset):
    name = "buggy"

    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise KeyError(f"no field 'caption' in record {i}")


def test_worker_errors_surface_as_one_line_data_error():
    with pytest.raises(DataError) as direct:
        _AllBad()[0]
    for workers in (0, 2):
        with pytest.raises(DataError) as e:
            list(DataLoader(_AllBad(), batch_size=2, num_workers=workers, collate_fn=collate))
        msg = str(e.value)
        assert "\n" not in msg and "Traceback" not in msg and "worker process" not in msg
        assert msg == str(direct.value) and msg.startswith("data source 'planted' is unusable")
    assert "Traceback" in e.value.worker_traceback  # kept for MASKLOOP_DEBUG-style inspection
    # any other exception in a worker (here a KeyError from a plain dataset through the mixture)
    mix = MixtureDataset({"buggy": _Buggy()})
    with pytest.raises(DataError) as e:
        list(DataLoader(mix, batch_size=2, num_workers=2, collate_fn=collate, sampler=MixtureSampler(mix, 1, 0)))
    msg = str(e.value)
    assert msg.startswith("mixture: KeyError: ") and "no field 'caption' in record" in msg and "\n" not in msg
    # collate's own error (pair and single samples mixed) in a worker: one line too
    one = {"masks": torch.zeros(2), "dataset": "a"}
    two = {"masks1": torch.zeros(2), "dataset": "b"}
    with pytest.raises(DataError, match="as_pair") as e:
        list(DataLoader([one, two], batch_size=2, num_workers=2, collate_fn=collate))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------
# item 7: a caption mask of another size
# ---------------------------------------------------------------------------------------


def _resize_mask_png(root: Path, name: str, size: tuple[int, int]) -> None:
    p = next(root.rglob(name))
    m = Image.open(p)
    m.load()
    m.resize(size, Image.Resampling.NEAREST).save(p)


def test_caption_mask_size_mismatch(tmp_path, caplog):
    root = tmp_path / "oi"
    F.write_openimages(root, num_images=3, masks_per_image=1, size=(40, 60), zipped=False)
    ds = OpenImagesDataset(root, transform=T)
    names = [it[0] for it in ds.items]
    ref = ds[1]["masks"].clone()
    _resize_mask_png(root, names[0], (30, 20))  # 60x40 image (w x h), 30x20 mask: same aspect ratio
    _resize_mask_png(root, names[1], (120, 80))  # twice the size: same aspect ratio
    _resize_mask_png(root, names[2], (40, 40))  # square mask on a 3:2 image: refused
    ds = OpenImagesDataset(root, transform=T)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maskloop.data"):
        a, b = ds[0], ds[1]
    assert a["caption"] and torch.equal(b["masks"], ref)  # a nearest 2x upscale resizes back exactly
    warned = [r for r in caplog.records if "same aspect ratio" in r.getMessage()]
    assert len(warned) == 1 and ds.resized_masks == 2  # one warning, every resize counted
    c = ds[2]  # skipped: the next valid sample comes back instead
    assert c["dataset"] == "openimages"
    assert ds.skip_counts() == {"openimages/mask_size": 1}
    (key, reason, detail), = ds.bad_items()
    assert key == names[2] and "aspect ratio" in detail


def test_pycocotools_is_reached_only_through_the_validator():
    """Static guard: outside ``maskloop/data/io.py`` nothing in the package hands data to
    pycocotools' parsing/decoding routines; the other modules only *encode* masks they made
    themselves (fixtures, the shapes world, PSALM's AP of predicted masks)."""
    import ast

    import maskloop

    pkg = Path(maskloop.__file__).parent
    parsing = {"decode", "frPyObjects", "merge", "area", "toBbox", "iou", "_frString", "frString"}
    own_masks_only = {"data/fixtures.py": {"encode"}, "data/sources/shapes.py": {"encode"},
                      "eval/psalm_metrics.py": {"encode", "area", "toBbox"},
                      "data/import_.py": {"encode"},  # `data import` writes the masks it decoded (through io)
                      "data/video_fixtures.py": {"encode"}}
    found: dict[str, set] = {}
    for f in pkg.rglob("*.py"):
        rel = f.relative_to(pkg).as_posix()
        tree = ast.parse(f.read_text())
        aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   and (n.module or "").startswith("pycocotools") for a in n.names}
        if not aliases or rel == "data/io.py":
            continue
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name) and n.value.id in aliases}
        found[rel] = used
        assert not (used & parsing) - own_masks_only.get(rel, set()), (rel, used)
    assert set(found) == set(own_masks_only)  # a new user of pycocotools must be reviewed here

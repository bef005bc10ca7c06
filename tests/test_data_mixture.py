"""MixtureDataset / MixtureSampler / LengthGroupedSampler: proportions, DDP shards, resume."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from maskloop.data import LengthGroupedSampler, MixtureDataset, MixtureSampler, collate


class Toy(Dataset):
    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": torch.tensor([i]), "caption": "w" * (1 + (i * 7) % 13), "skipped": []}

    def text_length(self, i):
        return 1 + (i * 7) % 13

    def skip_counts(self):
        return {f"{self.name}/bad_json": 1}


def _mix(**kw):
    return MixtureDataset({"a": Toy("a", 30), "b": Toy("b", 10), "c": Toy("c", 5)}, **kw)


def _sources(mix, indices):
    return Counter(mix.names[mix.locate(int(i))[0]] for i in indices)


def test_repeats_give_per_epoch_quotas():
    mix = _mix(repeats={"b": 4, "c": 0.4})
    assert mix.epoch_length == 30 + 40 + 2
    idx = mix.epoch_indices(epoch=0, seed=0)
    assert _sources(mix, idx) == {"a": 30, "b": 40, "c": 2}
    local_b = Counter(mix.locate(int(i))[1] for i in idx if mix.locate(int(i))[0] == 1)
    assert set(local_b.values()) == {4}  # every item of b exactly 4 times
    assert len(set(int(i) for i in idx if mix.locate(int(i))[0] == 0)) == 30  # a: each once


def test_weights_give_exact_proportions():
    mix = _mix(weights={"a": 1, "b": 2, "c": 1}, num_samples=1000)
    idx = mix.epoch_indices(epoch=3, seed=1)
    assert _sources(mix, idx) == {"a": 250, "b": 500, "c": 250}
    sampler = MixtureSampler(mix, num_replicas=1, rank=0, seed=1)
    sampler.set_epoch(3)
    assert list(sampler) == idx.tolist()
    with pytest.raises(ValueError, match="unknown"):
        _mix(weights={"zzz": 1})


def test_ddp_shards_are_disjoint_and_cover_the_epoch():
    mix = _mix(repeats={"b": 2})  # 30 + 20 + 5 = 55, not a multiple of 4
    shards = [list(MixtureSampler(mix, num_replicas=4, rank=r, seed=7)) for r in range(4)]
    assert all(len(s) == 14 for s in shards)
    full = mix.epoch_indices(0, 7)
    positions = [list(range(r, 56, 4)) for r in range(4)]
    padded = np.concatenate([full, full[:1]])
    for r in range(4):
        assert shards[r] == padded[positions[r]].tolist()
    assert Counter(sum(shards, [])) == Counter(padded.tolist())  # disjoint positions, union = epoch (+1 pad)
    dropped = [list(MixtureSampler(mix, num_replicas=4, rank=r, seed=7, drop_last=True)) for r in range(4)]
    assert all(len(s) == 13 for s in dropped)
    flat = sum(dropped, [])
    assert len(flat) == 52 and Counter(flat) == Counter(full[:52].tolist())


def test_reshuffle_per_epoch_and_deterministic():
    mix = _mix()
    s1 = MixtureSampler(mix, num_replicas=2, rank=1, seed=3)
    s2 = MixtureSampler(mix, num_replicas=2, rank=1, seed=3)
    e0 = list(s1)
    assert e0 == list(s2)
    s1.set_epoch(1)
    e1 = list(s1)
    assert e1 != e0
    assert list(MixtureSampler(mix, num_replicas=2, rank=1, seed=4)) != e0
    ordered = list(MixtureSampler(mix, num_replicas=1, rank=0, shuffle=False))
    assert ordered == list(range(45))


def test_resume_mid_epoch_gives_identical_order():
    mix = _mix(repeats={"c": 3})
    ref = MixtureSampler(mix, num_replicas=2, rank=0, seed=11)
    ref.set_epoch(2)
    full = list(ref)
    run = MixtureSampler(mix, num_replicas=2, rank=0, seed=11)
    run.set_epoch(2)
    it = iter(run)
    first = [next(it) for _ in range(9)]
    state = run.state_dict()
    assert state == {"epoch": 2, "position": 9, "seed": 11, "num_replicas": 2}
    resumed = MixtureSampler(mix, num_replicas=2, rank=0, seed=11)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert first + rest == full
    # the epoch after a resumed one starts from the beginning
    resumed.set_epoch(3)
    ref.set_epoch(3)
    assert list(resumed) == list(ref)
    # a DataLoader prefetches ahead: the trainer passes what it consumed
    assert run.state_dict(consumed=4)["position"] == 4


def test_length_grouped_sampler():
    mix = _mix()
    lengths = mix.lengths()
    assert lengths[0] == 1 and lengths[1] == 8
    s = LengthGroupedSampler(mix, batch_size=4, mega_batch_mult=2, num_replicas=1, rank=0, seed=0)
    order = list(s)
    assert sorted(order) == list(range(45))
    for start in range(0, 45, 8):  # each megabatch is sorted longest-first
        chunk = lengths[order[start: start + 8]]
        assert (np.diff(chunk) <= 0).all()
    # batches have closer lengths than a plain shuffle
    def spread(o):
        return np.mean([np.ptp(lengths[o[i: i + 4]]) for i in range(0, 44, 4)])
    assert spread(order) < spread(list(MixtureSampler(mix, num_replicas=1, rank=0, seed=0)))
    shards = [list(LengthGroupedSampler(mix, batch_size=2, num_replicas=3, rank=r, seed=0)) for r in range(3)]
    assert Counter(sum(shards, [])) == Counter(range(45))


def test_dataloader_end_to_end():
    mix = _mix(repeats={"c": 2})
    sampler = MixtureSampler(mix, num_replicas=1, rank=0, seed=0)
    dl = DataLoader(mix, batch_size=5, sampler=sampler, collate_fn=collate)
    batches = list(dl)
    assert sum(len(b["dataset"]) for b in batches) == 50
    assert batches[0]["x"].shape == (5, 1) and isinstance(batches[0]["caption"][0], str)
    assert mix.skip_counts() == {"a/bad_json": 1, "b/bad_json": 1, "c/bad_json": 1}


def test_real_sources_through_workers(tmp_path):
    """Fork-safe file handles: a DAM (tar LRU) + SA-1B mixture through 2 DataLoader workers."""
    from maskloop.data import DAMDataset, SA1BDataset, SampleTransform
    from maskloop.data import fixtures as F

    t = SampleTransform(28, 32, 4)
    F.write_dam(tmp_path / "dam", splits=("PACO",), num_images=4, size=(24, 32))
    F.write_sa1b(tmp_path / "sa1b", num_images=3, size=(24, 32))
    F.corrupt_fraction(tmp_path / "sa1b", "sa1b", frac=0.34, modes=["corrupt_image"])
    dam = DAMDataset(tmp_path / "dam", transform=t, cache_dir=tmp_path / "c")
    dam[0]  # opens a shard in the parent before forking
    mix = MixtureDataset({"dam": dam, "sa1b": SA1BDataset(tmp_path / "sa1b", transform=t)}, repeats={"sa1b": 2})
    dl = DataLoader(mix, batch_size=3, sampler=MixtureSampler(mix, num_replicas=1, rank=0), collate_fn=collate,
                    num_workers=2)
    batches = list(dl)
    assert sum(b["g_pixel_values"].shape[0] for b in batches) == mix.epoch_length == 6 + 2 * 6
    skipped = Counter()
    for b in batches:
        skipped.update(b["skipped"])
    assert set(skipped) == {"sa1b/corrupt_image"}  # reported from the workers through the batches
    assert set(b for batch in batches for b in batch["dataset"]) == {"dam", "sa1b"}

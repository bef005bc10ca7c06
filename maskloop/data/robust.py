"""Skip-and-count handling of bad samples.

Every source is a :class:`RobustDataset`: the subclass builds an index of items and
implements :meth:`RobustDataset.load`; ``__getitem__`` wraps it so that a bad sample

* is skipped with a logged warning (once per bad file),
* is counted per ``(source, reason)`` (see :data:`REASONS`),
* and the next valid index is returned instead (``i+1``, ``i+2``, ... wrapping around).

Retries are bounded and iterative (never recursive): samples whose files are already
known bad are passed over without being read, at most ``max_retries`` samples are
actually *read* per call, and at most ``len(dataset)`` indices are visited. When the
budget is exhausted, or the whole source turns out to be bad, a :class:`DataError`
names the source and its most frequent reasons.

Counting is by *bad item*, not by access: each bad file (or bad annotation inside a file,
keyed ``path#annotation``) is counted once however many samples refer to it, so counts do
not depend on access order. Index-time problems (an unparseable json found while building
the index, a missing file) are counted the same way.

Counts are per process. :meth:`RobustDataset.skip_counts` returns ``{"source/reason": n}``
(flat, so dicts from several datasets merge by summing, see :func:`merge_skip_counts`).
DataLoader workers are separate processes, so each sample also carries what was first
discovered while producing it: ``skipped`` (the ``"source/reason"`` strings) and
``skipped_keys`` (the bad items' keys, in the same order). :func:`maskloop.data.mixture.collate`
turns them into ``batch["skipped"]`` (``{"source/reason": n}`` for this batch) and
``batch["skipped_keys"]`` (``{"source\tkey": "source/reason"}``). The training run keeps one
:class:`SkipCounter`: ``update(batch)`` for every batch it trains on, ``update(dataset)`` for
the index-time skips found in the main process; it counts every distinct bad item once
(two workers, or two ranks, meeting the same bad file count it once), checkpoints with
``state_dict()`` / ``load_state_dict()`` and merges ranks with ``reduce(group)``.

Errors inside DataLoader workers: torch re-raises a worker's exception in the main process
with the worker's whole traceback in its message. A :class:`DataError` raised that way is
cut back to the worker's own one-line message (``worker_traceback`` keeps the rest;
``MASKLOOP_DEBUG=1`` keeps the full text), and any other exception escaping a dataset or
``collate`` inside a worker is turned into a :class:`DataError` naming its type and message.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections import Counter
from typing import Any, Iterable, Mapping

import torch
from torch.utils.data import Dataset

from maskloop import errors

logger = logging.getLogger("maskloop.data")

#: Reasons a sample is skipped.
REASONS = {
    "missing_file": "a file the sample needs does not exist",
    "corrupt_image": "an image (or shard member) cannot be decoded, e.g. a truncated JPEG",
    "corrupt_mask": "a mask PNG cannot be decoded",
    "bad_json": "a JSON annotation file cannot be parsed or lacks required keys",
    "bad_npz": "an .npz pair file cannot be read or lacks required arrays",
    "bad_pickle": "a pickle is unreadable or references non-data types (refused)",
    "bad_csv": "a CSV row is malformed",
    "bad_rle": "an RLE / polygon is malformed or does not match the image size",
    "mask_size": "a mask image's size differs from its image's and so does its aspect ratio",
    "empty_mask": "the mask has no foreground pixels (or none left after resizing)",
    "bad_video": "a video cannot be opened or the needed frame cannot be decoded",
}


_WORKER_HEADER = re.compile(r"^Caught (\w+) in DataLoader worker process \d+\.\n")


def _debug() -> bool:
    return bool(os.environ.get("MASKLOOP_DEBUG"))


class DataError(errors.DataError):
    """A data source is unusable (all bad, or not in the expected layout).

    Re-raised by torch from a DataLoader worker, its message would hold the worker's whole
    traceback: the constructor keeps only the worker's own message (one line) and stores
    the traceback in ``worker_traceback`` (unless ``MASKLOOP_DEBUG`` is set).
    """

    def __init__(self, *args: Any):
        self.worker_traceback: str | None = None
        if len(args) == 1 and isinstance(args[0], str) and not _debug():
            msg = _worker_message(args[0])
            if msg is not None:
                self.worker_traceback = args[0]
                args = (msg,)
        super().__init__(*args)


def _worker_message(text: str) -> str | None:
    """The original message of an exception torch re-raised from a DataLoader worker."""
    m = _WORKER_HEADER.match(text)
    if m is None:
        return None
    # torch's text ends with traceback.format_exception's last line: "<module>.<Type>: <message>"
    name = m.group(1)
    hits = [h for h in re.finditer(rf"^(?:[\w.]+\.)?{re.escape(name)}: ", text, flags=re.M)]
    if not hits:
        return None
    msg = text[hits[-1].end():].strip()
    return " ".join(line.strip() for line in msg.splitlines() if line.strip()) or None


def in_worker() -> bool:
    """True inside a DataLoader worker process."""
    return torch.utils.data.get_worker_info() is not None


def worker_errors(where: str | None = None):
    """Decorator: inside a DataLoader worker, an exception other than :class:`DataError`
    leaving the function becomes a :class:`DataError` ``"<where>: <Type>: <message>"``
    (one line; ``MASKLOOP_DEBUG=1`` leaves it untouched, traceback and all)."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (DataError, KeyboardInterrupt, SystemExit, GeneratorExit):
                raise
            except Exception as e:  # noqa: BLE001 - reported as one line, see above
                if not in_worker() or _debug():
                    raise
                label = where or (getattr(args[0], "name", None) if args else None)
                text = " ".join(str(e).split()) or "(no message)"
                raise DataError(f"{label or fn.__qualname__}: {type(e).__name__}: {text}") from None

        return inner

    return wrap


class SampleError(Exception):
    """One sample cannot be produced. ``reason`` is a key of :data:`REASONS`;
    ``key`` identifies the bad item (a path, or ``path#annotation``)."""

    def __init__(self, reason: str, key: str | None = None, detail: str = ""):
        super().__init__(f"{reason}: {key or '?'}: {detail}")
        self.reason = reason
        self.key = key
        self.detail = detail


def classify(exc: BaseException) -> str:
    """Reason string for an exception raised while loading a sample."""
    if isinstance(exc, SampleError):
        return exc.reason
    if isinstance(exc, FileNotFoundError):
        return "missing_file"
    return f"error:{type(exc).__name__}"


def merge_skip_counts(*dicts: dict[str, int]) -> dict[str, int]:
    """Sum ``{"source/reason": n}`` dicts (from datasets, workers, or batches)."""
    total: Counter = Counter()
    for d in dicts:
        total.update(d or {})
    return dict(total)


class RobustDataset(Dataset):
    """Base of every source: bounded skip-and-count around :meth:`load`.

    Subclasses set ``self.name`` and ``self.transform``, call ``super().__init__()``,
    build their index, and implement ``__len__``, :meth:`load` (returns the sample dict,
    raises :class:`SampleError` or anything else on a bad sample) and optionally
    :meth:`item_keys` (cheap: the keys of the files sample ``i`` depends on, so that
    samples of a known-bad file are skipped without being read).
    """

    name: str = "dataset"

    def __init__(self, *, max_retries: int = 16, as_pair: bool = False):
        self.max_retries = int(max_retries)
        self.as_pair = bool(as_pair)
        self._bad: dict[str, tuple[str, str]] = {}  # key -> (reason, detail)
        self._bad_indices: set[int] = set()
        self._new_skips: list[tuple[str, str]] = []  # ("source/reason", key) not yet attached to a sample

    # ---- to implement -----------------------------------------------------------------
    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, index: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def item_keys(self, index: int) -> Iterable[str]:
        return ()

    def text_length(self, index: int) -> int:
        """Length (characters) of the caption/expression of ``index``, for length grouping."""
        return 0

    # ---- bookkeeping ------------------------------------------------------------------
    def record_bad(self, reason: str, key: str, detail: str = "") -> bool:
        """Count a bad item once; return True if it was new."""
        if key in self._bad:
            return False
        self._bad[key] = (reason, detail)
        self._new_skips.append((f"{self.name}/{reason}", key))
        logger.warning("skipping bad %s item (%s): %s %s", self.name, reason, key, detail)
        return True

    def skip_counts(self) -> dict[str, int]:
        """``{"source/reason": number of distinct bad items}`` seen by this process."""
        return dict(Counter(f"{self.name}/{reason}" for reason, _ in self._bad.values()))

    def bad_items(self) -> list[tuple[str, str, str]]:
        """``[(key, reason, detail)]`` of every bad item seen so far."""
        return [(k, r, d) for k, (r, d) in self._bad.items()]

    def _top_reasons(self, k: int = 3) -> str:
        counts = Counter(reason for reason, _ in self._bad.values()).most_common(k)
        if not counts:
            return "no reason recorded"
        return ", ".join(f"{r} x{n}" for r, n in counts)

    def _raise_unusable(self, why: str) -> None:
        examples = "; ".join(f"{k} ({r})" for k, (r, _) in list(self._bad.items())[:3])
        raise DataError(
            f"data source '{self.name}' is unusable: {why}. Top reasons: {self._top_reasons()}."
            + (f" Examples: {examples}." if examples else "")
            + f" Run `maskloop data check --source {self.name} PATH` to list every bad file."
        )

    def check_not_empty(self, what: str = "no valid samples were found while indexing") -> None:
        """End of indexing: raise if nothing is usable. Index-time skips stay in
        :meth:`skip_counts` but are not attached to samples (every DataLoader worker gets a
        copy of the dataset, so they would be reported once per worker)."""
        self._new_skips = []
        if len(self) == 0:
            self._raise_unusable(what)

    # ---- the wrapper ------------------------------------------------------------------
    def _known_bad(self, index: int) -> bool:
        if index in self._bad_indices:
            return True
        return any(k in self._bad for k in self.item_keys(index))

    @worker_errors()
    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if n == 0:
            self._raise_unusable("it has no samples")
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} samples")
        reads, i = 0, index
        for _ in range(n):
            if not self._known_bad(i):
                reads += 1
                try:
                    sample = self.load(i)
                except Exception as e:  # noqa: BLE001 - every failure is counted, never fatal
                    if isinstance(e, (KeyboardInterrupt, MemoryError)):
                        raise
                    key = getattr(e, "key", None) or f"{self.name}[{i}]"
                    self.record_bad(classify(e), str(key), getattr(e, "detail", "") or str(e))
                    self._bad_indices.add(i)
                else:
                    return self._finish(sample)
                if reads >= self.max_retries:
                    self._raise_unusable(
                        f"{reads} consecutive samples starting at index {index} could not be read "
                        f"(max_retries={self.max_retries}; raise it if the damage is only local)"
                    )
            i = (i + 1) % n
        self._raise_unusable(f"all {n} samples are bad")
        raise AssertionError("unreachable")

    def _finish(self, sample: dict) -> dict:
        sample.setdefault("dataset", self.name)
        sample.setdefault("caption", None)
        if self.as_pair and "pixel_values" in sample:
            for k in ("pixel_values", "g_pixel_values", "prompt_masks", "masks") + (("num_tiles",) if "num_tiles" in sample else ()):
                v = sample.pop(k)
                sample[k + "1"] = v
                sample[k + "2"] = v
        sample["skipped"] = [sr for sr, _ in self._new_skips]
        sample["skipped_keys"] = [k for _, k in self._new_skips]
        self._new_skips = []
        return sample


def check_mask(sample: dict, key: str) -> dict:
    """Raise ``empty_mask`` if any ``masks*`` tensor of a transformed sample is all zero."""
    for k, v in sample.items():
        if k.startswith("masks") and isinstance(v, torch.Tensor) and not bool(v.any()):
            raise SampleError("empty_mask", key=key, detail="no foreground left after resizing")
    return sample



# --------------------------------------------------------------------------------------
# The run's skip counter (main process; sums workers, checkpoints, reduces over ranks)
# --------------------------------------------------------------------------------------


class SkipCounter:
    """Distinct bad items a run met, ``{"source/reason": n}``, exact with any number of
    DataLoader workers, across resumes and across ranks.

    Usage (main process of every rank)::

        counter = SkipCounter()
        counter.update(dataset)        # index-time skips found while building the dataset
        for batch in loader:
            counter.update(batch)      # the skips the workers met producing this batch
            ...
        counts = counter.reduce(group) # log steps / before a checkpoint: every rank calls it
        ckpt["data_skips"] = counter.state_dict()   # identical on every rank after reduce()
        counter.load_state_dict(ckpt["data_skips"]) # on resume (any world size)

    An item is identified by its source and key (a file path, or ``path#annotation``), so
    an item reported by two workers, two epochs, a resumed run re-reading it, or two ranks
    is counted once. ``update`` also accepts a dataset (a :class:`RobustDataset`, or any
    object with ``sources`` holding them, e.g. :class:`~maskloop.data.mixture.MixtureDataset`):
    its main-process ``bad_items()``, which with ``num_workers=0`` are every skip (call it
    at log time as well, it is cheap: bad items only). Batches from a collate that carry
    only ``skipped`` counts (no ``skipped_keys``) are added as counts, without de-duplication.

    Keys are kept for at most ``max_keys`` items (default one million, a few hundred MB at
    worst); beyond that new items are counted without de-duplication (``overflow``).
    """

    def __init__(self, max_keys: int = 1_000_000):
        self.max_keys = int(max_keys)
        self._items: dict[str, str] = {}  # "source\tkey" -> "source/reason"
        self._extra: Counter = Counter()  # counted without keys (overflow, key-less batches)
        self._unsynced: dict[str, str] = {}  # items added since the last reduce()
        self._unsynced_extra: Counter = Counter()

    # ---- adding -----------------------------------------------------------------------
    def add(self, source_reason: str, key: str | None = None) -> bool:
        """Count one bad item; False when it was counted already."""
        if key is None:
            self._extra[source_reason] += 1
            self._unsynced_extra[source_reason] += 1
            return True
        ident = f"{source_reason.split('/', 1)[0]}\t{key}"
        if ident in self._items:
            return False
        if len(self._items) >= self.max_keys:
            self._extra[source_reason] += 1
            self._unsynced_extra[source_reason] += 1
            return True
        self._items[ident] = source_reason
        self._unsynced[ident] = source_reason
        return True

    def update(self, what: Any) -> int:
        """Add a collated batch (its ``skipped_keys``, else its ``skipped`` counts; a batch
        with neither adds nothing) or a dataset's bad items. Returns the number of new items."""
        if isinstance(what, Mapping):
            if "skipped_keys" in what:
                return self.add_items(what["skipped_keys"] or {})
            n = 0
            for sr, c in (what.get("skipped") or {}).items():
                for _ in range(int(c)):
                    n += self.add(sr)
            return n
        sources = getattr(what, "sources", None)
        if sources is not None:
            return sum(self.update(s) for s in sources)
        bad_items = getattr(what, "bad_items", None)
        if bad_items is None:
            return 0
        name = getattr(what, "name", "dataset")
        return sum(self.add(f"{name}/{reason}", key) for key, reason, _ in bad_items())

    def add_items(self, idents: Mapping[str, str]) -> int:
        """Add ``{"source\tkey": "source/reason"}`` (a batch's ``skipped_keys``)."""
        n = 0
        for ident, sr in idents.items():
            source, _, key = str(ident).partition("\t")
            n += self.add(str(sr), key if key else source)
        return n

    # ---- reading ----------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """``{"source/reason": distinct bad items}`` known to this process."""
        c = Counter(self._items.values())
        c.update(self._extra)
        return dict(sorted(c.items()))

    def total(self) -> int:
        return len(self._items) + sum(self._extra.values())

    def log_dict(self, prefix: str = "data_skipped") -> dict[str, int]:
        """Flat scalars for a metrics log: ``{prefix: total, prefix/source/reason: n}``."""
        out = {prefix: self.total()}
        out.update({f"{prefix}/{k}": v for k, v in self.counts().items()})
        return out

    # ---- checkpointing ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-able: ``{"version": 1, "items": {"source/reason": [keys]}, "extra": {...}}``."""
        items: dict[str, list[str]] = {}
        for ident, sr in self._items.items():
            items.setdefault(sr, []).append(ident.split("\t", 1)[1])
        return {"version": 1, "items": {k: sorted(v) for k, v in sorted(items.items())},
                "extra": dict(sorted(self._extra.items()))}

    def load_state_dict(self, state: Mapping) -> None:
        """Replace the counts with a checkpoint's (items met later are added on top)."""
        if int(state.get("version", 1)) != 1:
            raise ValueError(f"unknown SkipCounter state version {state.get('version')!r}")
        self._items, self._extra = {}, Counter()
        for sr, keys in state.get("items", {}).items():
            source = sr.split("/", 1)[0]
            for k in keys:
                self._items[f"{source}\t{k}"] = sr
        self._extra.update({k: int(v) for k, v in state.get("extra", {}).items()})
        self._unsynced, self._unsynced_extra = {}, Counter()

    # ---- distributed ------------------------------------------------------------------
    def reduce(self, group=None) -> dict[str, int]:
        """Merge every rank's items (a collective: call it on every rank of ``group``) and
        return the global ``counts()``; afterwards every rank holds the same state.

        Only the items added since the previous call travel (``all_gather_object``), and
        items are merged by key, so a bad file met on two ranks counts once. Without an
        initialised process group this is ``counts()``.
        """
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size(group) > 1:
            mine = (self._unsynced, dict(self._unsynced_extra))
            gathered: list = [None] * tdist.get_world_size(group)
            tdist.all_gather_object(gathered, mine, group=group)
            rank = tdist.get_rank(group)
            for r, (items, extra) in enumerate(gathered):
                if r == rank:
                    continue
                for ident, sr in items.items():
                    if ident not in self._items:
                        if len(self._items) < self.max_keys:
                            self._items[ident] = sr
                        else:
                            self._extra[sr] += 1
                self._extra.update(extra)
        self._unsynced, self._unsynced_extra = {}, Counter()
        return self.counts()

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
(flat, so dicts from several datasets or workers merge by summing, see
:func:`merge_skip_counts`). Because DataLoader workers are separate processes, each sample
also carries ``skipped``: the ``"source/reason"`` strings of bad items first discovered
while producing it; :func:`maskloop.data.mixture.collate` sums them into a dict per batch,
which is what the trainer should accumulate and log, adding once the index-time counts of
``dataset.skip_counts()`` taken in the main process before training starts. (Two workers
that both meet the same bad file each report it, so worker totals can slightly overcount.)
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Iterable

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
    "empty_mask": "the mask has no foreground pixels (or none left after resizing)",
    "bad_video": "a video cannot be opened or the needed frame cannot be decoded",
}


class DataError(errors.DataError):
    """A data source is unusable (all bad, or not in the expected layout)."""


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
        self._new_skips: list[str] = []

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
        self._new_skips.append(f"{self.name}/{reason}")
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
        sample["skipped"] = self._new_skips
        self._new_skips = []
        return sample


def check_mask(sample: dict, key: str) -> dict:
    """Raise ``empty_mask`` if any ``masks*`` tensor of a transformed sample is all zero."""
    for k, v in sample.items():
        if k.startswith("masks") and isinstance(v, torch.Tensor) and not bool(v.any()):
            raise SampleError("empty_mask", key=key, detail="no foreground left after resizing")
    return sample


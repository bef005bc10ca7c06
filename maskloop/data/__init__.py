"""Data: readers for the released formats, the four-tensor transform, robust skipping, mixing.

* :mod:`maskloop.data.transforms` -- :class:`SampleTransform` (one original image -> 448
  normalised, 1024 uint8, 16x16 prompt mask, 1024 mask).
* :mod:`maskloop.data.sources` -- SA-V (mp4 + json, and our npz pairs), SA-1B, RefCOCO/+/g,
  Open Images V7, DAM; own data (``own_coco`` / ``own_folder`` / ``own_sa2va``, kinds ``coco`` /
  ``folder`` / ``sa2va``, see ``sources/own_common.py``).
* :mod:`maskloop.data.import_` -- ``maskloop data import``: own data -> the ``coco`` layout.
* :mod:`maskloop.data.robust` -- skip-and-count of bad samples, :class:`DataError`, and the
  run's :class:`SkipCounter` (exact over workers, checkpointable, reduced over ranks).
* :mod:`maskloop.data.mixture` -- repeats/weights, distributed resumable samplers, collate.
* :mod:`maskloop.data.fixtures` -- tiny datasets in each released layout, and corruption.
* :mod:`maskloop.data.check` -- ``maskloop data check`` / ``maskloop data write-sav-pairs``.
"""

from .io import UnsafePickleError, safe_load_pickle
from .mixture import LengthGroupedSampler, MixtureDataset, MixtureSampler, collate
from .robust import REASONS, DataError, RobustDataset, SampleError, SkipCounter, merge_skip_counts
from .sources import (
    DAMDataset,
    OpenImagesDataset,
    RefCOCODataset,
    SA1BDataset,
    SAVDataset,
    SAVPairsDataset,
    write_sav_pairs,
)
from .transforms import SampleTransform

__all__ = [
    "SampleTransform", "SAVDataset", "SAVPairsDataset", "write_sav_pairs", "SA1BDataset", "RefCOCODataset",
    "OpenImagesDataset", "DAMDataset", "MixtureDataset", "MixtureSampler", "LengthGroupedSampler", "collate",
    "DataError", "SampleError", "RobustDataset", "REASONS", "SkipCounter", "merge_skip_counts", "safe_load_pickle",
    "UnsafePickleError",
]

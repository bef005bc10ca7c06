"""The user-facing error family.

Every error a user can cause (a bad config, a missing or unreadable checkpoint, a dataset not in its
released layout, a wrong command line) derives from :class:`MaskloopError`.  The CLI catches this one
base and prints its message as a single ``error: ...`` line (exit code 2); ``MASKLOOP_DEBUG=1`` shows the
traceback instead.  Messages name the thing at fault and the fix.
"""

from __future__ import annotations


class MaskloopError(Exception):
    """Base of every user-facing maskloop error."""


class ConfigError(MaskloopError, ValueError):
    """A configuration that cannot be used, with a message saying what to change."""


class CheckpointError(MaskloopError, RuntimeError):
    """A checkpoint that cannot be found, read, or matched to the model (both the published-weights
    loader in ``model/checkpoints.py`` and the training checkpoints in ``train/checkpoint.py``)."""


class DataError(MaskloopError, RuntimeError):
    """A data source is unusable (all bad, or not in the expected layout)."""


class UsageError(MaskloopError):
    """A wrong command line (a missing file argument, a malformed override)."""


class DivergenceError(MaskloopError, RuntimeError):
    """Training diverged: non-finite losses / gradients for too many steps in a row, or non-finite weights
    (never checkpointed); the message names the parameters."""

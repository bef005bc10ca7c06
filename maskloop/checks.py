"""Input checks on the hot path that do not synchronise with an accelerator."""

from __future__ import annotations

from typing import Callable

import torch


def check_on_device(ok: torch.Tensor, message: str, detail: Callable[[], str] | None = None) -> None:
    """Fail when ``ok`` (a 0-d bool tensor) is False.

    On the CPU: at once, ``ValueError(detail() or message)`` (``detail`` may read tensor values).  On an
    accelerator: a device-side assert with ``message`` (``torch._assert_async``), so the check costs no
    host sync and the forward pass runs on; a failure surfaces at the next synchronisation."""
    if ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(detail() if detail is not None else message)
    else:
        torch._assert_async(ok, message)

"""Least-recently-used maps: bounded by the bytes their values hold (the demo's scene and encoder-map caches),
or by their count (parsed annotation files, a prompt's fixed token pieces on the device)."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable


class BytesLRU:
    """At most ``max_bytes`` of values (``size_of(value)`` bytes each), least recently used dropped first; a
    value larger than the whole budget is not kept (``max_bytes`` 0: nothing is).  :meth:`get` counts as a use."""

    def __init__(self, max_bytes: int, size_of: Callable[[Any], int]) -> None:
        self.max_bytes = int(max_bytes)
        self.size_of = size_of
        self.nbytes = 0
        self._d: OrderedDict = OrderedDict()

    def get(self, key) -> Any | None:
        value = self._d.get(key)
        if value is not None:
            self._d.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        size = self.size_of(value)
        if size > self.max_bytes or key in self._d:
            return
        self._d[key] = value
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._d.popitem(last=False)
            self.nbytes -= self.size_of(old)

    def clear(self) -> None:
        self._d.clear()
        self.nbytes = 0

    def __contains__(self, key) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)


class SmallCache:
    """A per-process LRU of at most ``capacity`` entries (parsed annotation files, device copies of token
    pieces): emptied in a forked child, pickled empty."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._d: OrderedDict[Any, Any] = OrderedDict()
        self._pid = os.getpid()

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        if self._pid != os.getpid():
            self._d.clear()
            self._pid = os.getpid()
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        value = build()
        self._d[key] = value
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)
        return value

    def __getstate__(self):
        return {"capacity": self.capacity}

    def __setstate__(self, state):
        self.__init__(state["capacity"])

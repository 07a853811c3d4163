"""A measurement the worker processes share, so that each reports the same one:
whichever finds it missing or older than ``max_age`` measures it again and
writes it to a file in the multiprocess metrics directory; the others read that.
With one process (no directory) it is kept in memory."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Shared(Generic[T]):
    def __init__(
        self,
        path: Path | None,
        max_age: float,
        dump: Callable[[T], Any],
        load: Callable[[Any], T],
    ) -> None:
        self._path = path
        self._max_age = max_age
        self._dump = dump
        self._load = load
        self._last: tuple[float, T] | None = None
        self._read_at = 0  # the file's mtime when ``_last`` was read from it

    def get(self, measure: Callable[[], T]) -> tuple[float, T]:
        """(when measured, in seconds since the epoch; the measurement), by
        ``measure`` when none is fresh. Reads files: call it off the event loop."""
        fresh = self.peek()
        if fresh is not None:
            return fresh
        return self.put(measure())

    def peek(self) -> tuple[float, T] | None:
        """The measurement, unless there is none younger than ``max_age``."""
        if self._path is not None:
            # Unreadable or half-gone: as if missing.
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                changed = self._path.stat().st_mtime_ns
                if self._last is None or changed != self._read_at:
                    raw = json.loads(self._path.read_bytes())
                    self._last = (float(raw["at"]), self._load(raw["value"]))
                    self._read_at = changed
        if self._last is not None and 0 <= time.time() - self._last[0] <= self._max_age:
            return self._last
        return None

    def put(self, value: T) -> tuple[float, T]:
        """Record a measurement just taken, for every worker."""
        at = time.time()
        self._last = (at, value)
        if self._path is not None:
            tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}")
            with contextlib.suppress(OSError):  # the others measure it themselves
                tmp.write_text(json.dumps({"at": at, "value": self._dump(value)}))
                tmp.replace(self._path)
                self._read_at = self._path.stat().st_mtime_ns
        return at, value

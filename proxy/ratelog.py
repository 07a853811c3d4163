"""Warnings that repeat at most once per interval, so a dead upstream under load
writes one line every few seconds instead of one per request."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

# Keys remembered at most; older ones are dropped first (they are only throttles).
MAX_KEYS = 1024


class ThrottledLog:
    """``warning(key, ...)`` logs unless the same key was logged within ``interval``
    seconds; the next line that gets through says how many were held back."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> bool:
        """True when the line was written."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        held = self._held.pop(key, 0)
        self._last.pop(key, None)
        self._last[key] = now  # re-inserted: the dict stays oldest first
        while len(self._last) > MAX_KEYS:
            oldest = next(iter(self._last))
            del self._last[oldest]
            self._held.pop(oldest, None)
        if held:
            msg += " (%d more like this held back)"
            args = (*args, held)
        self._logger.warning(msg, *args)
        return True

"""The last hour of the server's summed counters, one point a minute, in one
small file every worker reads: the status page's chart and "last hour" figures
are the same whichever worker answers.

Every worker offers a point each minute; under an exclusive lock on the file,
the first offer of a minute is kept and the others are dropped, so no worker
has to be elected. The file lives in the multiprocess metrics directory, which
the counters themselves live in and which starts empty with the server: the
history never spans two runs whose counters started from zero. With one
process (no such directory) it is kept in memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass
from pathlib import Path

SAMPLE_SECONDS = 60.0
WINDOW_SECONDS = 3600.0
FILE = "status-history.json"


@dataclass(frozen=True, slots=True)
class Point:
    time: float  # seconds since the epoch
    hits: float
    answered: float
    saved_bytes: float
    upstream_bytes: float

    def minus(self, earlier: Point) -> Point:
        return Point(
            self.time - earlier.time,
            self.hits - earlier.hits,
            self.answered - earlier.answered,
            self.saved_bytes - earlier.saved_bytes,
            self.upstream_bytes - earlier.upstream_bytes,
        )


class History:
    def __init__(
        self,
        directory: Path | None,
        *,
        every: float = SAMPLE_SECONDS,
        window: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = None if directory is None else directory / FILE
        self._every = every
        self._window = window
        self._clock = clock
        self._memory: list[Point] = []

    def offer(self, point: Point) -> bool:
        """Keep ``point`` unless one was kept less than a sampling interval ago
        (by any worker); True when kept."""
        with self._locked():
            points = self._read()
            # A little slack: workers' timers drift, and a minute must not be skipped.
            if points and point.time - points[-1].time < 0.9 * self._every:
                return False
            points.append(point)
            oldest = point.time - self._window - 2 * self._every
            self._write([p for p in points if p.time >= oldest])
            return True

    def points(self) -> list[Point]:
        """The points kept, oldest first (read without the lock: the file is
        replaced whole, never written in place)."""
        return self._read()

    def window(self, now: Point) -> list[Point]:
        """The points of the last hour, with ``now`` (the counters this moment) last."""
        start = now.time - self._window
        return [p for p in self.points() if start <= p.time < now.time] + [now]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._path is None:
            yield
            return
        with self._path.with_suffix(".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> list[Point]:
        if self._path is None:
            return list(self._memory)
        try:
            rows = json.loads(self._path.read_bytes())
            return [Point(*map(float, row)) for row in rows]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError):
            return []  # unreadable: it only feeds a chart, start it again

    def _write(self, points: list[Point]) -> None:
        if self._path is None:
            self._memory = points
            return
        tmp = self._path.with_name(f".{FILE}.{os.getpid()}")
        tmp.write_text(json.dumps([astuple(p) for p in points]))
        tmp.replace(self._path)

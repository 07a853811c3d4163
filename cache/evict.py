"""Keeping the cache under its size and age limits, least recently used first.

Last use is a committed file's mtime: a hit refreshes it (at most every
``TOUCH_SECONDS``, so a hot blob costs one ``utime`` every 20 seconds, not one per
request). The evictor walks the files, skips protected digests (pinned images)
and anything committed or used within ``GRACE_SECONDS``, and removes the oldest
until the cache is under the low-water mark (90% of the cap). ``TOUCH_SECONDS``
is below ``GRACE_SECONDS``, so a blob in use always looks recently used. A hit
opens the blob before anything else, so eviction cannot come between a check
and the open: a hit either has the file open or goes to the upstream.

When a download finds the disk full, the mirror asks for a pass that frees at
least the bytes it still needs (``free_bytes``), under the same rules, even when
the cache is under its cap (the disk may be smaller than the cap, or shared).

Removing a file never disturbs a reader that has it open (POSIX keeps the bytes
until the last descriptor closes), and the mirror re-fetches a missing blob or
manifest on demand, so a manifest whose layers went is still served whole.
Only one process evicts at a time (an flock on ``<root>/evict.lock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pullthrough.cache.digests import Digest
from pullthrough.cache.layout import Layout

TOUCH_SECONDS = 20.0
GRACE_SECONDS = 30.0
LOW_WATER = 0.9


def touch_if_stale(path: Path | int, mtime: float, now: float | None = None) -> None:
    """Record a use of ``path`` (or an open descriptor) unless one was recorded recently."""
    now = time.time() if now is None else now
    if now - mtime > TOUCH_SECONDS:
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)


@dataclass(frozen=True, slots=True)
class Entry:
    path: Path
    kind: str  # "blob" or "manifest"
    digest: Digest
    size: int
    last_used: float


def entries(layouts: Iterable[Layout]) -> Iterator[Entry]:
    """Every committed blob and manifest."""
    for layout in layouts:
        for kind, digest, path, st in layout.walk():
            yield Entry(path, kind, digest, st.st_size, st.st_mtime)


@dataclass
class Eviction:
    removed: list[Entry] = field(default_factory=list)
    total_before: int = 0
    total_after: int = 0

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.removed)


def evict(
    layouts: Iterable[Layout],
    *,
    max_size: int | None,
    max_age_seconds: float | None,
    protected: set[Digest],
    dry_run: bool = False,
    now: float | None = None,
    free_bytes: int = 0,
) -> Eviction | None:
    """Bring the cache under its limits, and free at least ``free_bytes``.

    None when another process is evicting."""
    layouts = list(layouts)
    now = time.time() if now is None else now
    lock_path = layouts[0].root / "evict.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        return _evict(layouts, max_size, max_age_seconds, protected, dry_run, now, free_bytes)
    finally:
        os.close(fd)


def _evict(
    layouts: list[Layout],
    max_size: int | None,
    max_age_seconds: float | None,
    protected: set[Digest],
    dry_run: bool,
    now: float,
    free_bytes: int = 0,
) -> Eviction:
    found = list(entries(layouts))
    result = Eviction(total_before=sum(e.size for e in found))
    total = result.total_before
    candidates = [
        entry
        for entry in sorted(found, key=lambda e: e.last_used)
        if entry.digest not in protected and now - entry.last_used >= GRACE_SECONDS
    ]
    target = None if max_size is None else int(max_size * LOW_WATER)
    for entry in candidates:
        too_old = max_age_seconds is not None and now - entry.last_used > max_age_seconds
        too_big = target is not None and total > target
        short = result.total_before - total < free_bytes
        if not (too_old or too_big or short):
            continue
        if not dry_run and not _remove_if_unused(entry, now):
            continue
        result.removed.append(entry)
        total -= entry.size
    result.total_after = total
    return result


def _remove_if_unused(entry: Entry, now: float) -> bool:
    # A hit may have refreshed it since we looked: check again, just before.
    try:
        if now - entry.path.stat().st_mtime < GRACE_SECONDS:
            return False
        entry.path.unlink()
    except FileNotFoundError:
        return False
    return True

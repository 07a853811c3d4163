"""Writes to the cache that fail: why, a warning at a bounded rate, and "full".

A full disk (or a quota, or a failing device) must not fail pulls: the stores
still answer from the upstream and from memory, and report each failure here.
This counts them by reason (for a metric), warns at most once per
``WARN_EVERY_SECONDS`` per reason (a busy mirror on a full disk would otherwise
log a line per request), and remembers that the disk was full until something
is committed again, for ``/readyz``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

WARN_EVERY_SECONDS = 60.0
# Reasons are a metric label: a small fixed set, never an error message.
_REASONS = {
    errno.ENOSPC: "no_space",
    errno.EDQUOT: "quota",
    errno.EIO: "io",
    errno.EROFS: "read_only",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
}
REASONS = (*sorted(set(_REASONS.values())), "other")
# Reasons that mean "no room": the cache is full, not broken.
FULL = frozenset({"no_space", "quota"})


def reason_of(exc: Exception) -> str:
    if isinstance(exc, sqlite3.OperationalError):
        # SQLite says it in words: "database or disk is full", "disk I/O error".
        text = str(exc)
        return "no_space" if "full" in text else "io" if "I/O" in text else "other"
    if isinstance(exc, OSError):
        return _REASONS.get(exc.errno or 0, "other")
    return "other"


class WriteFailures:
    """Write failures of one cache root, shared by its blob and manifest stores."""

    def __init__(
        self,
        on_failure: Callable[[str], None] = lambda reason: None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_failure = on_failure
        self._clock = clock
        self._warned: dict[str, float] = {}
        self._quiet: dict[str, int] = {}
        self._full = False

    @property
    def full(self) -> bool:
        """True from a write that failed for lack of space until a later commit."""
        return self._full

    def record(self, what: str, exc: Exception) -> str:
        """Count a failed write of ``what`` (served anyway, not kept); returns the reason."""
        reason = reason_of(exc)
        if reason in FULL:
            self._full = True
        self._on_failure(reason)
        now = self._clock()
        last = self._warned.get(reason)
        if last is not None and now - last < WARN_EVERY_SECONDS:
            self._quiet[reason] = self._quiet.get(reason, 0) + 1
            return reason
        self._warned[reason] = now
        quiet = self._quiet.pop(reason, 0)
        more = f" ({quiet} more since the last warning)" if quiet else ""
        log.warning(
            "cache write failed (%s) for %s: answered, not kept: %s%s",
            reason,
            what,
            exc,
            more,
        )
        return reason

    def committed(self) -> None:
        """Something was written whole: there is room again."""
        self._full = False


# Space set aside in the cache for the tag index. SQLite needs room to open at all
# (its -wal and -shm files): on a disk that something filled, the mirror would not
# start, nor could `gc --delete` free anything. Releasing this lets them open.
RESERVE_BYTES = 16 << 20


def keep_reserve(path: Path) -> None:
    """Set the reserve aside at ``path`` if it is missing and there is plenty of
    room (best effort: a disk that cannot spare it goes without)."""
    if path.exists():
        return
    partial = path.with_name(path.name + ".partial")
    try:
        free = os.statvfs(path.parent)
        if free.f_bavail * free.f_frsize < 4 * RESERVE_BYTES:
            return
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        finally:
            os.close(fd)
        partial.rename(path)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)


def release_reserve(path: Path) -> bool:
    """Give the reserve's space back to the disk; False when there was none."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    log.warning(
        "the disk under %s is full: released the %d MiB set aside for the tag index; "
        "free some space (or set max_size) so the mirror can keep what it fetches",
        path.parent,
        RESERVE_BYTES >> 20,
    )
    return True

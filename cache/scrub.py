"""Finding bit rot: re-hash what is on disk, take out what no longer matches.

Blobs were verified when they were downloaded, but a disk can flip a byte later,
and a blob is served by its digest without being hashed again (that is what makes
hits fast). Two things re-hash them:

- the **scrub**, in the server: walks every blob and manifest over and over at a
  bounded rate (``scrub_rate`` bytes a second), skipping what was verified within
  ``RECHECK_SECONDS``. Only one process per cache scrubs at a time (an flock on
  ``<root>/scrub.lock``), so the rate is per server, not per worker;
- ``pullthrough cache verify``: everything, at full speed, now.

Either moves a corrupt file to the quarantine (``cache/quarantine.py``): the next
request for it is a miss, fetched again from the upstream. A file being sent keeps
being read by its request (POSIX), and a file that was replaced since it was hashed
(evicted and downloaded again) is left alone.

When each object was last verified is kept in ``<root>/scrub.sqlite``, with the
inode it was: a file downloaded again since is a different file and is due.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pullthrough.cache.digests import Digest
from pullthrough.cache.evict import Entry, entries
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore, StoredManifest
from pullthrough.cache.quarantine import Corrupt, quarantine, report

log = logging.getLogger(__name__)

# An object verified this recently is skipped: a disk does not rot by the hour,
# and a week keeps a multi-terabyte cache's scrub from running flat out forever.
RECHECK_SECONDS = 7 * 86400.0
# Between passes the scrub rests at least this long (a walk of a big cache is not
# free) and at most this long (new downloads get their first check within it).
PAUSE_MIN_SECONDS = 60.0
PAUSE_MAX_SECONDS = 600.0
# A process that did not get the scrub lock tries again this often, to take over
# when the scrubbing worker exits.
LOCK_RETRY_SECONDS = 60.0
CHUNK = 1 << 20
# A blob whose mtime is this recent was served lately (a hit touches it at most
# every TOUCH_SECONDS): the scrub leaves its pages in the page cache.
IN_USE_SECONDS = 3600.0


class Stopped(Exception):
    """The scrub was asked to stop."""


class VerifiedLog:
    """``scrub.sqlite``: (kind, digest) -> (inode, size, verified_at).

    SQLite because the server's scrub and a ``cache verify`` beside it both write.
    One connection per thread (sqlite3's rule); blocking.
    """

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS verified (kind TEXT NOT NULL, digest TEXT NOT NULL, "
            "inode INTEGER NOT NULL, size INTEGER NOT NULL, verified_at REAL NOT NULL, "
            "PRIMARY KEY (kind, digest))"
        )

    def verified_at(self, entry: Entry, inode: int) -> float | None:
        row = self._db.execute(
            "SELECT inode, size, verified_at FROM verified WHERE kind = ? AND digest = ?",
            (entry.kind, str(entry.digest)),
        ).fetchone()
        if row is None or row[0] != inode or row[1] != entry.size:
            return None
        return float(row[2])

    def record(self, entry: Entry, inode: int, when: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO verified VALUES (?, ?, ?, ?, ?)",
            (entry.kind, str(entry.digest), inode, entry.size, when),
        )

    def forget(self, kind: str, digest: Digest) -> None:
        self._db.execute("DELETE FROM verified WHERE kind = ? AND digest = ?", (kind, str(digest)))

    def forget_older_than(self, when: float) -> None:
        self._db.execute("DELETE FROM verified WHERE verified_at < ?", (when,))

    def oldest(self) -> float | None:
        row = self._db.execute("SELECT MIN(verified_at) FROM verified").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def close(self) -> None:
        self._db.close()


class Throttle:
    """Keeps reading at or under ``rate`` bytes a second (0: no limit).

    Time spent not reading (walking past recently verified files) earns at most
    ``CREDIT_SECONDS`` of catching up, so no window sees more than the rate plus
    that and one chunk.
    """

    CREDIT_SECONDS = 0.5

    def __init__(self, rate: int, stop: threading.Event | None = None) -> None:
        self.rate = rate
        self._stop = stop or threading.Event()
        self.restart()

    def restart(self) -> None:
        """After a rest: idle time earns no burst."""
        self._next = time.monotonic()

    @property
    def chunk(self) -> int:
        # Small enough that one read is no burst at a low rate.
        return CHUNK if self.rate == 0 else max(64 * 1024, min(CHUNK, self.rate // 8))

    def take(self, n: int) -> None:
        """Account for ``n`` bytes read; sleep until the rate allows more."""
        if self._stop.is_set():
            raise Stopped
        if self.rate == 0:
            return
        now = time.monotonic()
        self._next = max(self._next, now - self.CREDIT_SECONDS) + n / self.rate
        delay = self._next - now
        if delay > 0 and self._stop.wait(delay):
            raise Stopped


@dataclass
class Outcome:
    """What checking one file found."""

    entry: Entry
    inode: int
    hashed: int  # bytes read
    corrupt: Corrupt | None = None


def check_blob(
    layout: Layout, entry: Entry, throttle: Throttle, on_bytes: Callable[[int], None]
) -> Outcome | None:
    """Re-hash one blob from disk; quarantine it if it does not match. None: gone.

    Says nothing: the caller reports what it found, to a log or a terminal.
    """
    try:
        fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        inode = st.st_ino
        # A blob in use stays in the page cache: that copy is what clients get,
        # and dropping it to re-read the disk would cost every hit of a hot blob
        # a disk read (sendfile at disk speed). A cold blob is read from disk
        # anyway, and its pages are dropped after, so the scrub leaves the cache
        # as it found it. A hot blob's disk copy is checked once it cools down.
        in_use = time.time() - st.st_mtime < IN_USE_SECONDS
        _advise(fd, os.POSIX_FADV_SEQUENTIAL)
        hasher = entry.digest.hasher()
        hashed = 0
        while True:
            throttle.take(0)
            chunk = os.read(fd, throttle.chunk)
            if not chunk:
                break
            hasher.update(chunk)
            hashed += len(chunk)
            on_bytes(len(chunk))
            throttle.take(len(chunk))
        if not in_use:
            _advise(fd, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    actual = Digest(entry.digest.algorithm, hasher.hexdigest())
    outcome = Outcome(entry, inode, hashed)
    if actual != entry.digest:
        moved = quarantine(layout, "blob", entry.digest, entry.path, inode)
        outcome.corrupt = Corrupt("blob", entry.digest, f"content hashes to {actual}", moved)
    return outcome


def _advise(fd: int, advice: int) -> None:
    with contextlib.suppress(OSError):  # advice only; not every file system takes it
        os.posix_fadvise(fd, 0, 0, advice)


def check_manifest(
    store: ManifestStore, entry: Entry, throttle: Throttle, on_bytes: Callable[[int], None]
) -> Outcome | None:
    """The same for a manifest (quiet too); the store counts a corrupt one."""
    try:
        inode = entry.path.stat().st_ino
    except FileNotFoundError:
        return None
    throttle.take(entry.size)
    found = store.check(entry.digest, log=False)
    if found is None:
        return None
    on_bytes(entry.size)
    outcome = Outcome(entry, inode, entry.size)
    if not isinstance(found, StoredManifest):
        outcome.corrupt = found
    return outcome


def _objects(layouts: Sequence[Layout]) -> Iterator[tuple[Layout, Entry]]:
    for layout in layouts:
        for entry in entries([layout]):
            yield layout, entry


# -- cache verify ---------------------------------------------------------------------


@dataclass
class VerifyReport:
    blobs: int = 0
    manifests: int = 0
    bytes: int = 0
    corrupt: list[Corrupt] = field(default_factory=list)
    seconds: float = 0.0


def total_bytes(layouts: Sequence[Layout]) -> int:
    """What a verify will read, for a progress bar."""
    return sum(entry.size for _, entry in _objects(layouts))


def verify_all(
    layouts: Sequence[Layout],
    *,
    progress: Callable[[int], None] = lambda n: None,
    found: Callable[[Corrupt], None] = lambda c: None,
) -> VerifyReport:
    """Re-hash every blob and manifest now, quarantining what fails (blocking)."""
    started = time.monotonic()
    result = VerifyReport()
    unlimited = Throttle(0)
    logs = {layout.root: VerifiedLog(layout.scrub_db) for layout in layouts}
    stores = {layout.root: ManifestStore(layout) for layout in layouts}
    try:
        for layout, entry in _objects(layouts):
            if entry.kind == "blob":
                outcome = check_blob(layout, entry, unlimited, progress)
            else:
                outcome = check_manifest(stores[layout.root], entry, unlimited, progress)
            if outcome is None:
                continue  # removed while we walked
            result.bytes += outcome.hashed
            if entry.kind == "blob":
                result.blobs += 1
            else:
                result.manifests += 1
            _record(logs[layout.root], outcome)
            if outcome.corrupt is not None:
                result.corrupt.append(outcome.corrupt)
                found(outcome.corrupt)
    finally:
        for db in logs.values():
            db.close()
    result.seconds = time.monotonic() - started
    return result


def _record(db: VerifiedLog, outcome: Outcome) -> None:
    if outcome.corrupt is None:
        db.record(outcome.entry, outcome.inode, time.time())
    else:
        db.forget(outcome.entry.kind, outcome.entry.digest)


# -- the background scrub ---------------------------------------------------------------


class Scrubber:
    """The server's scrub; ``run`` blocks (a thread of its own) until ``stop`` is set."""

    def __init__(
        self,
        layouts: Sequence[Layout],
        lock: Path,
        *,
        rate: int,
        recheck_seconds: float = RECHECK_SECONDS,
        on_bytes: Callable[[int], None] = lambda n: None,
        on_corrupt: Callable[[str], None] = lambda kind: None,
        on_pass: Callable[[], None] = lambda: None,
    ) -> None:
        self.layouts = list(layouts)
        self.lock = lock
        self.rate = rate
        self.recheck_seconds = recheck_seconds
        self._on_bytes = on_bytes
        self._on_corrupt = on_corrupt
        self._on_pass = on_pass

    def run(self, stop: threading.Event) -> None:
        with contextlib.suppress(Stopped):
            while True:
                try:
                    fd = self._wait_for_lock(stop)
                    try:
                        log.info("scrubbing the cache at up to %d bytes/s", self.rate)
                        self._scrub(stop)
                    finally:
                        os.close(fd)  # drops the lock
                except (OSError, sqlite3.Error) as exc:
                    log.warning("cannot scrub the cache, trying again later: %s", exc)
                if stop.wait(PAUSE_MAX_SECONDS):
                    return

    def _wait_for_lock(self, stop: threading.Event) -> int:
        while True:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
            else:
                return fd
            if stop.wait(LOCK_RETRY_SECONDS):
                raise Stopped

    def _scrub(self, stop: threading.Event) -> None:
        throttle = Throttle(self.rate, stop)
        while True:
            try:
                pause = self.scrub_once(throttle)
                self._on_pass()
            except (OSError, sqlite3.Error) as exc:
                log.warning("scrub pass failed, trying again later: %s", exc)
                pause = PAUSE_MAX_SECONDS
            if stop.wait(pause):
                raise Stopped
            throttle.restart()  # resting earns no burst

    def scrub_once(self, throttle: Throttle) -> float:
        """One walk over the cache (blocking); returns how long to rest before the next.

        Needs no lock: ``run`` takes it so that one process scrubs at a time.
        """
        stores = {
            layout.root: ManifestStore(layout, on_corrupt=lambda: self._on_corrupt("manifest"))
            for layout in self.layouts
        }
        logs = {layout.root: VerifiedLog(layout.scrub_db) for layout in self.layouts}
        try:
            self._pass(throttle, stores, logs)
            return self._pause(logs)
        finally:
            for db in logs.values():
                db.close()

    def _pass(
        self,
        throttle: Throttle,
        stores: dict[Path, ManifestStore],
        logs: dict[Path, VerifiedLog],
    ) -> None:
        started = time.time()
        for layout, entry in _objects(self.layouts):
            db = logs[layout.root]
            try:
                inode = entry.path.stat().st_ino
            except FileNotFoundError:
                continue
            last = db.verified_at(entry, inode)
            if last is not None and time.time() - last < self.recheck_seconds:
                continue
            if entry.kind == "blob":
                outcome = check_blob(layout, entry, throttle, self._on_bytes)
                if outcome is not None and outcome.corrupt is not None:
                    self._on_corrupt("blob")
            else:
                outcome = check_manifest(stores[layout.root], entry, throttle, self._on_bytes)
            if outcome is not None:
                _record(db, outcome)
                if outcome.corrupt is not None:
                    report(outcome.corrupt)
        # Every object still there was verified since ``started - recheck``: older
        # records are of objects gone since.
        for db in logs.values():
            db.forget_older_than(started - self.recheck_seconds)

    def _pause(self, logs: dict[Path, VerifiedLog]) -> float:
        oldest = [t for t in (db.oldest() for db in logs.values()) if t is not None]
        due = min(oldest) + self.recheck_seconds - time.time() if oldest else PAUSE_MAX_SECONDS
        return min(max(due, PAUSE_MIN_SECONDS), PAUSE_MAX_SECONDS)

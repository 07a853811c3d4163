"""Blobs: committed files, and downloads that any number of readers follow.

One download per digest, across every worker process sharing the cache root: the
writer holds an exclusive ``flock`` on ``tmp/<digest>.partial`` while it runs.
Readers never open a second upstream stream; they read the partial file as it
grows. Readers in the writer's own process are woken by the writer; readers in
other processes poll the file and test the lock to learn the writer has finished.

A reader never gets the last byte of what it asked for before the writer has
verified the whole blob and committed it, so no client can receive a complete
response of unverified content: a failed download ends every response short.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from cache.digests import Digest
from cache.errors import DigestMismatch, DownloadFailed, SizeMismatch
from cache.evict import touch_if_stale
from cache.layout import Layout, fsync_dir, write_atomic

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
FOREIGN_POLL_SECONDS = 0.01
STALE_TMP_SECONDS = 600


class State(Enum):
    RUNNING = "running"
    VERIFIED = "verified"  # all bytes are in and hash right; being made durable
    COMMITTED = "committed"
    FAILED = "failed"


DONE = frozenset({State.VERIFIED, State.COMMITTED})
# Writes and reads up to this size happen on the event loop: a thread hop
# costs more than hashing or copying them (page cache, sub-millisecond).
INLINE_BYTES = 256 * 1024


def _lock_is_free(fd: int) -> bool:
    """True when no process holds the writer's exclusive lock on ``fd``'s file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


class BlobWriter:
    """The one writer of a digest: hashes as it writes, commits only verified bytes.

    Its methods block on disk I/O: the store runs small writes on the event loop
    and large ones, fsync and rename in worker threads.
    """

    def __init__(self, layout: Layout, digest: Digest, fd: int) -> None:
        self._layout = layout
        self.digest = digest
        self._fd = fd
        self._hasher = digest.hasher()
        self.expected_size: int | None = None
        self.written = 0
        self._closed = False

    def begin(self, size: int | None) -> None:
        """Record the size the upstream announced, for readers in other processes."""
        self.expected_size = size
        text = "" if size is None else str(size)
        # Advisory, for readers in other processes; a crash loses nothing of value.
        write_atomic(
            self._layout.size_file(self.digest), self._layout.tmp, text.encode(), durable=False
        )

    def write(self, chunk: bytes) -> None:
        self._hasher.update(chunk)
        view = memoryview(chunk)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.written += len(chunk)

    def verify(self) -> None:
        """Raise unless every byte came and they hash to the digest."""
        if self.expected_size is not None and self.written != self.expected_size:
            raise SizeMismatch(self.expected_size, self.written)
        actual = f"{self.digest.algorithm}:{self._hasher.hexdigest()}"
        if actual != str(self.digest):
            raise DigestMismatch(str(self.digest), actual)

    def commit(self) -> Path:
        """Verify, then make the blob durable and visible by rename."""
        self.verify()
        return self.persist()

    def persist(self) -> Path:
        """fsync, then rename into place: only then can anyone find it."""
        os.fsync(self._fd)
        final = self._layout.blob(self.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        self._layout.partial(self.digest).rename(final)
        fsync_dir(final.parent)
        self._release()
        return final

    def abort(self) -> None:
        """Throw away what was written; a no-op after commit."""
        if self._closed:
            return
        self._layout.partial(self.digest).unlink(missing_ok=True)
        self._release()

    def _release(self) -> None:
        self._layout.size_file(self.digest).unlink(missing_ok=True)
        self._closed = True
        # Closing drops the flock: readers elsewhere now see the writer is gone.
        os.close(self._fd)


@dataclass
class Download:
    """A download this process runs, shared by every reader in this process."""

    writer: BlobWriter
    state: State = State.RUNNING
    error: BaseException | None = None
    size_known: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    _progress: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def written(self) -> int:
        return self.writer.written

    @property
    def size(self) -> int | None:
        return self.writer.expected_size

    def notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def progress_event(self) -> asyncio.Event:
        return self._progress


class BlobSink:
    """What a fetch function gets: announce the size, then write chunks."""

    def __init__(self, download: Download) -> None:
        self._download = download

    async def begin(self, size: int | None) -> None:
        self._download.writer.begin(size)  # a few bytes, no fsync
        self._download.size_known.set()

    async def write(self, chunk: bytes) -> None:
        if len(chunk) <= INLINE_BYTES:
            self._download.writer.write(chunk)
        else:
            await asyncio.to_thread(self._download.writer.write, chunk)
        self._download.notify()


Fetch = Callable[[BlobSink], Awaitable[None]]


class Tracker(Protocol):
    """A blob being downloaded, seen by one reader."""

    # True when this reader joined a download someone else had started.
    joined: bool

    async def size(self) -> int | None:
        """Wait for the upstream's answer; raise what the download failed with."""

    def read(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        """Bytes ``start`` to ``end`` (exclusive; None: to the end) as they arrive."""


class BlobStore:
    def __init__(
        self,
        layout: Layout,
        *,
        read_timeout: float = 60.0,
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        self.layout = layout
        self._read_timeout = read_timeout
        self._on_commit = on_commit
        self._downloads: dict[Digest, Download] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def stat(self, digest: Digest) -> tuple[Path, int] | None:
        path = self.layout.blob(digest)
        try:
            return path, path.stat().st_size
        except FileNotFoundError:
            return None

    def hit(self, digest: Digest) -> tuple[Path, int] | None:
        """Like ``stat``, and records the use for eviction."""
        path = self.layout.blob(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        touch_if_stale(path, st.st_mtime)
        return path, st.st_size

    @property
    def active_downloads(self) -> int:
        return len(self._downloads)

    def track(self, digest: Digest, fetch: Fetch) -> Tracker | None:
        """Follow the download of ``digest``, starting it here if nobody runs one.

        Returns None when the blob is already committed.
        """
        download = self._downloads.get(digest)
        if download is not None:
            return _LocalTracker(self.layout, digest, download, joined=True)
        writer = self._claim(digest)
        if writer is None:
            if self.stat(digest) is not None:
                return None
            return _ForeignTracker(self.layout, digest, self._read_timeout)
        download = Download(writer)
        self._downloads[digest] = download
        task = asyncio.create_task(self._run(download, fetch), name=f"download {digest}")
        download.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return _LocalTracker(self.layout, digest, download, joined=False)

    async def _run(self, download: Download, fetch: Fetch) -> None:
        writer = download.writer
        try:
            try:
                await fetch(BlobSink(download))
                writer.verify()
            except BaseException as exc:
                try:
                    await asyncio.shield(asyncio.to_thread(writer.abort))
                finally:
                    # Readers learn of the failure only once nothing of it is left.
                    download.state = State.FAILED
                    download.error = exc
                if not isinstance(exc, Exception):
                    raise
                log.warning("download of %s failed: %s", writer.digest, exc)
                return
            # Verified: readers may have their last byte now; durability (fsync,
            # rename) follows without holding them up, and nothing can find the
            # blob in the cache before it is durable.
            download.state = State.VERIFIED
            download.notify()
            try:
                await asyncio.to_thread(writer.persist)
            except OSError as exc:
                log.warning("could not keep %s: %s", writer.digest, exc)
                await asyncio.to_thread(writer.abort)
                return
            download.state = State.COMMITTED
            self._on_commit()
        finally:
            self._downloads.pop(writer.digest, None)
            download.size_known.set()
            download.notify()

    async def settle(self) -> None:
        """Wait until the downloads running now have finished (committed or not)."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Cancel downloads still running; their partial files are removed.

        Downloads already verified are let finish: they only need their fsync.
        """
        finishing = [d.task for d in self._downloads.values() if d.state is State.VERIFIED]
        await asyncio.gather(*[t for t in finishing if t is not None], return_exceptions=True)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A task cancelled before it first ran never reached its own clean-up.
        for download in list(self._downloads.values()):
            download.writer.abort()
        self._downloads.clear()

    def _claim(self, digest: Digest) -> BlobWriter | None:
        if self.stat(digest) is not None:
            return None
        path = self.layout.partial(digest)
        for _ in range(8):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            # Between open and flock the previous writer may have renamed or
            # removed the file: only a lock on what the path names now counts.
            try:
                same = path.stat().st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            if self.stat(digest) is not None:
                path.unlink()
                os.close(fd)
                return None
            os.ftruncate(fd, 0)
            self.layout.size_file(digest).unlink(missing_ok=True)
            return BlobWriter(self.layout, digest, fd)
        return None

    def remove_stale(self) -> int:
        """Remove temp files no live writer holds (left by a crash). Returns the count."""
        removed = 0
        now = time.time()
        for path in sorted(self.layout.tmp.iterdir()):
            if not path.exists() or path.is_dir():
                # A .size file removed with its .partial; or an import's staging
                # folder, which archive.remove_abandoned_imports looks after.
                continue
            if path.suffix == ".partial":
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue  # a live writer, in this or another process
                try:
                    path.unlink(missing_ok=True)
                    path.with_suffix(".size").unlink(missing_ok=True)
                finally:
                    os.close(fd)
                removed += 1
            elif path.suffix == ".size":
                if not path.with_suffix(".partial").exists():
                    path.unlink(missing_ok=True)
                    removed += 1
            elif now - path.stat().st_mtime > STALE_TMP_SECONDS:
                # Manifest temp files live for milliseconds; an old one is a crash's.
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def _open_current(layout: Layout, digest: Digest) -> int:
    """Open the blob being written, or its committed file if it was just renamed."""
    for path in (layout.partial(digest), layout.blob(digest)):
        with contextlib.suppress(FileNotFoundError):
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    raise DownloadFailed(f"{digest} is neither being written nor committed")


async def _follow(
    fd: int,
    start: int,
    end: int | None,
    size: int | None,
    status: Callable[[], tuple[State, int]],
    wait: Callable[[], Awaitable[None]],
) -> AsyncIterator[bytes]:
    """Yield bytes ``start`` to ``end`` of ``fd`` as a writer appends them.

    ``status`` says whether the writer still runs and how much is on disk (it
    raises if the download failed); ``wait`` returns when there may be more.
    While the writer runs, the last byte of the response is held back.
    """
    pos = start
    while True:
        state, written = status()
        target = end if end is not None else size
        if state in DONE:
            stop = written if target is None else min(target, written)
        else:
            stop = min(written, (written if target is None else target) - 1)
        if pos < stop:
            count = min(READ_CHUNK, stop - pos)
            if count <= INLINE_BYTES:
                chunk = os.pread(fd, count, pos)
            else:
                chunk = await asyncio.to_thread(os.pread, fd, count, pos)
            if not chunk:
                raise DownloadFailed("the file being followed was truncated")
            pos += len(chunk)
            yield chunk
        elif state in DONE:
            return
        else:
            await wait()


class _LocalTracker:
    """A download this process runs: the writer wakes us after every chunk."""

    def __init__(self, layout: Layout, digest: Digest, download: Download, *, joined: bool) -> None:
        self.joined = joined
        self._layout = layout
        self._digest = digest
        self._download = download
        self._event = download.progress_event()

    async def size(self) -> int | None:
        await self._download.size_known.wait()
        if self._download.state is State.FAILED and self._download.written == 0:
            raise _failure(self._download.error)
        return self._download.size

    def _status(self) -> tuple[State, int]:
        download = self._download
        self._event = download.progress_event()
        if download.state is State.FAILED:
            raise _failure(download.error)
        return download.state, download.written

    async def _wait(self) -> None:
        await self._event.wait()

    async def read(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        fd = _open_current(self._layout, self._digest)
        try:
            async for chunk in _follow(
                fd, start, end, self._download.size, self._status, self._wait
            ):
                yield chunk
        finally:
            os.close(fd)


class _ForeignTracker:
    """A download another process runs: learn its progress from the file system."""

    joined = True

    def __init__(self, layout: Layout, digest: Digest, timeout: float) -> None:
        self._layout = layout
        self._digest = digest
        self._timeout = timeout
        self._size: int | None = None

    async def size(self) -> int | None:
        deadline = time.monotonic() + self._timeout
        size_file = self._layout.size_file(self._digest)
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                text = size_file.read_text()
                self._size = int(text) if text else None
                return self._size
            with contextlib.suppress(FileNotFoundError):
                self._size = self._layout.blob(self._digest).stat().st_size
                return self._size
            if not self._writer_alive():
                raise DownloadFailed(f"the download of {self._digest} stopped")
            await asyncio.sleep(FOREIGN_POLL_SECONDS)
        raise DownloadFailed(f"no answer for {self._digest} within {self._timeout}s")

    def _writer_alive(self) -> bool:
        try:
            fd = os.open(self._layout.partial(self._digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            return not _lock_is_free(fd)
        finally:
            os.close(fd)

    async def read(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        fd = _open_current(self._layout, self._digest)
        final = self._layout.blob(self._digest)
        last = (-1, time.monotonic())

        def status() -> tuple[State, int]:
            nonlocal last
            if not _lock_is_free(fd):
                written = os.fstat(fd).st_size
                if written != last[0]:
                    last = (written, time.monotonic())
                elif time.monotonic() - last[1] > self._timeout:
                    raise DownloadFailed(f"the download of {self._digest} stalled")
                return State.RUNNING, written
            # The writer is gone: it either renamed this very file into place
            # (committed) or removed it.
            written = os.fstat(fd).st_size
            if _same_file(fd, final) and (self._size is None or written == self._size):
                return State.COMMITTED, written
            raise DownloadFailed(f"the download of {self._digest} was abandoned")

        async def wait() -> None:
            await asyncio.sleep(FOREIGN_POLL_SECONDS)

        try:
            async for chunk in _follow(fd, start, end, self._size, status, wait):
                yield chunk
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return path.stat().st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _failure(error: BaseException | None) -> BaseException:
    if isinstance(error, Exception):
        return error
    return DownloadFailed("the download was cancelled")

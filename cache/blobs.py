"""Blobs: committed files, and downloads that any number of readers follow.

One download per digest, across every worker process sharing the cache root: the
writer holds an exclusive ``flock`` on ``tmp/<digest>.partial`` while it runs.
Readers never open a second upstream stream; they read the partial file as it
grows. Readers in the writer's own process are woken by the writer; readers in
other processes poll the file and test the lock to learn the writer has finished.

A reader never gets the last byte of what it asked for before the writer has
verified the whole blob (its fsync and rename into place follow without holding
readers up), so no client can receive a complete response of unverified content:
a failed download ends every response short.

When the file cannot be written (a full disk, a quota, an I/O error) the download
goes on in *pass-through*: with a size cap, space is first freed by eviction and
the write tried once more; then the partial file is removed, the writer keeps
hashing, and the bytes from that point on reach this process's readers through a
bounded buffer in memory (the writer waits for the slowest reader, so memory
stays bounded; readers still behind read the removed file through the descriptor
they hold). The last byte is still held back until the digest is verified, and
nothing is kept. Readers in other processes see the download abandoned and start
their own (pass-through too, as long as the disk is full). A pass-through
download nobody reads any more is stopped: there is nothing to keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Self

from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import Abandoned, DigestMismatch, DownloadFailed, SizeMismatch
from pullthrough.cache.evict import touch_if_stale
from pullthrough.cache.layout import Layout, fsync_dir, write_atomic
from pullthrough.cache.space import WriteFailures
from pullthrough.cache.storage import Tracker

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
FOREIGN_POLL_SECONDS = 0.01
STALE_TMP_SECONDS = 600
# Pass-through: how far the writer may run ahead of its slowest reader.
PASS_THROUGH_BUFFER = 8 << 20
# /proc/self/fd/N opens the very file descriptor N names, even once the file was
# removed: how a hit is served by path after the blob was evicted (Linux; where
# there is no /proc the path is used, and a hit evicted meanwhile is a 404).
_PROC_FD = Path("/proc/self/fd")
_HAVE_PROC_FD = _PROC_FD.is_dir()


class State(Enum):
    RUNNING = "running"
    VERIFIED = "verified"  # all bytes are in and hash right; being made durable
    COMMITTED = "committed"
    FAILED = "failed"


DONE = frozenset({State.VERIFIED, State.COMMITTED})
# Writes and reads up to this size happen on the event loop: a thread hop
# costs more than hashing or copying them (page cache, sub-millisecond).
INLINE_BYTES = 256 * 1024


class _Unwanted(DownloadFailed):
    """A pass-through download nobody reads any more: nothing to finish it for."""


def _lock_is_free(fd: int) -> bool:
    """True when no process holds the writer's exclusive lock on ``fd``'s file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


class OpenBlob:
    """A committed blob held open: eviction cannot take it from its reader."""

    def __init__(self, fd: int, size: int, path: Path) -> None:
        self.fd = fd
        self.size = size
        self.path = path
        # Closed when the answer is sent, or at the latest when this is dropped.
        self._closer = weakref.finalize(self, os.close, fd)

    @property
    def serve_path(self) -> Path:
        """A path that opens this very file, also after it was evicted (Linux)."""
        return _PROC_FD / str(self.fd) if _HAVE_PROC_FD else self.path

    @property
    def location(self) -> None:
        """Served from this machine's disk, never by redirect."""
        return None

    async def read(self, start: int, end: int) -> AsyncIterator[bytes]:
        """The bytes by ``pread`` (the routes send ``serve_path`` instead)."""
        pos = start
        while pos < end:
            chunk = await asyncio.to_thread(os.pread, self.fd, min(READ_CHUNK, end - pos), pos)
            if not chunk:
                raise DownloadFailed(f"{self.path} is shorter than {end} bytes")
            pos += len(chunk)
            yield chunk

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class BlobWriter:
    """The one writer of a digest: hashes everything, stores what the disk takes.

    ``written`` counts the bytes received and hashed, ``stored`` those in the
    partial file; they part only when a write failed. Its methods block on disk
    I/O: the store runs small writes on the event loop and large ones, fsync and
    rename in worker threads.
    """

    def __init__(self, layout: Layout, digest: Digest, fd: int | None) -> None:
        self._layout = layout
        self.digest = digest
        self._fd = fd  # None: nothing is being stored
        self._hasher = digest.hasher()
        self.expected_size: int | None = None
        self.written = 0
        self.stored = 0
        self._closed = fd is None

    def announce(self) -> None:
        """Record the size the upstream announced, for readers in other processes."""
        if self._fd is None:
            return
        text = "" if self.expected_size is None else str(self.expected_size)
        # Advisory, for readers in other processes; a crash loses nothing of value.
        write_atomic(
            self._layout.size_file(self.digest), self._layout.tmp, text.encode(), durable=False
        )

    def hash(self, chunk: bytes) -> None:
        self._hasher.update(chunk)
        self.written += len(chunk)

    def write(self, chunk: bytes) -> None:
        """Hash ``chunk`` and append it to the file; on OSError ``stored`` says
        how much of it got there."""
        start = self.written
        self.hash(chunk)
        self.store_rest(chunk, start)

    def store_rest(self, chunk: bytes, start: int) -> None:
        """Append what of ``chunk`` (received at offset ``start``) is not stored yet."""
        assert self._fd is not None
        view = memoryview(chunk)[self.stored - start :]
        while view:
            n = os.write(self._fd, view)
            self.stored += n
            view = view[n:]

    def verify(self) -> None:
        """Raise unless every byte came and they hash to the digest."""
        if self.expected_size is not None and self.written != self.expected_size:
            raise SizeMismatch(self.expected_size, self.written)
        actual = f"{self.digest.algorithm}:{self._hasher.hexdigest()}"
        if actual != str(self.digest):
            raise DigestMismatch(str(self.digest), actual)

    def persist(self) -> Path:
        """fsync, then rename into place: only then can anyone find it."""
        assert self._fd is not None
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
        assert self._fd is not None
        # Closing drops the flock: readers elsewhere now see the writer is gone.
        os.close(self._fd)
        self._fd = None


@dataclass(eq=False)
class Download:
    """A download this process runs, shared by every reader in this process."""

    writer: BlobWriter
    state: State = State.RUNNING
    error: BaseException | None = None
    size_known: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    _progress: asyncio.Event = field(default_factory=asyncio.Event)
    # Pass-through: the file holds bytes up to ``file_end``; the rest, up to
    # ``mem_end``, is in ``_buffer`` as (offset, bytes) until every reader had it.
    passthrough: bool = False
    file_end: int = 0
    mem_end: int = 0
    freed_space: bool = False  # eviction was asked once already
    _buffer: deque[tuple[int, bytes]] = field(default_factory=deque)
    _buffered: int = 0
    _readers: dict[object, int] = field(default_factory=dict)  # reader -> position
    _room: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def written(self) -> int:
        return self.writer.written

    @property
    def size(self) -> int | None:
        return self.writer.expected_size

    def available(self) -> int:
        """Bytes a reader may have (before the last one is held back)."""
        return self.mem_end if self.passthrough else self.writer.stored

    def notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def progress_event(self) -> asyncio.Event:
        return self._progress

    # -- pass-through ---------------------------------------------------------------

    def switch_to_memory(self, tail_offset: int, tail: bytes) -> None:
        """From now on bytes past ``file_end`` are in memory, starting with ``tail``."""
        self.passthrough = True
        self.file_end = self.mem_end = self.writer.stored
        assert tail_offset == self.file_end
        self._append(tail)

    def _append(self, data: bytes) -> None:
        if data:
            self._buffer.append((self.mem_end, data))
            self._buffered += len(data)
            self.mem_end += len(data)

    async def push(self, data: bytes) -> None:
        """Hand ``data`` to the readers; wait while the slowest is too far behind."""
        self._append(data)
        self._trim()  # readers that joined further on never need what is before them
        self.notify()
        while self._buffered > PASS_THROUGH_BUFFER and self._readers:
            self._room = asyncio.Event()
            await self._room.wait()

    def from_memory(self, pos: int, stop: int) -> bytes:
        for offset, data in self._buffer:
            if offset <= pos < offset + len(data):
                return data[pos - offset : min(stop, offset + len(data)) - offset]
        raise DownloadFailed(f"byte {pos} of {self.writer.digest} is no longer in memory")

    @property
    def readers(self) -> int:
        return len(self._readers)

    def advance(self, reader: object, pos: int) -> None:
        """Where ``reader`` is; bytes every reader has passed leave memory."""
        self._readers[reader] = pos
        self._trim()

    def leave(self, reader: object) -> None:
        if self._readers.pop(reader, None) is None:
            return
        self._trim()
        idle = self.passthrough and not self._readers and self.state is State.RUNNING
        if idle and self.task is not None:
            self.task.cancel()  # nothing will be kept and nobody reads: stop fetching

    def _trim(self) -> None:
        low = min(self._readers.values(), default=self.mem_end)
        while self._buffer and self._buffer[0][0] + len(self._buffer[0][1]) <= low:
            self._buffered -= len(self._buffer.popleft()[1])
        if self._buffered <= PASS_THROUGH_BUFFER:
            self._room.set()


class BlobSink:
    """What a fetch function gets: announce the size, then write chunks."""

    def __init__(self, store: BlobStore, download: Download) -> None:
        self._store = store
        self._download = download

    async def begin(self, size: int | None) -> None:
        download = self._download
        writer = download.writer
        writer.expected_size = size
        try:
            if not download.passthrough:
                # A few bytes, no fsync.
                await self._keep(writer.announce, writer.announce, inline=True, tail=b"")
        finally:
            download.size_known.set()

    async def write(self, chunk: bytes) -> None:
        download = self._download
        writer = download.writer
        inline = len(chunk) <= INLINE_BYTES
        if download.passthrough:
            if inline:
                writer.hash(chunk)
            else:
                await asyncio.to_thread(writer.hash, chunk)
            await download.push(chunk)
            return
        start = writer.written

        def tail() -> bytes:
            return chunk[writer.stored - start :]

        if await self._keep(
            lambda: writer.write(chunk), lambda: writer.store_rest(chunk, start), inline, tail
        ):
            download.notify()
        else:
            await download.push(b"")  # the tail is in memory: wait like any write

    async def _keep(
        self,
        first: Callable[[], None],
        again: Callable[[], None],
        inline: bool,
        tail: bytes | Callable[[], bytes],
    ) -> bool:
        """Run a write; on failure free space once (with a size cap) and retry.
        False when it gave up: the download is in pass-through from then on."""
        try:
            if inline:
                first()
            else:
                await asyncio.to_thread(first)
            return True
        except OSError as exc:
            error = exc
        download = self._download
        on_full = self._store.on_full
        if error.errno == errno.ENOSPC and on_full is not None and not download.freed_space:
            download.freed_space = True
            writer = download.writer
            left = (writer.expected_size or writer.written) - writer.stored
            if await asyncio.to_thread(on_full, max(left, 1)) > 0:
                try:
                    await asyncio.to_thread(again)
                    return True
                except OSError as exc:
                    error = exc
        await self._store.pass_through(download, error, tail if isinstance(tail, bytes) else tail())
        return False


Fetch = Callable[[BlobSink], Awaitable[None]]


class BlobStore:
    def __init__(
        self,
        layout: Layout,
        *,
        read_timeout: float = 60.0,
        on_commit: Callable[[], None] = lambda: None,
        failures: WriteFailures | None = None,
        on_full: Callable[[int], int] | None = None,
    ) -> None:
        """``on_full(bytes)`` is called (in a thread) when the disk is full, to
        free at least that much by eviction; it returns the bytes freed."""
        self.layout = layout
        self._read_timeout = read_timeout
        self._on_commit = on_commit
        self.failures = failures or WriteFailures()
        self.on_full = on_full
        self._downloads: dict[Digest, Download] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def stat(self, digest: Digest) -> int | None:
        """The committed blob's size, or None (inline: a stat costs less than a
        thread hop)."""
        return self.stat_now(digest)

    def stat_now(self, digest: Digest) -> int | None:
        """``stat`` for blocking callers."""
        try:
            return self.layout.blob(digest).stat().st_size
        except FileNotFoundError:
            return None

    async def hit(self, digest: Digest) -> int | None:
        """Like ``stat``, and records the use for eviction."""
        path = self.layout.blob(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        touch_if_stale(path, st.st_mtime)
        return st.st_size

    async def open(self, digest: Digest) -> OpenBlob | None:
        """The committed blob, held open, its use recorded; None when not cached.

        Opening is the check: eviction between a check and an open cannot happen,
        and once open the bytes stay readable however long the answer takes.
        """
        path = self.layout.blob(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            touch_if_stale(fd, st.st_mtime)
        except BaseException:
            os.close(fd)
            raise
        return OpenBlob(fd, st.st_size, path)

    async def remove(self, digest: Digest) -> bool:
        """Remove the committed blob; True when there was one. A reader holding
        it open keeps its bytes (POSIX frees them with the last descriptor)."""
        try:
            self.layout.blob(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    async def digests(self) -> AsyncIterator[Digest]:
        for kind, digest, _, _ in self.layout.walk():
            if kind == "blob":
                yield digest

    async def state(self) -> str:
        """ "writable", "full" (no space: served, not kept) or "not writable"."""
        state = await asyncio.to_thread(self.layout.probe)
        if state == "writable" and self.failures.full:
            return "full"  # a blob did not fit since the last one that did
        return state

    async def track(
        self, digest: Digest, fetch: Fetch, *, committed: bool = False
    ) -> Tracker | None:
        """Follow the download of ``digest``, starting it here if nobody runs one.

        Returns None when the blob is already committed, or with ``committed`` a
        tracker that reads the committed file.
        """
        download = self._downloads.get(digest)
        if download is not None:
            fd = _open_current(self.layout, digest)
            return _LocalTracker(download, fd, joined=True)
        try:
            writer = self._claim(digest)
        except OSError as exc:
            # Not even an empty file can be made: straight through, from the start.
            self.failures.record(f"blob {digest}", exc)
            download = Download(BlobWriter(self.layout, digest, None), passthrough=True)
            return self._start(download, fetch, fd=None)
        if writer is None:
            if self.stat_now(digest) is not None and not committed:
                return None
            # Someone else writes it (or wrote it): follow the file.
            return _ForeignTracker(self.layout, digest, self._read_timeout)
        download = Download(writer)
        self._downloads[digest] = download
        fd = os.open(self.layout.partial(digest), os.O_RDONLY | os.O_CLOEXEC)
        return self._start(download, fetch, fd=fd)

    def _start(self, download: Download, fetch: Fetch, fd: int | None) -> Tracker:
        digest = download.writer.digest
        tracker = _LocalTracker(download, fd, joined=False)
        task = asyncio.create_task(self._run(download, fetch), name=f"download {digest}")
        download.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return tracker

    async def pass_through(self, download: Download, error: OSError, tail: bytes) -> None:
        """The file cannot be written: go on in memory, remove the file, keep nothing."""
        writer = download.writer
        download.switch_to_memory(writer.stored, tail)
        if self._downloads.get(writer.digest) is download:
            del self._downloads[writer.digest]  # nobody new joins: they start afresh
        self.failures.record(f"blob {writer.digest}", error)
        await asyncio.shield(asyncio.to_thread(writer.abort))
        download.notify()
        if not download.readers:
            raise _Unwanted(f"{writer.digest} cannot be kept and nobody is reading it")

    async def _run(self, download: Download, fetch: Fetch) -> None:
        writer = download.writer
        try:
            try:
                await fetch(BlobSink(self, download))
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
                if isinstance(exc, _Unwanted):
                    log.debug("stopped %s", exc)
                else:
                    log.warning("download of %s failed: %s", writer.digest, exc)
                return
            # Verified: readers may have their last byte now; durability (fsync,
            # rename) follows without holding them up, and nothing can find the
            # blob in the cache before it is durable.
            download.state = State.VERIFIED
            download.notify()
            if download.passthrough:
                return  # served, and nothing to keep
            try:
                await asyncio.to_thread(writer.persist)
            except OSError as exc:
                self.failures.record(f"blob {writer.digest}", exc)
                await asyncio.to_thread(writer.abort)
                return
            download.state = State.COMMITTED
            self.failures.committed()
            self._on_commit()
        finally:
            if self._downloads.get(writer.digest) is download:
                del self._downloads[writer.digest]
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
        if self.stat_now(digest) is not None:
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
            if self.stat_now(digest) is not None:
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
    """A download this process runs: the writer wakes us after every chunk.

    It holds the partial file open from the start (``fd``; None when the download
    never had a file), so it can still read what reached the disk once the
    download switched to pass-through and removed the file.
    """

    def __init__(self, download: Download, fd: int | None, *, joined: bool) -> None:
        self.joined = joined
        self._download = download
        self._fd = fd
        # A reader pins memory from where it stands: until it says where it
        # starts, that is the beginning. The key is not the tracker itself, so
        # that a tracker dropped unread is collected and lets go (the finalizer).
        self._key = object()
        download.advance(self._key, 0)
        self._finalizer = weakref.finalize(self, _let_go, download, self._key, fd)

    async def size(self) -> int | None:
        await self._download.size_known.wait()
        if self._download.state is State.FAILED and self._download.written == 0:
            raise _failure(self._download.error)
        return self._download.size

    def close(self) -> None:
        self._finalizer()

    async def read(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        download = self._download
        pos = start
        download.advance(self._key, pos)
        try:
            while True:
                event = download.progress_event()
                if download.state is State.FAILED:
                    raise _failure(download.error)
                have = download.available()
                target = end if end is not None else download.size
                if download.state in DONE:
                    stop = have if target is None else min(target, have)
                else:
                    # The last byte waits for the verdict on the whole blob.
                    stop = min(have, (have if target is None else target) - 1)
                if pos < stop:
                    chunk = await self._chunk(pos, stop)
                    pos += len(chunk)
                    download.advance(self._key, pos)
                    yield chunk
                elif download.state in DONE:
                    return
                else:
                    await event.wait()
        finally:
            self.close()

    async def _chunk(self, pos: int, stop: int) -> bytes:
        download = self._download
        on_disk = download.file_end if download.passthrough else stop
        if pos >= on_disk:
            return download.from_memory(pos, stop)
        if self._fd is None:
            raise DownloadFailed(f"{download.writer.digest} has no file to read from")
        count = min(READ_CHUNK, on_disk - pos, stop - pos)
        if count <= INLINE_BYTES:
            chunk = os.pread(self._fd, count, pos)
        else:
            chunk = await asyncio.to_thread(os.pread, self._fd, count, pos)
        if not chunk:
            raise DownloadFailed("the file being followed was truncated")
        return chunk


def _let_go(download: Download, reader: object, fd: int | None) -> None:
    """A local reader is done: close its file, release what it pinned."""
    if fd is not None:
        os.close(fd)
    download.leave(reader)


class _ForeignTracker:
    """A download another process runs: learn its progress from the file system."""

    joined = True

    def close(self) -> None:
        """Nothing is held before ``read``, which releases what it opens."""

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
                raise Abandoned(f"the download of {self._digest} stopped")
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
            raise Abandoned(f"the download of {self._digest} was abandoned")

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

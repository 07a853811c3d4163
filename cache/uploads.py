"""Blob upload sessions of hosted repositories: bytes go to a temp file, hashed
while written, and are committed into the shared blob store by one rename.

On disk, beside the cache's own folders::

    <root>/uploads/<id>          the bytes received so far (its size is the offset)
    <root>/uploads/<id>.repo     the repository the session was opened for

A session lives on disk, so a chunk may reach any worker process; the running
hash lives in the memory of the process that wrote the bytes before, and is
rebuilt from the file when another one commits. Sessions idle longer than the
expiry are removed by ``expire``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import CacheError, DigestMismatch
from pullthrough.cache.layout import Layout, fsync_dir

if TYPE_CHECKING:
    from hashlib import _Hash

# Bytes gathered before one write (in a worker thread).
WRITE_BATCH = 1 << 20
_ID_LENGTH = 32


class UploadUnknown(CacheError):
    """No such session (never opened, finished, expired, or another repository's)."""


class UploadTooLarge(CacheError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"uploads are limited to {limit} bytes")
        self.limit = limit


class OffsetMismatch(CacheError):
    """A chunk that does not start where the session's bytes end."""

    def __init__(self, expected: int, given: int) -> None:
        super().__init__(f"chunk starts at {given}, the upload has {expected} bytes")
        self.expected = expected
        self.given = given


@dataclass
class _Running:
    hasher: _Hash
    offset: int


class UploadStore:
    def __init__(self, layout: Layout, *, max_size: int, expiry: float) -> None:
        self.layout = layout
        self.folder = layout.root / "uploads"
        self.max_size = max_size
        self.expiry = expiry
        self._running: dict[str, _Running] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.folder.mkdir(parents=True, exist_ok=True)

    def _paths(self, upload: str) -> tuple[Path, Path]:
        return self.folder / upload, self.folder / f"{upload}.repo"

    def start(self, repository: str) -> str:
        upload = secrets.token_hex(_ID_LENGTH // 2)
        data, meta = self._paths(upload)
        data.touch(exist_ok=False)
        meta.write_text(repository)
        self._running[upload] = _Running(hashlib.sha256(), 0)
        return upload

    def offset(self, upload: str, repository: str) -> int:
        """Bytes received so far; UploadUnknown for a session that is not this repository's."""
        if len(upload) != _ID_LENGTH or not all(c in "0123456789abcdef" for c in upload):
            raise UploadUnknown(upload)
        data, meta = self._paths(upload)
        try:
            if meta.read_text() != repository:
                raise UploadUnknown(upload)
            return data.stat().st_size
        except FileNotFoundError:
            raise UploadUnknown(upload) from None

    async def append(
        self, upload: str, repository: str, chunks: AsyncIterator[bytes], start: int | None
    ) -> int:
        """Write a chunk at the end; ``start`` (from Content-Range) must be that end.
        Returns the new size. One writer per session at a time in this process."""
        lock = self._locks.setdefault(upload, asyncio.Lock())
        async with lock:
            size = self.offset(upload, repository)
            if start is not None and start != size:
                raise OffsetMismatch(size, start)
            running = self._running.get(upload)
            if running is not None and running.offset != size:
                running = None  # another process wrote too: rehash at commit
                self._running.pop(upload, None)
            data, _ = self._paths(upload)
            # Opened here, not in a thread: a cancellation (the client went away)
            # while a thread opens it would leak the descriptor.
            fd = os.open(data, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            batch = bytearray()
            try:
                async for chunk in chunks:
                    if size + len(batch) + len(chunk) > self.max_size:
                        raise UploadTooLarge(self.max_size)
                    batch += chunk
                    if len(batch) >= WRITE_BATCH:
                        pending = bytes(batch)
                        batch.clear()  # a failed write must not be written again below
                        size += await asyncio.to_thread(_write, fd, pending, running)
            finally:
                try:
                    # Also when the client went away midway: what came is kept,
                    # and the upload resumes from there.
                    if batch:
                        size += await asyncio.to_thread(_write, fd, bytes(batch), running)
                finally:
                    os.close(fd)
            return size

    def commit(self, upload: str, repository: str, digest: Digest) -> int:
        """Verify the bytes against ``digest`` and move them into the blob store
        (blocking). A mismatch ends the session. Returns the blob's size."""
        size = self.offset(upload, repository)
        data, meta = self._paths(upload)
        running = self._running.pop(upload, None)
        if digest.algorithm == "sha256" and running is not None and running.offset == size:
            actual = running.hasher.hexdigest()
        else:
            hasher = digest.hasher()
            with data.open("rb") as f:
                while block := f.read(WRITE_BATCH):
                    hasher.update(block)
            actual = hasher.hexdigest()
        if actual != digest.hex:
            self.cancel(upload, repository)
            raise DigestMismatch(str(digest), f"{digest.algorithm}:{actual}")
        final = self.layout.blob(digest)
        if final.exists():
            data.unlink(missing_ok=True)  # content-addressed: the same bytes are there
        else:
            with data.open("rb") as f:
                os.fsync(f.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            data.rename(final)
            fsync_dir(final.parent)
        meta.unlink(missing_ok=True)
        self._locks.pop(upload, None)
        return size

    def cancel(self, upload: str, repository: str) -> None:
        self.offset(upload, repository)
        for path in self._paths(upload):
            path.unlink(missing_ok=True)
        self._running.pop(upload, None)
        self._locks.pop(upload, None)

    def expire(self, now: float | None = None) -> int:
        """Remove sessions idle longer than the expiry (blocking); how many went."""
        now = time.time() if now is None else now
        removed = 0
        for meta in self.folder.glob("*.repo"):
            data = meta.with_suffix("")
            try:
                last = max(meta.stat().st_mtime, data.stat().st_mtime)
            except FileNotFoundError:
                last = 0.0
            if now - last > self.expiry:
                data.unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
                self._running.pop(data.name, None)
                removed += 1
        return removed


def _write(fd: int, data: bytes, running: _Running | None) -> int:
    """Append ``data``; the running hash takes exactly what reached the file, so
    it stays true to the file even when a write fails midway."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if running is not None:
            running.hasher.update(view[:n])
            running.offset += n
        view = view[n:]
    return len(data)

"""The storage seam: what the mirror needs from a blob store, a manifest store and
a tag index, as Protocols any backend can implement.

The filesystem classes (``cache/blobs.py``, ``cache/manifests.py``,
``cache/index.py``) are the default backend; ``cache/s3.py`` keeps blobs and
manifests in S3-compatible object storage. ``tests/contract/`` is the suite every
backend must pass. Lookups are coroutines (an object store answers over the
network; the filesystem's answer inline, without a thread hop). Like
distribution's storage driver, a download is
written through one writer that either commits (every byte came and hashes to
the digest) or leaves nothing behind; unlike it, readers follow a download
while it is written, so concurrent misses cost one upstream fetch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Protocol

from pullthrough.cache.digests import Digest
from pullthrough.cache.index import Listing, TagEntry
from pullthrough.cache.manifests import StoredManifest
from pullthrough.cache.quarantine import Corrupt


class DownloadSink(Protocol):
    """Where a fetch function writes a download: the size first, then the bytes.

    The store verifies what it got once the fetch returns and commits it only then;
    a fetch that raises (or bytes that do not hash to the digest) leave nothing."""

    async def begin(self, size: int | None) -> None: ...

    async def write(self, chunk: bytes) -> None: ...


Fetch = Callable[[DownloadSink], Awaitable[None]]


class Tracker(Protocol):
    """A blob being downloaded, seen by one reader."""

    # True when this reader joined a download someone else had started.
    joined: bool

    async def size(self) -> int | None:
        """Wait for the upstream's answer; raise what the download failed with."""

    def read(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        """Bytes ``start`` to ``end`` (exclusive; None: to the end) as they arrive.

        The last byte asked for comes only once the whole blob is verified: a
        failed download ends every read short, with the download's error."""

    def close(self) -> None:
        """This reader is done (also when it never read): let the download forget it."""


class HeldBlob(Protocol):
    """A committed blob held for one answer: removal cannot take it away.

    It is served one of three ways, the first that applies: a redirect to
    ``location`` (object storage with ``redirect = true``), the local file at
    ``serve_path`` (sendfile), or the bytes ``read`` gives."""

    size: int

    @property
    def location(self) -> str | None:
        """A URL clients may fetch the blob from themselves (presigned), or None."""

    @property
    def serve_path(self) -> Path | None:
        """A local path that opens this very blob while it is held, or None."""

    def read(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``start`` to ``end`` (exclusive)."""

    def close(self) -> None: ...


class BlobStorage(Protocol):
    async def stat(self, digest: Digest) -> int | None:
        """The committed blob's size, or None when it is not committed."""

    async def hit(self, digest: Digest) -> int | None:
        """Like ``stat``, and records the use (for eviction)."""

    async def open(self, digest: Digest) -> HeldBlob | None:
        """The committed blob held open, its use recorded; None when not there."""

    async def track(
        self, digest: Digest, fetch: Fetch, *, committed: bool = False
    ) -> Tracker | None:
        """Follow the download of ``digest``, starting ``fetch`` if nobody runs one
        (in this process or any other sharing the store). None when the blob is
        committed already, unless ``committed``: then a tracker reading it."""

    async def remove(self, digest: Digest) -> bool:
        """Remove a committed blob (readers holding it keep their bytes)."""

    def digests(self) -> AsyncIterator[Digest]:
        """Every committed blob."""

    async def state(self) -> str:
        """ "writable", "full" (served, not kept) or "not writable"."""

    async def settle(self) -> None:
        """Wait for the downloads running now to finish (committed or not)."""

    async def close(self) -> None:
        """Stop the downloads still running; they leave nothing behind."""


class ManifestStorage(Protocol):
    async def get(self, digest: Digest) -> StoredManifest | None:
        """The manifest, verified; None when absent or found corrupt (then set aside)."""

    async def put(self, manifest: StoredManifest) -> None:
        """Store a manifest whose bytes hash to its digest (DigestMismatch otherwise)."""

    def read(self, digest: Digest, *, touch: bool = True) -> StoredManifest | None:
        """``get`` for blocking callers (the command line, background jobs)."""

    def check(
        self, digest: Digest, *, touch: bool = False, log: bool = True
    ) -> StoredManifest | Corrupt | None:
        """Read from storage (never from memory) and verify; say what is corrupt."""


class TagStorage(Protocol):
    """Which digest a tag pointed to, per upstream and Accept set; tag list pages; pins."""

    async def get(
        self, upstream: str, repository: str, tag: str, accept: str
    ) -> TagEntry | None: ...

    async def put(
        self, upstream: str, repository: str, tag: str, accept: str, entry: TagEntry
    ) -> None: ...

    async def get_listing(self, upstream: str, repository: str, query: str) -> Listing | None: ...

    async def put_listing(
        self, upstream: str, repository: str, query: str, listing: Listing
    ) -> None: ...

    def tags(self) -> Iterator[tuple[str, str, str, str, TagEntry]]:
        """Every (upstream, repository, tag, accept, entry) recorded."""

    def rekey(self, names: dict[str, str]) -> int:
        """Move what is recorded under an upstream's URL to its name (URL -> name)."""

    def pins(self) -> set[str]: ...

    def set_pins(self, pins: set[str]) -> None: ...

    def close(self) -> None: ...

"""Manifests: small, immutable, content-addressed files read whole into memory.

Every read from disk is verified (a manifest is a few KiB: hashing it costs less
than the read): one whose bytes no longer hash to its name is moved to the
quarantine and reported as absent, so the mirror fetches it again instead of
serving corrupt content under its digest.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import LRUCache

from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import DigestMismatch
from pullthrough.cache.evict import TOUCH_SECONDS, touch_if_stale
from pullthrough.cache.layout import Layout, write_atomic
from pullthrough.cache.mediatypes import MEDIA_TYPE
from pullthrough.cache.quarantine import Corrupt, quarantine, report
from pullthrough.cache.space import WriteFailures


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: Digest
    media_type: str
    data: bytes


# Manifests are immutable by digest, so a copy in memory is never stale; this bounds it.
MEMORY_BYTES = 16 << 20


class ManifestStore:
    """``manifests/<alg>/<xx>/<hex>``: a line with the media type, then the bytes.

    The most recently used ones are also kept in memory (``MEMORY_BYTES``), so a
    hot manifest costs no thread hop and no file read.
    """

    def __init__(
        self,
        layout: Layout,
        *,
        memory_bytes: int = MEMORY_BYTES,
        on_corrupt: Callable[[], None] = lambda: None,
        failures: WriteFailures | None = None,
    ) -> None:
        self.layout = layout
        self._on_corrupt = on_corrupt
        self.failures = failures or WriteFailures()
        self._memory: LRUCache[Digest, StoredManifest] = LRUCache(
            maxsize=memory_bytes, getsizeof=lambda m: len(m.data) + 256
        )
        self._touched: dict[Digest, float] = {}

    def read(self, digest: Digest, *, touch: bool = True) -> StoredManifest | None:
        """Blocking; ``get`` is the same off the event loop. None: not cached, or
        corrupt (then quarantined)."""
        found = self.check(digest, touch=touch)
        return found if isinstance(found, StoredManifest) else None

    def check(
        self, digest: Digest, *, touch: bool = False, log: bool = True
    ) -> StoredManifest | Corrupt | None:
        """Read ``digest`` from disk (never from memory) and verify it; a corrupt
        one is quarantined, counted and (``log``) logged. None: not on disk."""
        path = self.layout.manifest(digest)
        try:
            with path.open("rb") as f:
                raw = f.read()
                st = os.fstat(f.fileno())
        except FileNotFoundError:
            return None
        media_type, newline, data = raw.partition(b"\n")
        problem = damage(digest, media_type, newline, data)
        if problem is not None:
            moved = quarantine(self.layout, "manifest", digest, path, st.st_ino)
            found = Corrupt("manifest", digest, problem, moved)
            if log:
                report(found)
            self._on_corrupt()
            return found
        if touch:  # a use, for eviction; listing the cache is not one
            touch_if_stale(path, st.st_mtime)
        return StoredManifest(digest, media_type.decode("ascii"), data)

    def write(self, manifest: StoredManifest) -> None:
        """Blocking; ``put`` is the same off the event loop."""
        actual = Digest.of(manifest.data, manifest.digest.algorithm)
        if actual != manifest.digest:
            raise DigestMismatch(str(manifest.digest), str(actual))
        if "\n" in manifest.media_type:
            raise ValueError("a media type has no newline")
        record = manifest.media_type.encode() + b"\n" + manifest.data
        write_atomic(self.layout.manifest(manifest.digest), self.layout.tmp, record)

    async def get(self, digest: Digest) -> StoredManifest | None:
        found = self._memory.get(digest)
        if found is not None:
            now = time.time()
            if now - self._touched.get(digest, 0.0) > TOUCH_SECONDS:
                # Still a use, for eviction on disk: recorded once a minute at most.
                self._touched[digest] = now
                touch_if_stale(self.layout.manifest(digest), 0.0, now)
            return found
        found = await asyncio.to_thread(self.read, digest)
        if found is not None:
            self._remember(found)
        return found

    async def put(self, manifest: StoredManifest) -> None:
        """Store a manifest after checking its bytes hash to its digest.

        One the disk cannot take (full, read-only, failing) is still kept in
        memory, so it is answered now and from memory later; never half-written.
        """
        try:
            await asyncio.to_thread(self.write, manifest)
        except OSError as exc:
            self.failures.record(f"manifest {manifest.digest}", exc)
        self._remember(manifest)

    def _remember(self, manifest: StoredManifest) -> None:
        if len(self._touched) > 4 * len(self._memory) + 1024:
            self._touched = {d: t for d, t in self._touched.items() if d in self._memory}
        self._memory[manifest.digest] = manifest
        self._touched.setdefault(manifest.digest, time.time())


def damage(digest: Digest, media_type: bytes, newline: bytes, data: bytes) -> str | None:
    """What is wrong with a manifest record read from disk, or None.

    The digest covers the manifest's bytes; the media type line before them can
    only be checked for its shape (RFC 6838's type/subtype), so a flip that turns
    one letter into another there goes unseen.
    """
    if not newline:
        return "no media type line"
    if not MEDIA_TYPE.fullmatch(media_type):
        return "the media type line is damaged"
    actual = Digest.of(data, digest.algorithm)
    if actual != digest:
        return f"content hashes to {actual}"
    return None

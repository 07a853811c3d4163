"""Manifests: small, immutable, content-addressed files read whole into memory."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

from cachetools import LRUCache

from cache.digests import Digest
from cache.errors import DigestMismatch
from cache.evict import TOUCH_SECONDS, touch_if_stale
from cache.layout import Layout, write_atomic
from cache.space import WriteFailures


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
        failures: WriteFailures | None = None,
    ) -> None:
        self.layout = layout
        self.failures = failures or WriteFailures()
        self._memory: LRUCache[Digest, StoredManifest] = LRUCache(
            maxsize=memory_bytes, getsizeof=lambda m: len(m.data) + 256
        )
        self._touched: dict[Digest, float] = {}

    def read(self, digest: Digest, *, touch: bool = True) -> StoredManifest | None:
        """Blocking; ``get`` is the same off the event loop."""
        path = self.layout.manifest(digest)
        try:
            with path.open("rb") as f:
                raw = f.read()
                if touch:  # a use, for eviction; listing the cache is not one
                    touch_if_stale(path, os.fstat(f.fileno()).st_mtime)
        except FileNotFoundError:
            return None
        media_type, _, data = raw.partition(b"\n")
        return StoredManifest(digest, media_type.decode(), data)

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

"""Manifests: small, immutable, content-addressed files read whole into memory."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from cache.digests import Digest
from cache.errors import DigestMismatch
from cache.layout import Layout, write_atomic


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: Digest
    media_type: str
    data: bytes


class ManifestStore:
    """``manifests/<alg>/<xx>/<hex>``: a line with the media type, then the bytes."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def read(self, digest: Digest) -> StoredManifest | None:
        """Blocking; ``get`` is the same off the event loop."""
        try:
            raw = self.layout.manifest(digest).read_bytes()
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
        return await asyncio.to_thread(self.read, digest)

    async def put(self, manifest: StoredManifest) -> None:
        """Store a manifest after checking its bytes hash to its digest."""
        await asyncio.to_thread(self.write, manifest)

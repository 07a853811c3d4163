"""Fetching images into the cache through the mirrors (``pullthrough warm``).

What is already cached is not fetched again, so warming again after an
interruption carries on where it stopped. Progress goes to a ``Watcher``; this
module prints nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pullthrough.cache import graph
from pullthrough.cache.digests import Digest
from pullthrough.cache.manifests import StoredManifest
from pullthrough.metrics import Metrics
from pullthrough.proxy.config import Settings
from pullthrough.proxy.errors import RegistryError
from pullthrough.proxy.mirror import ACCEPT_ALL, Mirror
from pullthrough.proxy.names import ImageRef, Reference
from pullthrough.proxy.resources import Resources, open_mirrors

PARALLEL_DOWNLOADS = 4


@dataclass
class WarmSummary:
    images: int = 0
    failed: list[str] = field(default_factory=list)
    manifests: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    cached: int = 0
    cached_bytes: int = 0


class Watcher(Protocol):
    """Told what a warm does, as it does it."""

    def begin(self) -> None:
        """The mirrors are open: fetching begins."""

    def end(self) -> None:
        """Fetching is over (done or failed)."""

    def expect(self, more_bytes: int) -> None:
        """This many more bytes are to be fetched in all."""

    def started(self, label: str, size: int | None) -> int:
        """A blob download began; returns a key for the calls below."""

    def fetched(self, key: int, n: int) -> None:
        """``n`` more bytes of that blob arrived."""

    def finished(self, key: int, size: int) -> None:
        """That blob is in the cache, ``size`` bytes."""

    def failed(self, image: str, error: RegistryError) -> None:
        """An image could not be warmed; the others go on."""


async def warm(
    settings: Settings,
    refs: Sequence[str],
    *,
    platforms: frozenset[str] | None,
    watcher: Watcher,
) -> WarmSummary:
    """Fetch images into the cache, every platform or only ``platforms``."""
    summary = WarmSummary()
    async with open_mirrors(settings, Metrics()) as resources:
        watcher.begin()
        try:
            for raw in refs:
                try:
                    image = ImageRef.parse(raw)
                    await _warm_one(resources, image, platforms, watcher, summary)
                    summary.images += 1
                except RegistryError as exc:
                    summary.failed.append(raw)
                    watcher.failed(raw, exc)
        finally:
            watcher.end()
    return summary


async def _warm_one(
    resources: Resources,
    image: ImageRef,
    platforms: frozenset[str] | None,
    watcher: Watcher,
    summary: WarmSummary,
) -> None:
    mirror = resources.mirrors.find(image.upstream)
    if mirror is None:
        raise RegistryError(f"registry {image.upstream} is not configured")
    repo = image.repository
    top = await _manifest(mirror, repo, image.reference)
    if image.reference.tag is not None:
        await mirror.remember_for_everyone(repo, image.reference.tag, top)
    blobs: dict[Digest, int | None] = {}
    queue = [top]
    while queue:
        manifest = queue.pop()
        summary.manifests += 1
        for blob in graph.blobs(manifest):
            blobs.setdefault(blob.digest, blob.size)
        for child in graph.children(manifest):
            if platforms is None or graph.platform_wanted(child, platforms):
                queue.append(await _manifest(mirror, repo, Reference(digest=child.digest)))
    missing = {d: s for d, s in blobs.items() if await mirror.blob_hit(d) is None}
    for digest, size in blobs.items():
        if digest not in missing:
            summary.cached += 1
            summary.cached_bytes += size or 0
    watcher.expect(sum(s or 0 for s in missing.values()))
    gate = asyncio.Semaphore(PARALLEL_DOWNLOADS)

    async def fetch(digest: Digest, size: int | None) -> None:
        async with gate:
            key = watcher.started(f"{image.repository} {digest.hex[:12]}", size)
            tracker = await mirror.blob_download(repo, digest)
            got = 0
            if tracker is not None:
                await tracker.size()
                async for chunk in tracker.read(0, None):
                    got += len(chunk)
                    watcher.fetched(key, len(chunk))
            watcher.finished(key, size or got)
            summary.fetched += 1
            summary.fetched_bytes += got or size or 0

    await asyncio.gather(*(fetch(d, s) for d, s in missing.items()))
    await mirror.settle()  # what was fetched is durable before we say so


async def _manifest(mirror: Mirror, repository: str, reference: Reference) -> StoredManifest:
    answer = await mirror.manifest(repository, reference, ACCEPT_ALL, head=False)
    assert answer.data is not None  # a GET always carries the bytes
    return StoredManifest(Digest.parse(answer.digest), answer.media_type, answer.data)

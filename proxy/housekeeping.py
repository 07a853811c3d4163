"""Eviction in the background, and what pinned images protect from it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from cache.digests import Digest
from cache.errors import InvalidDigest
from cache.evict import Eviction, evict
from cache.graph import closure
from cache.index import TagIndex
from cache.layout import Layout
from cache.manifests import ManifestStore, StoredManifest
from metrics import Metrics
from proxy.config import Settings
from proxy.errors import RegistryError
from proxy.names import ImageRef

log = logging.getLogger(__name__)

EVICT_EVERY_SECONDS = 60.0
DAY = 86400.0


class Housekeeper:
    def __init__(
        self,
        settings: Settings,
        layouts: dict[str, Layout],
        tags: TagIndex,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.layouts = layouts  # by upstream name
        self.tags = tags
        self.metrics = metrics
        self._keys = {u.name: str(u.url) for u in settings.all_upstreams()}
        self._wake = asyncio.Event()

    @property
    def limited(self) -> bool:
        return self.settings.max_size is not None or self.settings.max_age_days is not None

    def distinct_layouts(self) -> list[Layout]:
        return list({layout.root: layout for layout in self.layouts.values()}.values())

    def pins(self) -> set[str]:
        return set(self.settings.pinned) | self.tags.pins()

    def resolve(self, image: ImageRef) -> list[StoredManifest]:
        """The cached top manifests an image reference names (one per Accept set seen)."""
        layout = self.layouts.get(image.upstream)
        if layout is None:
            return []
        store = ManifestStore(layout)
        digests: set[str] = set()
        if image.reference.digest is not None:
            digests.add(str(image.reference.digest))
        else:
            key = self._keys[image.upstream]
            for upstream, repository, tag, _, entry in self.tags.tags():
                if (upstream, repository, tag) == (key, image.repository, image.reference.tag):
                    digests.add(entry.digest)
        found = []
        for raw in sorted(digests):
            with contextlib.suppress(InvalidDigest):
                manifest = store.read(Digest.parse(raw))
                if manifest is not None:
                    found.append(manifest)
        return found

    def protected(self) -> set[Digest]:
        """Every manifest and blob a pinned image needs."""
        keep: set[Digest] = set()
        for pin in self.pins():
            try:
                image = ImageRef.parse(pin)
            except (RegistryError, InvalidDigest):
                log.warning("ignoring pin %r: not an image reference", pin)
                continue
            layout = self.layouts.get(image.upstream)
            if layout is None:
                continue
            store = ManifestStore(layout)
            for top in self.resolve(image):
                walked = closure(top, store.read)
                keep.update(m.digest for m in walked.manifests)
                keep.update(walked.blobs)
                keep.update(walked.missing_manifests)
        return keep

    def run_once(self, *, dry_run: bool = False, free_bytes: int = 0) -> Eviction | None:
        """One eviction pass (blocking). None when another process is at it."""
        max_age = self.settings.max_age_days
        result = evict(
            self.distinct_layouts(),
            max_size=self.settings.max_size,
            max_age_seconds=None if max_age is None else max_age * DAY,
            protected=self.protected(),
            dry_run=dry_run,
            free_bytes=free_bytes,
        )
        if result is not None and not dry_run and self.metrics is not None:
            for entry in result.removed:
                self.metrics.evictions.labels(entry.kind).inc()
            self.metrics.evicted_bytes.inc(result.freed)
        if result is not None and result.removed and not dry_run:
            log.info(
                "evicted %d objects (%d bytes); cache now %d bytes",
                len(result.removed),
                result.freed,
                result.total_after,
            )
        return result

    def free_space(self, need: int) -> int:
        """The disk is full and a download needs ``need`` more bytes: evict, least
        recently used first under the usual rules (pins, grace), until that much
        is freed. Blocking; returns the bytes freed.

        Only with a size cap: without one nothing was meant to be removed, and the
        download goes on without being kept.
        """
        if self.settings.max_size is None:
            return 0
        try:
            result = self.run_once(free_bytes=need)
        except OSError as exc:
            log.warning("eviction to free space failed: %s", exc)
            return 0
        return 0 if result is None else result.freed

    def poke(self) -> None:
        """Something was committed: check the limits soon."""
        self._wake.set()

    async def run_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), EVICT_EVERY_SECONDS)
            self._wake.clear()
            try:
                await asyncio.to_thread(self.run_once)
            except OSError as exc:
                log.warning("eviction failed: %s", exc)


def pin_all(tags: TagIndex, images: Iterable[str], *, remove: bool = False) -> set[str]:
    """Add (or remove) pins, stored with the cache; returns the pins now set."""
    pins = tags.pins()
    for raw in images:
        name = str(ImageRef.parse(raw))
        if remove:
            pins.discard(name)
            pins.discard(raw)
        else:
            pins.add(name)
    tags.set_pins(pins)
    return pins

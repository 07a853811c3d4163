"""Eviction in the background, and what pinned images protect from it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from functools import partial

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
        *,
        more_layouts: Sequence[Layout] = (),
    ) -> None:
        self.settings = settings
        self.layouts = layouts  # by upstream name
        # Stores no configured upstream uses (found on disk by the tools):
        # counted, collected and evicted, never read for an upstream's name.
        self.more_layouts = list(more_layouts)
        self.tags = tags
        self.metrics = metrics
        self._wake = asyncio.Event()

    @property
    def limited(self) -> bool:
        return self.settings.max_size is not None or self.settings.max_age_days is not None

    def distinct_layouts(self) -> list[Layout]:
        every = [*self.layouts.values(), *self.more_layouts]
        return list({layout.root: layout for layout in every}.values())

    def pins(self) -> set[str]:
        return set(self.settings.pinned) | self.tags.pins()

    def _tagged(self, image: ImageRef) -> set[str]:
        """Digests recorded for the image's tag by its upstream."""
        if image.reference.digest is not None:
            return {str(image.reference.digest)}
        return {
            entry.digest
            for upstream, repository, tag, _, entry in self.tags.tags()
            if (upstream, repository, tag)
            == (image.upstream, image.repository, image.reference.tag)
        }

    def resolve(self, image: ImageRef) -> list[tuple[StoredManifest, Layout]]:
        """The cached top manifests an image reference names (one per Accept set
        seen), with the store each is in: the upstream's own, else the shared
        one (content an anonymous pull of the same name put there)."""
        own = self.layouts.get(image.upstream)
        if own is None:
            return []
        shared = Layout(self.settings.cache_dir.resolve())
        return self._read(self._tagged(image), [own, shared])

    def _read(
        self, digests: set[str], layouts: Sequence[Layout]
    ) -> list[tuple[StoredManifest, Layout]]:
        found = []
        for raw in sorted(digests):
            with contextlib.suppress(InvalidDigest):
                digest = Digest.parse(raw)
                for layout in dict.fromkeys(layouts):
                    manifest = ManifestStore(layout).read(digest, touch=False)
                    if manifest is not None:
                        found.append((manifest, layout))
                        break
        return found

    def protected(self) -> set[Digest]:
        """Every manifest and blob a pinned image needs.

        Generous on purpose: a pin protects its repository and tag as recorded
        under any upstream (also one this process does not know, or an old
        URL key), in every store, so no attribution gap can cost a pin.
        """
        images = []
        for pin in self.pins():
            try:
                images.append(ImageRef.parse(pin))
            except (RegistryError, InvalidDigest):
                log.warning("ignoring pin %r: not an image reference", pin)
        tagged: dict[tuple[str, str], set[str]] = {}
        if any(image.reference.tag is not None for image in images):
            for _, repository, tag, _, entry in self.tags.tags():  # one pass for all pins
                tagged.setdefault((repository, tag), set()).add(entry.digest)
        keep: set[Digest] = set()
        everywhere = self.distinct_layouts()
        for image in images:
            if image.reference.digest is not None:
                digests = {str(image.reference.digest)}
            else:
                digests = tagged.get((image.repository, str(image.reference.tag)), set())
            for top, layout in self._read(digests, everywhere):
                walked = closure(top, partial(ManifestStore(layout).read, touch=False))
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

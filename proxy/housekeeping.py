"""Eviction: in the background for the server, one pass for ``pullthrough gc``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from pullthrough.cache.digests import Digest
from pullthrough.cache.evict import Eviction, evict
from pullthrough.metrics import Metrics
from pullthrough.proxy.config import Settings
from pullthrough.proxy.images import CachedImages

log = logging.getLogger(__name__)

EVICT_EVERY_SECONDS = 60.0
DAY = 86400.0


class Housekeeper:
    def __init__(
        self, settings: Settings, images: CachedImages, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.images = images  # the stores to keep in bounds, and what pins protect
        self.metrics = metrics
        self._wake = asyncio.Event()
        # More digests never to evict (the hosted repositories' content).
        self.keep_also: Callable[[], set[Digest]] = set

    @property
    def limited(self) -> bool:
        return self.settings.max_size is not None or self.settings.max_age_days is not None

    def run_once(self, *, dry_run: bool = False, free_bytes: int = 0) -> Eviction | None:
        """One eviction pass (blocking). None when another process is at it."""
        max_age = self.settings.max_age_days
        result = evict(
            self.images.distinct_layouts(),
            max_size=self.settings.max_size,
            max_age_seconds=None if max_age is None else max_age * DAY,
            protected=self.images.protected() | self.keep_also(),
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
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a
            # cancellation that arrives as the event is set (a commit poking
            # at shutdown), and the loop would then never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EVICT_EVERY_SECONDS):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await asyncio.to_thread(self.run_once)
            except OSError as exc:
                log.warning("eviction failed: %s", exc)

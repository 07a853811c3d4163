"""Eviction: in the background for the server, one pass for ``pullthrough gc``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from pullthrough.cache.digests import Digest
from pullthrough.cache.evict import Eviction, evict
from pullthrough.cache.s3_location import store_location
from pullthrough.metrics import Metrics
from pullthrough.proxy.config import Settings
from pullthrough.proxy.images import CachedImages

if TYPE_CHECKING:
    from pullthrough.cache.s3_evict import S3Eviction

log = logging.getLogger(__name__)

# S3 or Redis failing under an eviction pass on S3: the next pass tries again.
_S3_ERRORS: tuple[type[Exception], ...] = ()
with contextlib.suppress(ImportError):
    from botocore.exceptions import BotoCoreError, ClientError

    _S3_ERRORS = (BotoCoreError, ClientError)
_PASS_ERRORS: tuple[type[Exception], ...] = (OSError, RedisError, *_S3_ERRORS)

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

    def run_once(
        self, *, dry_run: bool = False, free_bytes: int = 0
    ) -> Eviction | S3Eviction | None:
        """One eviction pass (blocking). None when another process is at it."""
        max_age = self.settings.max_age_days
        result: Eviction | S3Eviction | None
        if self.settings.s3_location() is not None:
            result = self._evict_s3(dry_run)
        else:
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

    def _evict_s3(self, dry_run: bool) -> S3Eviction | None:
        """The stores' objects on S3 (a disk full of staging files is not freed
        by evicting from S3: ``free_bytes`` does not apply)."""
        from pullthrough.cache import s3_evict  # the s3 extra
        from pullthrough.cache.s3_admin import S3Admin

        location = self.settings.s3_location()
        assert location is not None
        root = self.images.root
        stores = {
            layout.root: S3Admin(store_location(location, root, layout.root))
            for layout in [self.images.shared, *self.images.distinct_layouts()]
        }
        # Pins name manifests on S3: walk them there.
        on_s3 = dataclasses.replace(self.images, s3=stores)
        max_age = self.settings.max_age_days
        try:
            return s3_evict.evict(
                stores.values(),
                redis_url=self.settings.redis_url,
                lock_dir=root,
                max_size=self.settings.max_size,
                max_age_seconds=None if max_age is None else max_age * DAY,
                protected=on_s3.protected() | self.keep_also(),
                dry_run=dry_run,
            )
        finally:
            for store in stores.values():
                store.close()

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
            except _PASS_ERRORS as exc:
                log.warning("eviction failed: %s", exc)

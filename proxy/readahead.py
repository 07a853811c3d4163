"""Read-ahead: fetch an image's config and layers once its manifest has been answered.

A client that got an image manifest asks for its blobs next, one (skopeo) or three
(dockerd) at a time, each a round trip to the upstream. Starting those downloads
when the manifest goes out means the client's own requests find them finished or
in flight and join them through the blob store's coalescing: nothing is fetched
twice, and nothing is fetched for an index's platforms nobody asked for (only an
image manifest a client requested starts read-ahead).

The policy is deliberately timid, as the bytes are a guess: a bounded number of
downloads per image and in total, none for an image larger than the cache cap,
and none at all for a while after the upstream answered 429 or 5xx (the client's
own requests still go through; read-ahead only ever adds requests).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pullthrough.cache import graph
from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import DownloadFailed
from pullthrough.cache.manifests import StoredManifest
from pullthrough.cache.storage import Tracker
from pullthrough.metrics import Metrics
from pullthrough.proxy.errors import RegistryError, TooManyRequests, UpstreamUnavailable

log = logging.getLogger(__name__)

# Blobs fetched ahead and not yet asked for that are remembered (to count their use
# and the bytes nobody asked for); past this, the oldest are forgotten.
REMEMBERED = 4096
# Manifests found complete in the cache are not checked again for this long: a
# cached manifest's answer must not cost a dozen stat calls every time.
COMPLETE_SECONDS = 60.0
# After a 429 or 5xx: no read-ahead for this long, doubled on each repeat.
BACKOFF_FIRST = 5.0
BACKOFF_MAX = 300.0

Start = Callable[[str, Digest], Awaitable[Tracker | None]]
Stat = Callable[[Digest], Awaitable[int | None]]


@dataclass(frozen=True, slots=True)
class ReadAheadSettings:
    enabled: bool = True
    per_image: int = 4
    total: int = 16
    max_size: int | None = None


class ReadAhead:
    """Read-ahead for one process: every mirror's images share the total bound."""

    def __init__(self, settings: ReadAheadSettings, metrics: Metrics) -> None:
        self.settings = settings
        self._metrics = metrics
        self._total = asyncio.Semaphore(settings.total)
        self._images: set[tuple[str, Digest]] = set()  # being read ahead now
        self._complete: OrderedDict[tuple[str, Digest], float] = OrderedDict()
        self._active: set[tuple[str, Digest]] = set()  # downloads read-ahead started
        self._unclaimed: OrderedDict[tuple[str, Digest], int] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._quiet_until = 0.0
        self._backoff = BACKOFF_FIRST

    def image(
        self, upstream: str, repository: str, manifest: StoredManifest, start: Start, stat: Stat
    ) -> None:
        """``manifest`` was just answered: fetch what it needs and the cache lacks.

        Returns at once; an index (no blobs of its own) starts nothing."""
        if not self.settings.enabled or time.monotonic() < self._quiet_until:
            return
        key = (upstream, manifest.digest)
        if key in self._images or self._recently_complete(key):
            return
        wanted = graph.blobs(manifest)
        if not wanted:
            return
        task = asyncio.create_task(
            self._read(key, repository, wanted, start, stat), name=f"read-ahead {manifest.digest}"
        )
        self._images.add(key)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def claim(self, upstream: str, digest: Digest) -> bool:
        """A client asks for ``digest``: True when read-ahead fetched or fetches it."""
        key = (upstream, digest)
        size = self._unclaimed.pop(key, None)
        if size is not None:
            self._metrics.prefetch_unclaimed_bytes.dec(size)
        elif key not in self._active:
            return False
        self._active.discard(key)
        self._metrics.prefetch_used.inc()
        return True

    async def settle(self) -> None:
        """Wait for the read-ahead running now to finish (tests, shutdown)."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _recently_complete(self, key: tuple[str, Digest]) -> bool:
        checked = self._complete.get(key)
        if checked is None:
            return False
        if time.monotonic() - checked > COMPLETE_SECONDS:
            del self._complete[key]
            return False
        return True

    async def _read(
        self,
        key: tuple[str, Digest],
        repository: str,
        wanted: list[graph.Descriptor],
        start: Start,
        stat: Stat,
    ) -> None:
        upstream = key[0]
        try:
            # A stat per blob, inline on the filesystem: a thread hop would let the
            # client's first blob request overtake the read-ahead it is meant to find.
            missing = await _missing(wanted, stat)
            if not missing:
                self._complete[key] = time.monotonic()
                while len(self._complete) > REMEMBERED:
                    self._complete.popitem(last=False)
                return
            declared = sum(d.size or 0 for d in missing)
            cap = self.settings.max_size
            if cap is not None and declared > cap:
                # It cannot all stay: fetching ahead would evict its own layers
                # before the client asks for them.
                log.info("no read-ahead for %s: %d bytes exceed max_size", key[1], declared)
                return
            queue = list(reversed(missing))  # config first, then layers in order

            async def worker() -> None:
                while queue and time.monotonic() >= self._quiet_until:
                    descriptor = queue.pop()
                    async with self._total:
                        await self._fetch(upstream, repository, descriptor, start)

            workers = min(self.settings.per_image, len(missing))
            await asyncio.gather(*(worker() for _ in range(workers)))
        finally:
            self._images.discard(key)

    async def _fetch(
        self, upstream: str, repository: str, descriptor: graph.Descriptor, start: Start
    ) -> None:
        key = (upstream, descriptor.digest)
        try:
            tracker = await start(repository, descriptor.digest)
        except RegistryError:
            return  # offline, say: the client will hear it from its own request
        if tracker is None:
            return  # cached meanwhile
        if not tracker.joined:
            self._active.add(key)
            self._metrics.prefetch_started.inc()
        try:
            size = await tracker.size()
            # Reading the last byte waits for the whole blob to be verified.
            begin = max(size - 1, 0) if size else 0
            async for _ in tracker.read(begin, None):
                pass
        except (TooManyRequests, UpstreamUnavailable) as exc:
            self._back_off(exc)
            self._active.discard(key)
            return
        except (DownloadFailed, RegistryError, OSError) as exc:
            log.info("read-ahead of %s failed: %s", descriptor.digest, exc)
            self._active.discard(key)
            return
        finally:
            tracker.close()
        self._backoff = BACKOFF_FIRST
        if key in self._active:  # not claimed by a client while it ran
            self._active.discard(key)
            got = size if size is not None else descriptor.size or 0
            self._unclaimed[key] = got
            self._metrics.prefetch_unclaimed_bytes.inc(got)
            while len(self._unclaimed) > REMEMBERED:
                self._metrics.prefetch_unclaimed_bytes.dec(self._unclaimed.popitem(last=False)[1])

    def _back_off(self, exc: RegistryError) -> None:
        retry_after = _seconds(exc.headers.get("Retry-After")) if exc.headers else None
        pause = retry_after if retry_after is not None else self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        self._quiet_until = time.monotonic() + min(pause, BACKOFF_MAX)
        self._metrics.prefetch_backoffs.inc()
        log.warning("read-ahead paused for %.0f s: %s", pause, exc)


async def _missing(wanted: list[graph.Descriptor], stat: Stat) -> list[graph.Descriptor]:
    seen: set[Digest] = set()
    out = []
    for descriptor in wanted:
        if descriptor.digest not in seen and await stat(descriptor.digest) is None:
            out.append(descriptor)
        seen.add(descriptor.digest)
    return out


def _seconds(value: str | None) -> float | None:
    try:
        return max(float(value), 0.0) if value else None
    except ValueError:
        return None  # an HTTP date: the doubling pause will do

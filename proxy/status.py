"""What the status page and its JSON show, read where /metrics and `pullthrough
cache ls` read it: one document, whichever worker answers.

- Counters: the text /metrics answers (the multiprocess registry), through
  ``metrics.summary.summarize``, which `pullthrough stats` uses as well.
- The last hour: ``metrics.history``, a file every worker samples into.
- Downloads running and recent errors: ``metrics.activity``, merged over workers.
- Cached images: ``CachedImages.rows`` (what `cache ls` prints), listed
  off the event loop at most every ``IMAGES_MAX_AGE`` seconds per worker and cut
  to ``MAX_IMAGES`` rows, as it walks every image on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

from aiohttp import web

from pullthrough.cache.listing import ImageRow
from pullthrough.metrics import Metrics
from pullthrough.metrics.activity import ErrorLog, LoggedError
from pullthrough.metrics.history import SAMPLE_SECONDS, Point
from pullthrough.metrics.shared import Shared
from pullthrough.metrics.summary import Summary, summarize
from pullthrough.proxy.config import Settings
from pullthrough.proxy.images import CachedImages
from pullthrough.proxy.mirror import PROBE_SECONDS, Mirrors
from pullthrough.proxy.ratelog import ThrottledLog

log = logging.getLogger(__name__)

IMAGES_MAX_AGE = 30.0
MAX_IMAGES = 2000
# How often a worker publishes its downloads' progress for the others.
PUBLISH_SECONDS = 1.0

# Which repositories a viewer may see: (upstream, repository) -> bool.
Visible = Callable[[str, str], bool]


def point(summary: Summary, when: float) -> Point:
    return Point(when, summary.hits, summary.answered, summary.saved_bytes, summary.upstream_bytes)


class ImageList:
    """The cached images, listed again once the last listing is ``max_age`` old
    (by one worker for all, with a ``shared`` directory)."""

    def __init__(
        self, images: CachedImages, shared: Path | None, max_age: float = IMAGES_MAX_AGE
    ) -> None:
        self._images = images
        self._listing = Shared(
            None if shared is None else shared / "status-images.json",
            max_age,
            dump=lambda rows: [asdict(r) for r in rows],
            load=lambda raw: [ImageRow(**r | {"platforms": tuple(r["platforms"])}) for r in raw],
        )
        self._lock = asyncio.Lock()

    def _list(self) -> list[ImageRow]:
        return self._images.rows()

    async def rows(self) -> tuple[float, list[ImageRow]]:
        """(when listed, rows)."""
        async with self._lock:  # one walk at a time, shared by concurrent pages
            return await asyncio.to_thread(self._listing.get, self._list)


@dataclass(frozen=True, slots=True)
class UpstreamView:
    name: str
    url: str
    state: str
    ratelimit_remaining: float | None
    ratelimit_limit: float | None


def upstream_states(shared: Path | None) -> Shared[dict[str, str]]:
    """Each upstream's state, as the last probe by any worker found it."""
    path = None if shared is None else shared / "status-upstreams.json"
    return Shared(path, PROBE_SECONDS, dump=dict, load=dict)


class Status:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        mirrors: Mirrors,
        images: ImageList,
        states: Shared[dict[str, str]],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.mirrors = mirrors
        self.images = images
        self.states = states

    async def _states(self) -> tuple[float, dict[str, str]]:
        """Probed by this worker (at most every PROBE_SECONDS) when no worker
        has lately: every page shows the same states."""
        fresh = await asyncio.to_thread(self.states.peek)
        if fresh is not None:
            return fresh
        mirrors = list(self.mirrors)
        probed = await asyncio.gather(*(m.upstream_state() for m in mirrors))
        found = {m.name: state for m, state in zip(mirrors, probed, strict=True)}
        return await asyncio.to_thread(self.states.put, found)

    async def document(
        self, visible: Visible, *, errors: bool = True, images: bool = True
    ) -> dict[str, object]:
        """Everything the page shows, as JSON; repositories ``visible`` refuses
        are left out, and the logged errors unless ``errors``, and the cached
        images unless ``images``."""
        text = await asyncio.to_thread(self.metrics.exposition)
        now = time.time()
        summary = summarize(text.decode())
        current = point(summary, now)
        window = await asyncio.to_thread(self.metrics.history.window, current)
        hour = current.minus(window[0])
        checked_at, states = await self._states()
        limits = {r.upstream: r for r in summary.ratelimits}
        upstreams = [
            UpstreamView(
                m.name,
                str(m.upstream.base),
                states.get(m.name, "unknown"),
                limits[m.name].remaining if m.name in limits else None,
                limits[m.name].limit if m.name in limits else None,
            )
            for m in self.mirrors
        ]
        downloads, logged = await asyncio.to_thread(self.metrics.activity.gather)
        listing = None
        if images:
            listed_at, rows = await self.images.rows()
            shown = [r for r in rows if visible(*_split(r.image))]
            listing = {
                "listed_at": listed_at,
                "count": len(shown),
                "rows": [_image(r) for r in shown[:MAX_IMAGES]],
            }
        max_size = self.settings.max_size
        return {
            "time": now,
            "since_start": summary.as_json(),
            "last_hour": {
                "seconds": hour.time,
                "hits": hour.hits,
                "answered": hour.answered,
                "hit_ratio": hour.hits / hour.answered if hour.answered else None,
                "saved_bytes": hour.saved_bytes,
                "upstream_bytes": hour.upstream_bytes,
            },
            "history": {
                "every_seconds": SAMPLE_SECONDS,
                "points": [
                    asdict(later.minus(earlier)) | {"end": later.time}
                    for earlier, later in itertools.pairwise(window)
                ],
            },
            "upstreams": [asdict(u) for u in upstreams],
            "upstreams_checked_at": checked_at,
            "downloads": [asdict(d) for d in downloads if visible(d.upstream, d.repository)],
            "cache": {
                "bytes": summary.cache_bytes,
                "blobs": summary.cache_blobs,
                "manifests": summary.cache_manifests,
                "max_size": max_size,
                "used": summary.cache_bytes / max_size if max_size else None,
            },
            "images": listing,
            "errors": _grouped(logged) if errors else None,
        }


def _grouped(logged: list[LoggedError]) -> list[dict[str, object]]:
    """The errors, newest first, those repeating an earlier message counted on it."""
    seen: dict[tuple[str, str], dict[str, object]] = {}
    for error in logged:
        entry = seen.setdefault((error.level, error.message), asdict(error) | {"count": 0})
        entry["count"] = cast(int, entry["count"]) + 1
    return list(seen.values())


def _split(image: str) -> tuple[str, str]:
    """(upstream, repository) of ``upstream/repository:tag`` as listings name them."""
    upstream, _, rest = image.partition("/")
    return upstream, rest.rpartition(":")[0]


def _image(row: ImageRow) -> dict[str, object]:
    return {
        "image": row.image,
        "digest": row.digest,
        "size": row.size,
        "platforms": list(row.platforms),
        "last_used": row.last_used,
        "pinned": row.pinned,
        "partial": not row.complete,
    }


@contextlib.asynccontextmanager
async def running(metrics: Metrics) -> AsyncIterator[None]:
    """While the server runs: keep the errors it logs, sample the counters into
    the shared history each minute, publish this worker's downloads each second."""
    handler = ErrorLog(metrics.activity)
    logging.getLogger("pullthrough").addHandler(handler)
    warn = ThrottledLog(log, interval=300.0)  # a read-only directory: not every second

    async def offer() -> None:
        try:
            text = await asyncio.to_thread(metrics.exposition, cache=False)
            summary = summarize(text.decode())
            await asyncio.to_thread(metrics.history.offer, point(summary, time.time()))
        except OSError as exc:
            warn.warning("history", "cannot record the status page's history: %s", exc)

    async def sample() -> None:
        while True:
            await asyncio.sleep(SAMPLE_SECONDS)
            await offer()

    # The first point before the first request: the last hour starts at the start.
    await offer()

    async def publish() -> None:
        while True:
            try:
                await asyncio.to_thread(metrics.activity.publish)
            except OSError as exc:
                warn.warning("publish", "cannot publish this worker's downloads: %s", exc)
            await asyncio.sleep(PUBLISH_SECONDS)

    tasks = [asyncio.create_task(sample()), asyncio.create_task(publish())]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        logging.getLogger("pullthrough").removeHandler(handler)
        with contextlib.suppress(OSError):
            metrics.activity.withdraw()


IMAGES = web.AppKey("status_images", ImageList)
STATES = web.AppKey("status_upstream_states", Shared[dict[str, str]])

"""Opening the mirrors and the stores they run on: the server and ``warm`` share it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from pullthrough.cache import stores
from pullthrough.cache.archive import remove_abandoned_imports
from pullthrough.cache.blobs import BlobStore
from pullthrough.cache.coordination import FetchLocks, LocalLocks
from pullthrough.cache.errors import StorageUnavailable
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore
from pullthrough.cache.redis_client import async_client
from pullthrough.cache.redis_locks import RedisLocks
from pullthrough.cache.redis_tags import RedisTags
from pullthrough.cache.s3_location import S3Location, store_location
from pullthrough.cache.space import WriteFailures
from pullthrough.cache.storage import BlobStorage, ManifestStorage
from pullthrough.metrics import Metrics
from pullthrough.proxy.config import Settings, UpstreamSettings
from pullthrough.proxy.housekeeping import Housekeeper
from pullthrough.proxy.images import (
    CachedImages,
    Tags,
    known_upstreams,
    open_tags,
    rekey_tags,
)
from pullthrough.proxy.mirror import Mirror, Mirrors
from pullthrough.proxy.readahead import ReadAhead, ReadAheadSettings
from pullthrough.proxy.upstream import (
    RateLimit,
    UpstreamClient,
    UpstreamOptions,
    new_redirect_session,
    new_session,
)

if TYPE_CHECKING:
    from pullthrough.cache.s3 import S3BlobStore, S3ManifestStore
    from pullthrough.cache.s3_admin import S3Admin

log = logging.getLogger(__name__)

# How long start-up may wait to learn the upstreams' auth challenges.
DISCOVER_SECONDS = 2.0


def layouts(settings: Settings) -> dict[str, Layout]:
    """Where each configured upstream's content lives, by upstream name (the rule
    is in cache/stores.py)."""
    pairs = ((up.name, up.has_credentials) for up in settings.all_upstreams())
    return stores.layouts(settings.cache_dir.resolve(), pairs)


def fetch_locks(settings: Settings) -> FetchLocks:
    """One upstream fetch per blob: across the nodes sharing ``redis_url``, else
    within this process. The caller closes it."""
    if settings.redis_url is None:
        return LocalLocks()
    lease = settings.fetch_lease
    return RedisLocks.from_url(settings.redis_url, lease_seconds=lease, renew_seconds=lease / 3)


def _upstream_client(
    up: UpstreamSettings,
    sessions: tuple[aiohttp.ClientSession, aiohttp.ClientSession],
    options: UpstreamOptions,
    metrics: Metrics,
) -> UpstreamClient:
    name = up.name

    def ratelimit(seen: RateLimit) -> None:
        metrics.ratelimit_limit.labels(name).set(seen.limit)
        metrics.ratelimit_remaining.labels(name).set(seen.remaining)
        if seen.remaining * 10 < seen.limit:
            log.warning("upstream %s: %d of %d pulls left", name, seen.remaining, seen.limit)

    return UpstreamClient(
        up,
        sessions[0],
        redirect_session=sessions[1],
        options=options,
        on_redirect=lambda status: metrics.upstream_redirects.labels(name, status).inc(),
        on_token=metrics.tokens_fetched.labels(name).inc,
        on_ratelimit=ratelimit,
        on_response=lambda method, status: metrics.upstream_requests.labels(
            name, method, str(status)
        ).inc(),
    )


async def _s3_stores(
    location: S3Location,
    layout: Layout,
    settings: Settings,
    locks: FetchLocks,
    on_corrupt: Callable[[], None],
    *,
    on_commit: Callable[[], None],
) -> tuple[S3BlobStore, S3ManifestStore]:
    """The blob and manifest stores of one S3 place; this node stages downloads
    under its cache's ``tmp/s3``. Uploads of downloads that died (on any node)
    are aborted once they are an hour old."""
    from pullthrough.cache.s3 import S3BlobStore, S3ManifestStore  # the s3 extra

    blobs = S3BlobStore(
        location,
        locks=locks,
        staging=layout.tmp / "s3",
        redirect=settings.redirect,
        on_commit=on_commit,  # the size limit is checked soon after
    )
    removed = blobs.remove_stale()
    try:
        removed += await blobs.clean_uploads()
    except StorageUnavailable as exc:
        log.warning("dead uploads not cleaned: %s", exc)  # the next start tries again
    if removed:
        log.info("removed %d staging files and dead uploads of %s", removed, location)
    return blobs, S3ManifestStore(location, on_corrupt=on_corrupt)


def _recording_uses(blobs: S3BlobStore, place: S3Location, settings: Settings) -> BlobStorage:
    """With ``redis_url``, blob hits are recorded where every node's eviction sees
    them (cache/s3_evict.py); without, eviction goes by write time."""
    if settings.redis_url is None:
        return blobs
    from pullthrough.cache.s3_evict import UsedBlobs, UseRecorder  # the s3 extra

    return UsedBlobs(blobs, UseRecorder(async_client(settings.redis_url), place))


async def _close_tags(tags: Tags) -> None:
    if isinstance(tags, RedisTags):
        await tags.aclose()  # its asyncio client too
    else:
        tags.close()


def _s3_admins(
    location: S3Location | None, root: Path, by_upstream: dict[str, Layout]
) -> dict[Path, S3Admin] | None:
    if location is None:
        return None
    from pullthrough.cache.s3_admin import S3Admin  # the s3 extra

    admins: dict[Path, S3Admin] = {}
    for layout in [Layout(root), *by_upstream.values()]:
        if layout.root not in admins:
            admins[layout.root] = S3Admin(store_location(location, root, layout.root))
    return admins


@dataclass
class Resources:
    """Everything a mirror runs on; the server and the command line share it."""

    mirrors: Mirrors
    images: CachedImages
    housekeeper: Housekeeper


@contextlib.asynccontextmanager
async def open_mirrors(settings: Settings, metrics: Metrics) -> AsyncIterator[Resources]:
    root = settings.cache_dir.resolve()
    by_upstream = layouts(settings)
    distinct = list({layout.root: layout for layout in by_upstream.values()}.values())
    for layout in distinct:
        layout.create()

    def count_failure(reason: str) -> None:
        metrics.cache_write_failures.labels(reason).inc()

    tags = open_tags(settings, WriteFailures(count_failure))
    try:
        moved = await asyncio.to_thread(rekey_tags, tags, known_upstreams(settings))
    except BaseException:  # Redis not answering, an unreadable index
        await _close_tags(tags)
        raise
    if moved:
        log.info("moved %d tag entries from upstream URLs to upstream names", moved)
    location = settings.s3_location()
    closing: list[Callable[[], None]] = []
    # What the status page lists: on S3, the stores' objects there.
    images = CachedImages(
        root, by_upstream, tags, settings.pinned, s3=_s3_admins(location, root, by_upstream)
    )
    for admin in (images.s3 or {}).values():
        closing.append(admin.close)
    housekeeper = Housekeeper(settings, images, metrics)
    opened: dict[Layout, tuple[BlobStorage, ManifestStorage]] = {}
    # One upstream fetch per blob on S3: across every node sharing redis_url.
    locks = fetch_locks(settings) if location is not None else None
    for layout in distinct:
        corrupt = metrics.corrupt_objects.labels("manifest").inc
        if location is not None:
            # A private upstream's store (upstreams/<name>) keeps that sub-prefix.
            place = location.under(layout.root.relative_to(root).as_posix().strip("."))
            assert locks is not None
            blobs_s3, manifests_s3 = await _s3_stores(
                place, layout, settings, locks, corrupt, on_commit=housekeeper.poke
            )
            closing.append(manifests_s3.close)
            opened[layout] = (_recording_uses(blobs_s3, place, settings), manifests_s3)
            continue
        failures = WriteFailures(count_failure)
        fs_blobs = BlobStore(
            layout,
            read_timeout=settings.read_timeout,
            on_commit=housekeeper.poke,
            failures=failures,
            on_full=housekeeper.free_space if settings.max_size is not None else None,
        )
        removed = fs_blobs.remove_stale() + remove_abandoned_imports(layout)
        if removed:
            log.info("removed %d temp files left by an earlier run in %s", removed, layout.root)
        opened[layout] = (fs_blobs, ManifestStore(layout, on_corrupt=corrupt, failures=failures))
    session = new_session(settings)
    redirect_session = new_redirect_session(settings)
    options = UpstreamOptions.from_settings(settings)
    readahead = ReadAhead(
        ReadAheadSettings(
            enabled=settings.prefetch,
            per_image=settings.prefetch_per_image,
            total=settings.prefetch_total,
            max_size=settings.max_size,
        ),
        metrics,
    )
    mirrors = []
    for up in settings.all_upstreams():
        blobs, manifests = opened[by_upstream[up.name]]
        mirrors.append(
            Mirror(
                _upstream_client(up, (session, redirect_session), options, metrics),
                blobs,
                manifests,
                tags,
                metrics,
                tag_ttl=settings.tag_ttl if up.tag_ttl is None else up.tag_ttl,
                offline=settings.offline if up.offline is None else up.offline,
                library_prefix=up.library_prefix,
                readahead=readahead,
            )
        )
    online = [m for m in mirrors if not m.offline]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DISCOVER_SECONDS):
            await asyncio.gather(*(m.upstream.discover() for m in online))
    try:
        yield Resources(Mirrors(mirrors[0], mirrors[1:]), images, housekeeper)
    finally:
        await readahead.close()
        for blobs, _ in opened.values():
            await blobs.close()
        if locks is not None:
            await locks.close()
        for close in closing:
            close()
        await session.close()
        await redirect_session.close()
        await _close_tags(tags)

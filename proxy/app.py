"""The application factory: every resource with a lifetime lives in cleanup_ctx."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from aiohttp import web

from pullthrough.cache import stores
from pullthrough.cache.digests import Digest
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore
from pullthrough.cache.s3_location import store_location
from pullthrough.cache.scrub import Scrubber
from pullthrough.cache.stores import KnownUpstream
from pullthrough.metrics import CacheUsage, HostedUsage, Metrics
from pullthrough.proxy import push_routes, status, status_routes, visibility
from pullthrough.proxy.access import ACCESS, Access, add_token_route, authenticate
from pullthrough.proxy.config import Settings
from pullthrough.proxy.errors import oci_errors
from pullthrough.proxy.forwarded import TRUSTED, forwarded_for, networks
from pullthrough.proxy.hosted import Hosted
from pullthrough.proxy.images import CachedImages
from pullthrough.proxy.keys import METRICS, MIRRORS, SETTINGS
from pullthrough.proxy.push_routes import HOSTED_KEY
from pullthrough.proxy.referrers import REFERRERS, Referrers
from pullthrough.proxy.resources import open_mirrors
from pullthrough.proxy.routes import (
    add_routes,
    add_service_routes,
    answer_namespace,
    count_served_bytes,
)

log = logging.getLogger(__name__)


async def _serve_mirrors(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    async with open_mirrors(settings, metrics) as resources:
        app[MIRRORS] = resources.mirrors
        # So that the command-line tools, run without this server's settings,
        # find what it pulls and in which store.
        try:
            await asyncio.to_thread(
                stores.record_upstreams,
                settings.cache_dir.resolve(),
                [
                    KnownUpstream(u.name, str(u.url), u.has_credentials)
                    for u in settings.all_upstreams()
                ],
            )
        except OSError as exc:  # the mirror works without it; only the tools miss it
            log.warning("cannot record the upstreams in %s: %s", stores.RECORD, exc)
        distinct = resources.images.distinct_layouts()
        measured = _measured_stores(resources.images, distinct)

        def usage() -> CacheUsage:
            counts = [store.usage() for store in measured]
            return CacheUsage(*(sum(c[i] for c in counts) for i in range(3)))

        # Measured when scraped, at most every 30 s and by one worker for all
        # (metrics/__init__.py); on S3 that is one listing of each store's prefix.
        metrics.watch_cache(usage)
        app[status.IMAGES] = status.ImageList(resources.images, metrics.shared_dir)
        hosted = None
        if settings.hosted:
            hosted = _open_hosted(settings)
            app[HOSTED_KEY] = hosted
            # Hosted content is the only copy: never evicted for size or age.
            resources.housekeeper.keep_also = hosted.repos.referenced
            repos = hosted.repos
            metrics.watch_hosted(lambda: HostedUsage(*repos.usage()))
        expirer = (
            None
            if hosted is None
            else asyncio.create_task(_expire_uploads(hosted, resources.images.protected))
        )
        evictor = None
        if resources.housekeeper.limited:
            evictor = asyncio.create_task(resources.housekeeper.run_forever())
            resources.housekeeper.poke()  # check the limits once at start-up
        stop_scrub = threading.Event()
        scrubber = _scrub(settings, distinct, metrics, stop_scrub)
        try:
            yield
        finally:
            stop_scrub.set()
            if expirer is not None:
                expirer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await expirer
            if evictor is not None:
                evictor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await evictor
            if scrubber is not None:
                await asyncio.to_thread(scrubber.join)


class _Measure(Protocol):
    def usage(self) -> tuple[int, int, int]: ...


def _measured_stores(images: CachedImages, distinct: list[Layout]) -> list[_Measure]:
    """What the cache size metrics measure: the stores' folders, or with
    ``storage = s3://...`` their prefixes on S3 (the folders then hold no content;
    the S3 stores are those the status page lists, closed with the mirrors)."""
    if images.s3 is None:
        return list(distinct)
    return [images.s3[layout.root] for layout in distinct]


def _open_hosted(settings: Settings) -> Hosted:
    """Hosted repositories live in the cache root's store, beside what the
    default upstream's pulls cached, so that a layer both pushed and pulled is
    stored once."""
    layout = Layout(settings.cache_dir.resolve())
    layout.create()
    return Hosted(settings, layout, ManifestStore(layout))


# How often abandoned upload sessions are looked for.
EXPIRE_EVERY_SECONDS = 300.0


async def _expire_uploads(hosted: Hosted, pinned: Callable[[], set[Digest]]) -> None:
    """Remove abandoned upload sessions, then the pushed blobs no manifest took
    within the same time (a push idle that long is abandoned)."""
    while True:
        try:
            removed = await asyncio.to_thread(hosted.uploads.expire)
            keep = frozenset(await asyncio.to_thread(pinned))
            collected = await hosted.collect(hosted.uploads.expiry, keep)
        except OSError as exc:
            log.warning("cannot clean up hosted repositories: %s", exc)
        else:
            if removed:
                log.info("removed %d upload sessions idle beyond upload_expiry", removed)
            if collected.unlinked:
                log.info(
                    "hosted gc: %d blob links no manifest references, %d blobs removed, "
                    "%d still linked elsewhere",
                    collected.unlinked,
                    len(collected.removed),
                    collected.kept,
                )
        await asyncio.sleep(EXPIRE_EVERY_SECONDS)


def _scrub(
    settings: Settings, distinct: list[Layout], metrics: Metrics, stop: threading.Event
) -> threading.Thread | None:
    """Start the background scrub (a thread: it reads and hashes, at a bounded rate)."""
    if settings.scrub_rate == 0:
        return None

    def on_corrupt(kind: str) -> None:
        metrics.corrupt_objects.labels(kind).inc()

    root = settings.cache_dir.resolve()
    # One lock for the whole cache: one scrubbing process per server (and with
    # redis_url on S3, one node of those sharing it).
    lock = Layout(root).scrub_lock
    location = settings.s3_location()
    scrubber: Scrubber | S3Scrubber
    if location is None:
        scrubber = Scrubber(
            distinct,
            lock,
            rate=settings.scrub_rate,
            on_bytes=metrics.scrub_bytes.inc,
            on_corrupt=on_corrupt,
            on_pass=metrics.scrub_passes.inc,
        )
    else:
        from pullthrough.cache.s3_admin import S3Admin  # the s3 extra
        from pullthrough.cache.s3_scrub import S3Scrubber

        scrubber = S3Scrubber(
            [S3Admin(store_location(location, root, layout.root)) for layout in distinct],
            redis_url=settings.redis_url,
            lock_file=lock,
            rate=settings.scrub_rate,
            on_bytes=metrics.scrub_bytes.inc,
            on_corrupt=on_corrupt,
            on_pass=metrics.scrub_passes.inc,
        )
    thread = threading.Thread(target=scrubber.run, args=(stop,), name="scrub", daemon=True)
    thread.start()
    return thread


def create_app(
    settings: Settings, metrics: Metrics | None = None, *, token_key: bytes | None = None
) -> web.Application:
    """The mirror. ``token_key`` signs its bearer tokens: the same in every worker
    (the server makes one per start), random when not given."""
    app = web.Application(
        middlewares=[oci_errors, forwarded_for, authenticate], client_max_size=64 * 1024
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics or Metrics()
    app[REFERRERS] = Referrers()
    app[TRUSTED] = networks(settings.trusted_proxies)
    app.cleanup_ctx.append(_serve_mirrors)
    if settings.htpasswd is not None:
        app[ACCESS] = Access(settings, token_key or secrets.token_bytes(32))
        add_token_route(app)
        visibility.install(app)
    app.on_response_prepare.append(count_served_bytes)
    app.on_response_prepare.append(answer_namespace)
    add_routes(app, service_endpoints=settings.metrics_listen is None, handler=push_routes.registry)
    status_routes.install(app)
    return app


def create_service_app(main: web.Application) -> web.Application:
    """/metrics, /readyz and /healthz for ``metrics_listen``, on the main app's
    state (set it up first: its mirrors exist once it has started)."""
    app = web.Application(middlewares=[oci_errors])
    app[SETTINGS] = main[SETTINGS]
    app[METRICS] = main[METRICS]
    app[MIRRORS] = main[MIRRORS]
    add_service_routes(app)
    return app

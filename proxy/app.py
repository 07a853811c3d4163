"""The application factory: every resource with a lifetime lives in cleanup_ctx."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from cache.archive import remove_abandoned_imports
from cache.blobs import BlobStore
from cache.index import TagIndex
from cache.layout import Layout
from cache.manifests import ManifestStore
from cache.space import WriteFailures
from metrics import CacheUsage, Metrics
from proxy.config import Settings, UpstreamSettings
from proxy.errors import oci_errors
from proxy.housekeeping import Housekeeper
from proxy.keys import METRICS, MIRRORS, SETTINGS
from proxy.mirror import Mirror, Mirrors
from proxy.routes import add_routes, answer_namespace, count_served_bytes
from proxy.upstream import RateLimit, UpstreamClient, new_session

log = logging.getLogger(__name__)

# How long start-up may wait to learn the upstreams' auth challenges.
DISCOVER_SECONDS = 2.0


def layouts(settings: Settings) -> dict[str, Layout]:
    """Where each upstream's content lives, by upstream name.

    Anonymous upstreams share one content-addressed store: anyone who can reach
    the mirror can read all of them anyway, and base layers are common. An
    upstream with credentials gets a store of its own, so that what only its
    credentials can read is never answered under another upstream's name.
    """
    root = settings.cache_dir.resolve()
    shared = Layout(root)
    return {
        up.name: Layout(root / "upstreams" / up.name.replace(":", "_"))
        if up.has_credentials
        else shared
        for up in settings.all_upstreams()
    }


def index_dir(settings: Settings) -> Path:
    """The tag index, one for all upstreams (its keys name the upstream)."""
    return settings.cache_dir.resolve() / "index"


def _upstream_client(
    up: UpstreamSettings, session: aiohttp.ClientSession, metrics: Metrics
) -> UpstreamClient:
    name = up.name

    def ratelimit(seen: RateLimit) -> None:
        metrics.ratelimit_limit.labels(name).set(seen.limit)
        metrics.ratelimit_remaining.labels(name).set(seen.remaining)
        if seen.remaining * 10 < seen.limit:
            log.warning("upstream %s: %d of %d pulls left", name, seen.remaining, seen.limit)

    return UpstreamClient(
        up,
        session,
        on_token=metrics.tokens_fetched.labels(name).inc,
        on_ratelimit=ratelimit,
        on_response=lambda method, status: metrics.upstream_requests.labels(
            name, method, str(status)
        ).inc(),
    )


@dataclass
class Resources:
    """Everything a mirror runs on; the server and the command line share it."""

    mirrors: Mirrors
    tags: TagIndex
    housekeeper: Housekeeper
    layouts: dict[str, Layout]


@contextlib.asynccontextmanager
async def open_mirrors(settings: Settings, metrics: Metrics) -> AsyncIterator[Resources]:
    by_upstream = layouts(settings)
    distinct = list({layout.root: layout for layout in by_upstream.values()}.values())
    for layout in distinct:
        layout.create()

    def count_failure(reason: str) -> None:
        metrics.cache_write_failures.labels(reason).inc()

    tags = TagIndex(index_dir(settings), WriteFailures(count_failure))
    housekeeper = Housekeeper(settings, by_upstream, tags, metrics)
    stores: dict[Layout, tuple[BlobStore, ManifestStore]] = {}
    for layout in distinct:
        failures = WriteFailures(count_failure)
        blobs = BlobStore(
            layout,
            read_timeout=settings.read_timeout,
            on_commit=housekeeper.poke,
            failures=failures,
            on_full=housekeeper.free_space if settings.max_size is not None else None,
        )
        removed = blobs.remove_stale() + remove_abandoned_imports(layout)
        if removed:
            log.info("removed %d temp files left by an earlier run in %s", removed, layout.root)
        stores[layout] = (blobs, ManifestStore(layout, failures=failures))
    session = new_session(settings)
    mirrors = []
    for up in settings.all_upstreams():
        blobs, manifests = stores[by_upstream[up.name]]
        mirrors.append(
            Mirror(
                _upstream_client(up, session, metrics),
                blobs,
                manifests,
                tags,
                metrics,
                tag_ttl=settings.tag_ttl if up.tag_ttl is None else up.tag_ttl,
                offline=settings.offline if up.offline is None else up.offline,
                library_prefix=up.library_prefix,
            )
        )
    online = [m for m in mirrors if not m.offline]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DISCOVER_SECONDS):
            await asyncio.gather(*(m.upstream.discover() for m in online))
    try:
        yield Resources(Mirrors(mirrors[0], mirrors[1:]), tags, housekeeper, by_upstream)
    finally:
        for blobs, _ in stores.values():
            await blobs.close()
        await session.close()
        tags.close()


async def _serve_mirrors(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    async with open_mirrors(settings, metrics) as resources:
        app[MIRRORS] = resources.mirrors
        distinct = resources.housekeeper.distinct_layouts()

        def usage() -> CacheUsage:
            counts = [layout.usage() for layout in distinct]
            return CacheUsage(*(sum(c[i] for c in counts) for i in range(3)))

        metrics.watch_cache(usage)
        evictor = None
        if resources.housekeeper.limited:
            evictor = asyncio.create_task(resources.housekeeper.run_forever())
            resources.housekeeper.poke()  # check the limits once at start-up
        try:
            yield
        finally:
            if evictor is not None:
                evictor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await evictor


def create_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    app = web.Application(middlewares=[oci_errors], client_max_size=64 * 1024)
    app[SETTINGS] = settings
    app[METRICS] = metrics or Metrics()
    app.cleanup_ctx.append(_serve_mirrors)
    app.on_response_prepare.append(count_served_bytes)
    app.on_response_prepare.append(answer_namespace)
    add_routes(app)
    return app

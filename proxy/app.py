"""The application factory: every resource with a lifetime lives in cleanup_ctx."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from cache.blobs import BlobStore
from cache.index import TagIndex
from cache.layout import Layout
from cache.manifests import ManifestStore
from metrics import CacheUsage, Metrics
from proxy.config import Settings
from proxy.errors import oci_errors
from proxy.keys import METRICS, MIRROR, SETTINGS
from proxy.mirror import Mirror
from proxy.routes import add_routes, count_served_bytes
from proxy.upstream import RateLimit, UpstreamClient, new_session

log = logging.getLogger(__name__)


async def _mirror(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    layout = Layout(settings.cache_dir.resolve())
    layout.create()
    blobs = BlobStore(layout, read_timeout=settings.read_timeout)
    removed = blobs.remove_stale()
    if removed:
        log.info("removed %d temp files left by an earlier run", removed)
    tags = TagIndex(layout.index)
    session = new_session(settings)
    host = settings.upstream.host or ""

    def ratelimit(seen: RateLimit) -> None:
        metrics.ratelimit_limit.labels(host).set(seen.limit)
        metrics.ratelimit_remaining.labels(host).set(seen.remaining)
        if seen.remaining * 10 < seen.limit:
            log.warning("upstream %s: %d of %d pulls left", host, seen.remaining, seen.limit)

    upstream = UpstreamClient(
        settings,
        session,
        on_token=metrics.tokens_fetched.labels(host).inc,
        on_ratelimit=ratelimit,
        on_response=lambda method, status: metrics.upstream_requests.labels(
            host, method, str(status)
        ).inc(),
    )
    metrics.watch_cache(lambda: CacheUsage(*layout.usage()))
    app[MIRROR] = Mirror(
        upstream,
        blobs,
        ManifestStore(layout),
        tags,
        metrics,
        tag_ttl=settings.tag_ttl,
        offline=settings.offline,
    )
    try:
        yield
    finally:
        await blobs.close()
        await session.close()
        tags.close()


def create_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    app = web.Application(middlewares=[oci_errors], client_max_size=64 * 1024)
    app[SETTINGS] = settings
    app[METRICS] = metrics or Metrics()
    app.cleanup_ctx.append(_mirror)
    app.on_response_prepare.append(count_served_bytes)
    add_routes(app)
    return app

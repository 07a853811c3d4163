"""The application factory: every resource with a lifetime lives in cleanup_ctx."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from cache.blobs import BlobStore
from cache.index import TagIndex
from cache.layout import Layout
from cache.manifests import ManifestStore
from metrics import CacheUsage, Metrics
from proxy.config import Settings, UpstreamSettings
from proxy.errors import oci_errors
from proxy.keys import METRICS, MIRRORS, SETTINGS
from proxy.mirror import Mirror, Mirrors
from proxy.routes import add_routes, answer_namespace, count_served_bytes
from proxy.upstream import RateLimit, UpstreamClient, new_session

log = logging.getLogger(__name__)


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


async def _mirrors(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    by_upstream = layouts(settings)
    distinct = list({layout.root: layout for layout in by_upstream.values()}.values())
    stores: dict[Layout, tuple[BlobStore, ManifestStore]] = {}
    for layout in distinct:
        layout.create()
        blobs = BlobStore(layout, read_timeout=settings.read_timeout)
        removed = blobs.remove_stale()
        if removed:
            log.info("removed %d temp files left by an earlier run in %s", removed, layout.root)
        stores[layout] = (blobs, ManifestStore(layout))
    tags = TagIndex(distinct[0].index)
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
    app[MIRRORS] = Mirrors(mirrors[0], mirrors[1:])

    def usage() -> CacheUsage:
        counts = [layout.usage() for layout in distinct]
        return CacheUsage(*(sum(c[i] for c in counts) for i in range(3)))

    metrics.watch_cache(usage)
    try:
        yield
    finally:
        for blobs, _ in stores.values():
            await blobs.close()
        await session.close()
        tags.close()


def create_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    app = web.Application(middlewares=[oci_errors], client_max_size=64 * 1024)
    app[SETTINGS] = settings
    app[METRICS] = metrics or Metrics()
    app.cleanup_ctx.append(_mirrors)
    app.on_response_prepare.append(count_served_bytes)
    app.on_response_prepare.append(answer_namespace)
    add_routes(app)
    return app

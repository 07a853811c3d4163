"""The application factory: every resource with a lifetime lives in cleanup_ctx."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from cache import stores
from cache.archive import remove_abandoned_imports
from cache.blobs import BlobStore
from cache.index import TagIndex
from cache.layout import Layout
from cache.manifests import ManifestStore
from cache.scrub import Scrubber
from cache.space import WriteFailures
from cache.stores import KnownUpstream
from metrics import CacheUsage, Metrics
from proxy import visibility
from proxy.access import ACCESS, Access, add_token_route, authenticate
from proxy.config import Settings, UpstreamSettings
from proxy.errors import oci_errors
from proxy.forwarded import TRUSTED, forwarded_for, networks
from proxy.housekeeping import Housekeeper
from proxy.keys import METRICS, MIRRORS, SETTINGS
from proxy.mirror import Mirror, Mirrors
from proxy.routes import add_routes, add_service_routes, answer_namespace, count_served_bytes
from proxy.upstream import (
    RateLimit,
    UpstreamClient,
    UpstreamOptions,
    new_redirect_session,
    new_session,
)

log = logging.getLogger(__name__)

# How long start-up may wait to learn the upstreams' auth challenges.
DISCOVER_SECONDS = 2.0


def layouts(settings: Settings) -> dict[str, Layout]:
    """Where each configured upstream's content lives, by upstream name (the rule
    is in cache/stores.py)."""
    pairs = ((up.name, up.has_credentials) for up in settings.all_upstreams())
    return stores.layouts(settings.cache_dir.resolve(), pairs)


def index_dir(settings: Settings) -> Path:
    return stores.index_dir(settings.cache_dir.resolve())


def known_upstreams(settings: Settings) -> dict[str, KnownUpstream]:
    """The upstreams this cache has seen: those a server recorded in it, with
    these settings' own on top."""
    known = stores.read_record(settings.cache_dir.resolve())
    for up in settings.all_upstreams():
        known[up.name] = KnownUpstream(up.name, str(up.url), up.has_credentials)
    return known


def rekey_tags(tags: TagIndex, known: dict[str, KnownUpstream]) -> int:
    """Tags recorded under an upstream's URL (before they were keyed by name) go
    under its name; a URL two names share cannot be attributed and stays."""
    by_url: dict[str, set[str]] = {}
    for up in known.values():
        by_url.setdefault(up.url, set()).add(up.name)
    return tags.rekey({url: names.pop() for url, names in by_url.items() if len(names) == 1})


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
    moved = await asyncio.to_thread(rekey_tags, tags, known_upstreams(settings))
    if moved:
        log.info("moved %d tag entries from upstream URLs to upstream names", moved)
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
        corrupt = metrics.corrupt_objects.labels("manifest").inc
        stores[layout] = (blobs, ManifestStore(layout, on_corrupt=corrupt, failures=failures))
    session = new_session(settings)
    redirect_session = new_redirect_session(settings)
    options = UpstreamOptions.from_settings(settings)
    mirrors = []
    for up in settings.all_upstreams():
        blobs, manifests = stores[by_upstream[up.name]]
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
        await redirect_session.close()
        tags.close()


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
        distinct = resources.housekeeper.distinct_layouts()

        def usage() -> CacheUsage:
            counts = [layout.usage() for layout in distinct]
            return CacheUsage(*(sum(c[i] for c in counts) for i in range(3)))

        metrics.watch_cache(usage)
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
            if evictor is not None:
                evictor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await evictor
            if scrubber is not None:
                await asyncio.to_thread(scrubber.join)


def _scrub(
    settings: Settings, distinct: list[Layout], metrics: Metrics, stop: threading.Event
) -> threading.Thread | None:
    """Start the background scrub (a thread: it reads and hashes, at a bounded rate)."""
    if settings.scrub_rate == 0:
        return None
    scrubber = Scrubber(
        distinct,
        # One lock for the whole cache: one scrubbing process per server.
        Layout(settings.cache_dir.resolve()).scrub_lock,
        rate=settings.scrub_rate,
        on_bytes=metrics.scrub_bytes.inc,
        on_corrupt=lambda kind: metrics.corrupt_objects.labels(kind).inc(),
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
    app[TRUSTED] = networks(settings.trusted_proxies)
    app.cleanup_ctx.append(_serve_mirrors)
    if settings.htpasswd is not None:
        app[ACCESS] = Access(settings, token_key or secrets.token_bytes(32))
        add_token_route(app)
        visibility.install(app)
    app.on_response_prepare.append(count_served_bytes)
    app.on_response_prepare.append(answer_namespace)
    add_routes(app, service_endpoints=settings.metrics_listen is None)
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

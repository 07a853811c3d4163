"""A hostile or broken upstream: redirects to foreign realms and internal
services, trickling bodies, stalls, and failures that must read as words."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from pullthrough.proxy.app import create_app
from pullthrough.proxy.config import Settings
from pullthrough.proxy.errors import RedirectRefused
from pullthrough.proxy.upstream import GuardedConnector, UpstreamClient, UpstreamOptions
from tests.support.faults import (
    MANIFEST_TYPE,
    Cdn,
    FaultRegistry,
    ForeignRealm,
    InternalService,
    digest_of,
)
from tests.support.mirror import settings_for
from tests.support.processes import free_port

BLOB = os.urandom(256 * 1024 + 3)
DIGEST = digest_of(BLOB)
URL_BLOB = f"/v2/library/app/blobs/{DIGEST}"
MANIFEST = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": []}

Server = Callable[[web.Application], Awaitable[TestServer]]
Client = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def fault() -> FaultRegistry:
    registry = FaultRegistry()
    registry.add_blob(BLOB)
    registry.add_manifest("1.0", MANIFEST)
    registry.add_manifest("2.0", {**MANIFEST, "layers": [{"size": 1}]})
    registry.tags = ["1.0", "2.0"]
    return registry


@pytest.fixture
async def upstream(fault: FaultRegistry, aiohttp_server: Server) -> AsyncIterator[TestServer]:
    server = await aiohttp_server(fault.app())
    yield server
    if fault.hang is not None:
        fault.hang.set()  # let the handlers still waiting finish before teardown


def base(server: TestServer) -> str:
    return str(server.make_url("/")).rstrip("/")


async def make_mirror(
    aiohttp_client: Client, upstream: TestServer, cache: Path, **overrides: object
) -> TestClient[Any, Any]:
    return await aiohttp_client(create_app(settings_for(cache, base(upstream), **overrides)))


async def metric_lines(mirror: TestClient[Any, Any], name: str) -> list[str]:
    async with mirror.get("/metrics") as resp:
        text = await resp.text()
    return [line for line in text.splitlines() if line.startswith(name)]


def cached_manifests(cache: Path) -> list[Path]:
    return [p for p in (cache / "manifests").rglob("*") if p.is_file()]


async def test_foreign_realm_gets_nothing_and_is_not_adopted(
    fault: FaultRegistry,
    upstream: TestServer,
    aiohttp_server: Server,
    aiohttp_client: Client,
    tmp_path: Path,
) -> None:
    foreign = ForeignRealm()
    foreign_server = await aiohttp_server(foreign.app())
    fault.require_token = True
    fault.redirect_to = base(foreign_server)
    mirror = await make_mirror(
        aiohttp_client,
        upstream,
        tmp_path / "cache",
        upstream_username="mirror",
        upstream_password="s3cret",
    )

    async with mirror.get(URL_BLOB) as resp:
        assert resp.status == 502
        error = (await resp.json())["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    assert "answered 401" in error["detail"]
    # The redirect target got the redirected request, bare; never a token request.
    assert [s.path.partition("?")[0] for s in foreign.seen] == [f"/cdn/{DIGEST}"]
    assert all("Authorization" not in s.headers for s in foreign.seen)

    # A later pull of another image still asks the upstream's own realm, with
    # the credentials, and nothing more reaches the foreign host.
    tokens_before = len(fault.token_auth)
    async with mirror.get("/v2/other/image/manifests/1.0") as resp:
        assert resp.status == 200
    assert len(fault.token_auth) == tokens_before + 1
    assert (fault.token_auth[-1] or "").startswith("Basic ")
    assert len(foreign.seen) == 1
    assert await eventually_empty(tmp_path / "cache")


def kept_files(cache: Path) -> list[Path]:
    """Blobs and temp files anywhere in the cache (any upstream's layout)."""
    return [
        p
        for p in cache.rglob("*")
        if p.is_file() and {"blobs", "tmp"} & set(p.relative_to(cache).parts)
    ]


async def eventually_empty(cache: Path) -> bool:
    await asyncio.sleep(0.05)  # a failed download removes its temp file just after
    return kept_files(cache) == []


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_manifest_redirect_to_an_internal_service_is_refused(
    method: str,
    fault: FaultRegistry,
    upstream: TestServer,
    aiohttp_server: Server,
    aiohttp_client: Client,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    internal = InternalService()
    internal_server = await aiohttp_server(internal.app())
    fault.redirect_manifests_to = str(internal_server.make_url("/internal/metadata"))
    cache = tmp_path / "cache"
    mirror = await make_mirror(aiohttp_client, upstream, cache)
    caplog.set_level(logging.WARNING, logger="pullthrough.proxy.upstream")
    for _ in range(2):  # nothing was cached by the first
        async with mirror.request(method, "/v2/library/app/manifests/1.0") as resp:
            assert resp.status == 502
            if method == "GET":
                error = (await resp.json())["errors"][0]
                assert error["code"] == "UNAVAILABLE"
                assert "only blob requests may be redirected" in error["detail"]
    assert internal.hits == []
    assert cached_manifests(cache) == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one line per cause, not one per request"
    assert "only blob requests may be redirected" in warnings[0].getMessage()
    assert await metric_lines(mirror, "pullthrough_upstream_redirects_total") == [
        'pullthrough_upstream_redirects_total{status="refused",upstream="docker.io"} 2.0'
    ]


async def test_tag_list_redirect_is_refused(
    fault: FaultRegistry,
    upstream: TestServer,
    aiohttp_server: Server,
    aiohttp_client: Client,
    tmp_path: Path,
) -> None:
    internal = InternalService(body=b'{"name": "library/app", "tags": ["leaked"]}')
    internal_server = await aiohttp_server(internal.app())
    fault.redirect_tags_to = str(internal_server.make_url("/internal/tags"))
    mirror = await make_mirror(aiohttp_client, upstream, tmp_path / "cache")
    for _ in range(2):
        async with mirror.get("/v2/library/app/tags/list") as resp:
            assert resp.status == 502
            assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert internal.hits == []
    # The upstream's own answer is still served once it stops redirecting.
    fault.redirect_tags_to = None
    async with mirror.get("/v2/library/app/tags/list") as resp:
        assert resp.status == 200
        assert (await resp.json())["tags"] == ["1.0", "2.0"]


async def test_blob_redirect_sends_the_location_byte_for_byte_and_no_token(
    fault: FaultRegistry,
    upstream: TestServer,
    aiohttp_server: Server,
    aiohttp_client: Client,
    tmp_path: Path,
) -> None:
    cdn = Cdn(fault)
    cdn_server = await aiohttp_server(cdn.app())
    fault.require_token = True
    fault.redirect_to = base(cdn_server)
    # What S3 presigning produces: escaped slashes, '+', '=' inside values.
    fault.redirect_query = (
        "X-Amz-Credential=K%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Signature=ab%2Fcd+ef%3D%3D&token=a=b&space=%20+"
    )
    mirror = await make_mirror(aiohttp_client, upstream, tmp_path / "cache")
    async with mirror.head(URL_BLOB) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(BLOB))
    async with mirror.get(URL_BLOB) as resp:
        assert resp.status == 200
        assert await resp.read() == BLOB
    assert [(s.method, s.raw) for s in cdn.seen] == [
        ("HEAD", f"/cdn/{DIGEST}?{fault.redirect_query}"),
        ("GET", f"/cdn/{DIGEST}?{fault.redirect_query}"),
    ]
    assert all("Authorization" not in s.headers for s in cdn.seen)
    upstream_blob_requests = [s for s in fault.seen if "/blobs/" in s.path]
    assert upstream_blob_requests[-1].headers["Authorization"].startswith("Bearer tok-")
    # The hop to the CDN is counted apart from requests to the upstream.
    assert await metric_lines(mirror, "pullthrough_upstream_redirects_total") == [
        'pullthrough_upstream_redirects_total{status="200",upstream="docker.io"} 2.0'
    ]
    upstream_lines = await metric_lines(mirror, "pullthrough_upstream_requests_total{")
    assert sum(float(line.rsplit(" ", 1)[1]) for line in upstream_lines) == len(fault.seen)


async def test_trickling_blob_is_abandoned_and_nothing_kept(
    fault: FaultRegistry, upstream: TestServer, aiohttp_client: Client, tmp_path: Path
) -> None:
    fault.trickle = 0.2  # 5 bytes/s, far below the minimum
    cache = tmp_path / "cache"
    mirror = await make_mirror(
        aiohttp_client, upstream, cache, upstream_min_rate=1024, upstream_rate_window=1.0
    )
    started = time.monotonic()
    async with mirror.get(URL_BLOB) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"a trickle held the client {elapsed:.1f} s"
    assert await eventually_empty(cache)

    fault.trickle = None  # a healthy upstream afterwards is fetched afresh
    async with mirror.get(URL_BLOB) as resp:
        assert await resp.read() == BLOB


async def test_a_blob_answer_whose_head_trickles_is_abandoned(
    aiohttp_client: Client, tmp_path: Path
) -> None:
    """One header byte at a time keeps a read timeout from firing: the head of a
    blob answer has a deadline of its own."""
    sent = 0
    handlers: list[tuple[asyncio.Task[Any], asyncio.StreamWriter]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        task = asyncio.current_task()
        assert task is not None
        handlers.append((task, writer))
        line = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        if line.split()[1] == b"/v2/":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        else:
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-Pad: " + b"a" * 4000
            with contextlib.suppress(ConnectionError):
                for i in range(len(head)):
                    writer.write(head[i : i + 1])
                    await writer.drain()
                    sent += 1
                    await asyncio.sleep(0.1)
        writer.close()

    trickler = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = trickler.sockets[0].getsockname()[1]
    try:
        mirror = await aiohttp_client(
            create_app(
                settings_for(tmp_path / "cache", f"http://127.0.0.1:{port}", manifest_timeout=1.0)
            )
        )
        started = time.monotonic()
        async with mirror.get(URL_BLOB) as resp:
            assert resp.status == 503
            detail = (await resp.json())["errors"][0]["detail"]
        elapsed = time.monotonic() - started
    finally:
        trickler.close()
        for task, writer in handlers:
            task.cancel()
            writer.close()
        await asyncio.gather(*(task for task, _ in handlers), return_exceptions=True)
        await trickler.wait_closed()
    assert detail == f"127.0.0.1:{port} did not answer within 1 s"
    assert sent > 3  # it did trickle, and a socket read timeout never fired
    assert elapsed < 5, f"a trickled head held the client {elapsed:.1f} s"
    assert await eventually_empty(tmp_path / "cache")


async def test_stalled_upstream_serves_a_cached_tag_stale_within_the_deadline(
    fault: FaultRegistry,
    upstream: TestServer,
    aiohttp_client: Client,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mirror = await make_mirror(
        aiohttp_client, upstream, tmp_path / "cache", tag_ttl=0.0, revalidate_timeout=1.0
    )
    async with mirror.get("/v2/library/app/manifests/1.0") as resp:
        cached = await resp.read()
    fault.hang = asyncio.Event()  # accepts, never answers
    started = time.monotonic()
    async with mirror.get("/v2/library/app/manifests/1.0") as resp:
        assert resp.status == 200
        assert await resp.read() == cached
    elapsed = time.monotonic() - started
    # read_timeout is 15 s in these tests: the revalidation deadline, not it, ended this.
    assert elapsed < 8, f"stale answer took {elapsed:.1f} s"
    assert any("did not answer within 1 s" in r.getMessage() for r in caplog.records)
    assert await metric_lines(mirror, "pullthrough_stale_served_total{") == [
        'pullthrough_stale_served_total{reason="unavailable"} 1.0'
    ]


async def test_stalled_upstream_with_nothing_cached_is_a_readable_503(
    fault: FaultRegistry, upstream: TestServer, aiohttp_client: Client, tmp_path: Path
) -> None:
    mirror = await make_mirror(aiohttp_client, upstream, tmp_path / "cache", manifest_timeout=1.0)
    fault.hang = asyncio.Event()
    async with mirror.get("/v2/library/app/manifests/1.0") as resp:
        assert resp.status == 503
        detail = (await resp.json())["errors"][0]["detail"]
    assert detail == f"{upstream.host}:{upstream.port} did not answer in full within 1 s"


async def test_a_manifest_nested_too_deeply_for_json_is_no_500(
    fault: FaultRegistry, upstream: TestServer, aiohttp_client: Client, tmp_path: Path
) -> None:
    mirror = await make_mirror(aiohttp_client, upstream, tmp_path / "cache")
    deep = b"[" * 100_000
    fault.manifests["deep"] = ("application/json", deep)
    async with mirror.get("/v2/library/app/manifests/deep") as resp:
        # Not a manifest the mirror can tell apart: served as the bytes they are.
        assert resp.status == 200
        assert await resp.read() == deep


async def test_a_manifest_body_that_stops_half_way_is_a_readable_503(
    fault: FaultRegistry,
    upstream: TestServer,
    aiohttp_client: Client,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mirror = await make_mirror(aiohttp_client, upstream, tmp_path / "cache", manifest_timeout=1.0)
    fault.stall, fault.stall_manifests = asyncio.Event(), True
    try:
        async with mirror.get("/v2/library/app/manifests/1.0") as resp:
            assert resp.status == 503
            detail = (await resp.json())["errors"][0]["detail"]
    finally:
        fault.stall.set()
    cause = f"{upstream.host}:{upstream.port} did not answer in full within 1 s"
    assert detail == cause
    assert [r.getMessage() for r in caplog.records if r.name == "pullthrough.proxy.upstream"] == [
        f"upstream docker.io: {cause}"
    ]
    assert cached_manifests(tmp_path / "cache") == []


async def test_unreachable_upstream_reads_as_words_and_is_logged_once(
    aiohttp_client: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens there
    settings = settings_for(tmp_path / "cache", f"http://127.0.0.1:{port}")
    mirror = await aiohttp_client(create_app(settings))
    caplog.set_level(logging.WARNING, logger="pullthrough.proxy.upstream")
    for path in ("/v2/library/app/manifests/1.0", "/v2/library/app/manifests/2.0", URL_BLOB):
        async with mirror.get(path) as resp:
            assert resp.status == 503
            error = (await resp.json())["errors"][0]
            assert error["detail"] == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    warnings = [r.getMessage() for r in caplog.records if r.name == "pullthrough.proxy.upstream"]
    cause = f"cannot connect to 127.0.0.1:{port}: Connection refused"
    assert warnings == [f"upstream docker.io: {cause}"]


class LoopbackResolver(AbstractResolver):
    """Every name is 127.0.0.1: lets a test give the upstream and its redirect
    targets public-looking names while nothing leaves loopback."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


@pytest.mark.parametrize(
    ("target_host", "allow", "followed"),
    [
        ("127.0.0.1", (), False),  # an address, refused before connecting
        ("cdn.internal", (), False),  # a name, refused once resolved
        ("cdn.internal", ("cdn.internal",), True),
        ("cdn.internal", ("127.0.0.0/8",), True),
    ],
)
async def test_a_public_upstream_cannot_redirect_into_the_network(
    target_host: str,
    allow: tuple[str, ...],
    followed: bool,
    fault: FaultRegistry,
    upstream: TestServer,
    aiohttp_server: Server,
) -> None:
    cdn = Cdn(fault)
    cdn_server = await aiohttp_server(cdn.app())
    fault.redirect_to = f"http://{target_host}:{cdn_server.port}"
    public = URL(f"http://registry.example:{upstream.port}")
    settings = Settings(upstream=public, redirect_allow=allow)
    options = UpstreamOptions.from_settings(settings)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=LoopbackResolver())) as main,
        aiohttp.ClientSession(
            connector=GuardedConnector(options.policy, resolver=LoopbackResolver())
        ) as redirects,
    ):
        (up,) = settings.all_upstreams()
        client = UpstreamClient(up, main, redirect_session=redirects, options=options)
        if not followed:
            with pytest.raises(RedirectRefused):
                await client.request("GET", "library/app", "blobs", DIGEST)
            assert cdn.seen == []
            return
        resp = await client.request("GET", "library/app", "blobs", DIGEST)
        try:
            assert await resp.read() == BLOB
        finally:
            resp.release()
        assert [s.method for s in cdn.seen] == ["GET"]

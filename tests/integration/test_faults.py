"""Faults a real registry will not produce, from a fault upstream on port 0."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pullthrough.proxy.app import create_app
from tests.support.faults import Cdn, FaultRegistry, digest_of
from tests.support.mirror import (
    MirrorProcess,
    blob_files,
    eventually_blob_files,
    settings_for,
    temp_files,
)

BLOB = os.urandom(3 * 1024 * 1024 + 17)
DIGEST = digest_of(BLOB)
URL_BLOB = f"/v2/library/app/blobs/{DIGEST}"

Server = Callable[[web.Application], Awaitable[TestServer]]
Client = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def fault() -> FaultRegistry:
    registry = FaultRegistry()
    registry.add_blob(BLOB)
    registry.add_manifest(
        "1.0",
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "layers": [],
        },
    )
    return registry


@pytest.fixture
async def upstream(fault: FaultRegistry, aiohttp_server: Server) -> TestServer:
    return await aiohttp_server(fault.app())


@pytest.fixture
async def mirror(
    upstream: TestServer, aiohttp_client: Client, tmp_path: Path
) -> TestClient[Any, Any]:
    settings = settings_for(tmp_path / "cache", str(upstream.make_url("/")).rstrip("/"))
    return await aiohttp_client(create_app(settings))


async def _fetch_blob(mirror: TestClient[Any, Any]) -> tuple[int, bytes, bool]:
    """(status, body, complete): complete is False when the body was cut short."""
    async with mirror.get(URL_BLOB) as resp:
        try:
            body = await resp.read()
        except aiohttp.ClientPayloadError:
            return resp.status, b"", False
        return resp.status, body, True


@pytest.mark.parametrize("mode", ["corrupt", "truncate"])
async def test_bad_body_is_never_served_whole_nor_kept(
    mode: str, fault: FaultRegistry, mirror: TestClient[Any, Any], tmp_path: Path
) -> None:
    fault.mode = mode
    status, body, complete = await _fetch_blob(mirror)
    assert not (complete and status == 200 and body), "a bad download was served whole"
    await asyncio.sleep(0.1)
    assert blob_files(tmp_path / "cache") == []
    assert temp_files(tmp_path / "cache") == []

    fault.mode = "ok"
    status, body, complete = await _fetch_blob(mirror)
    assert (status, complete) == (200, True)
    assert hashlib.sha256(body).hexdigest() == DIGEST.removeprefix("sha256:")
    assert fault.count("GET", "blobs") == 2
    cached = await eventually_blob_files(tmp_path / "cache", 1)
    assert [p.name for p in cached] == [DIGEST.removeprefix("sha256:")]


async def test_concurrent_cold_requests_share_one_upstream_fetch(
    fault: FaultRegistry, mirror: TestClient[Any, Any]
) -> None:
    fault.stall = asyncio.Event()
    fault.stall_after = len(BLOB) // 3
    requests = [asyncio.create_task(_fetch_blob(mirror)) for _ in range(20)]
    await asyncio.sleep(0.3)
    fault.stall.set()
    results = await asyncio.gather(*requests)
    assert all(r == (200, BLOB, True) for r in results)
    assert fault.count("GET", "blobs") == 1
    # ...and the blob is a hit from now on.
    assert await _fetch_blob(mirror) == (200, BLOB, True)
    assert fault.count("GET", "blobs") == 1


async def test_download_goes_on_when_the_client_leaves(
    fault: FaultRegistry, mirror: TestClient[Any, Any], tmp_path: Path
) -> None:
    fault.stall = asyncio.Event()
    fault.stall_after = 1024 * 1024
    async with mirror.get(URL_BLOB) as resp:
        assert resp.status == 200
        await resp.content.readexactly(1000)
        resp.close()  # the client goes away mid-download
    fault.stall.set()
    for _ in range(100):
        if blob_files(tmp_path / "cache"):
            break
        await asyncio.sleep(0.05)
    assert await _fetch_blob(mirror) == (200, BLOB, True)
    assert fault.count("GET", "blobs") == 1


async def test_last_byte_waits_for_verification(
    fault: FaultRegistry, mirror: TestClient[Any, Any]
) -> None:
    fault.stall = asyncio.Event()
    fault.stall_after = len(BLOB)  # everything but the end-of-body is sent
    fault.chunk = len(BLOB)
    async with mirror.get(URL_BLOB) as resp:
        got = await resp.content.readexactly(len(BLOB) - 1)
        await asyncio.sleep(0.2)
        assert resp.content.at_eof() is False
        fault.stall.set()
        got += await resp.read()
    assert got == BLOB


async def test_range_during_download_and_on_a_hit(
    fault: FaultRegistry, mirror: TestClient[Any, Any]
) -> None:
    for _ in range(2):  # cold (follows the download), then warm (sendfile)
        async with mirror.get(URL_BLOB, headers={"Range": "bytes=100-1099"}) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes 100-1099/{len(BLOB)}"
            assert await resp.read() == BLOB[100:1100]
    for unsatisfiable in (f"bytes={len(BLOB) + 5}-", "bytes=abc", "bytes=0-1,5-9"):
        async with mirror.get(URL_BLOB, headers={"Range": unsatisfiable}) as resp:
            assert resp.status == 416
            assert resp.headers["Content-Range"] == f"bytes */{len(BLOB)}"
            assert (await resp.json())["errors"][0]["code"] == "RANGE_INVALID"
    async with mirror.get(URL_BLOB) as resp:  # the held file was let go
        assert await resp.read() == BLOB
    assert fault.count("GET", "blobs") == 1


async def test_upstream_429_is_passed_on_in_oci_form(
    fault: FaultRegistry, mirror: TestClient[Any, Any], tmp_path: Path
) -> None:
    fault.mode, fault.status = "status", 429
    fault.extra_headers = {"Retry-After": "30"}
    for path in (URL_BLOB, "/v2/library/app/manifests/1.0"):
        async with mirror.get(path) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "30"
            body = await resp.json()
            assert body["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert blob_files(tmp_path / "cache") == []


async def test_upstream_5xx_is_503_unavailable(
    fault: FaultRegistry, mirror: TestClient[Any, Any]
) -> None:
    fault.mode, fault.status = "status", 502
    async with mirror.get("/v2/library/app/manifests/1.0") as resp:
        assert resp.status == 503
        assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"


async def test_manifest_with_wrong_digest_is_refused_and_not_kept(
    fault: FaultRegistry, mirror: TestClient[Any, Any], tmp_path: Path
) -> None:
    fault.mode = "corrupt"
    async with mirror.get("/v2/library/app/manifests/1.0") as resp:
        assert resp.status == 502
        assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert list((tmp_path / "cache" / "manifests").rglob("*.*")) == []
    assert [p for p in (tmp_path / "cache" / "manifests").rglob("*") if p.is_file()] == []


async def test_redirect_never_carries_the_token_to_another_host(
    fault: FaultRegistry, aiohttp_server: Server, mirror: TestClient[Any, Any]
) -> None:
    cdn = Cdn(fault)
    cdn_server = await aiohttp_server(cdn.app())
    fault.require_token = True
    fault.redirect_to = str(cdn_server.make_url("")).rstrip("/")
    assert await _fetch_blob(mirror) == (200, BLOB, True)
    blob_gets = [s for s in fault.seen if "/blobs/" in s.path]
    assert blob_gets[-1].headers["Authorization"].startswith("Bearer tok-")
    assert len(cdn.seen) == 1
    assert "Authorization" not in cdn.seen[0].headers
    assert cdn.seen[0].path.endswith("?sig=abc")


async def test_known_accept_lines_are_all_forwarded_junk_is_not(
    fault: FaultRegistry, mirror: TestClient[Any, Any]
) -> None:
    accept = [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
    headers = [("Accept", a) for a in accept] + [("Accept", "x-junk/1234")]
    async with mirror.get("/v2/library/app/manifests/1.0", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == (
            "application/vnd.docker.distribution.manifest.v2+json"
        )
        json.loads(await resp.read())
    first = next(s for s in fault.seen if "/manifests/" in s.path)
    # As a set, in a fixed order: the tag index's key is this set.
    assert first.accept == sorted(accept)


async def test_killed_mid_download_nothing_is_served_after_restart(
    fault: FaultRegistry, upstream: TestServer, tmp_path: Path
) -> None:
    fault.stall = asyncio.Event()
    fault.stall_after = len(BLOB) // 2
    cache = tmp_path / "cache"
    mirror = MirrorProcess(cache, str(upstream.make_url("/")).rstrip("/"))
    await asyncio.to_thread(mirror.start)
    try:
        async with aiohttp.ClientSession() as session, session.get(mirror.url + URL_BLOB) as resp:
            await resp.content.readexactly(len(BLOB) // 4)
            mirror.kill()  # SIGKILL: no clean-up code runs
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        assert [p.suffix for p in temp_files(cache)] == [".partial", ".size"]
        assert blob_files(cache) == []

        fault.stall = None
        await asyncio.to_thread(mirror.start)
        assert temp_files(cache) == []  # the crash's leftovers are gone at start-up
        async with aiohttp.ClientSession() as session, session.get(mirror.url + URL_BLOB) as resp:
            assert await resp.read() == BLOB
        assert fault.count("GET", "blobs") == 2  # fetched afresh, not resumed from junk
    finally:
        fault.stall = None
        mirror.stop()


@pytest.fixture
async def revalidating_mirror(
    upstream: TestServer, aiohttp_client: Client, tmp_path: Path
) -> TestClient[Any, Any]:
    """A mirror that asks the upstream about a tag on every pull (tag_ttl=0)."""
    base = str(upstream.make_url("/")).rstrip("/")
    return await aiohttp_client(create_app(settings_for(tmp_path / "cache", base, tag_ttl=0.0)))


async def test_429_serves_a_cached_tag_stale_and_passes_it_on_for_the_rest(
    fault: FaultRegistry, revalidating_mirror: TestClient[Any, Any]
) -> None:
    mirror = revalidating_mirror
    fault.add_manifest("2.0", {"schemaVersion": 2, "layers": [{"size": 1}]})
    async with mirror.get("/v2/library/app/manifests/1.0") as resp:
        cached = await resp.read()
    fault.mode, fault.status, fault.extra_headers = "status", 429, {"Retry-After": "120"}
    async with mirror.get("/v2/library/app/manifests/1.0") as resp:
        assert resp.status == 200
        assert await resp.read() == cached
    async with mirror.get("/v2/library/app/manifests/2.0") as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "120"
        assert (await resp.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    async with mirror.get("/metrics") as resp:
        text = await resp.text()
    assert 'pullthrough_stale_served_total{reason="ratelimited"} 1.0' in text


async def test_rate_limit_headers_become_gauges(
    fault: FaultRegistry, mirror: TestClient[Any, Any]
) -> None:
    fault.extra_headers = {
        "RateLimit-Limit": "100;w=21600",
        "RateLimit-Remaining": "42;w=21600",
        "Docker-RateLimit-Source": "192.0.2.1",
    }
    async with mirror.get("/v2/library/app/manifests/1.0") as resp:
        assert resp.status == 200
    async with mirror.get("/metrics") as resp:
        text = await resp.text()
    assert 'pullthrough_upstream_ratelimit_limit{upstream="docker.io"} 100.0' in text
    assert 'pullthrough_upstream_ratelimit_remaining{upstream="docker.io"} 42.0' in text


async def test_revalidations_reuse_one_token(
    fault: FaultRegistry, revalidating_mirror: TestClient[Any, Any]
) -> None:
    fault.require_token = True  # after start-up, so the first pull meets the challenge
    for _ in range(5):
        async with revalidating_mirror.get("/v2/library/app/manifests/1.0") as resp:
            assert resp.status == 200
    assert fault.tokens_issued == 1
    gets = [s.path for s in fault.seen if s.method == "GET" and "/manifests/" in s.path]
    heads = [s.path for s in fault.seen if s.method == "HEAD"]
    # A tag never seen is fetched with one GET (after the 401 that teaches the
    # challenge); each later pull revalidates with one HEAD and reuses the token.
    assert len(gets) == 2
    assert len(heads) == 4

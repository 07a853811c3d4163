"""Read-ahead: a cold pull's blobs fetched once each, only for what clients pull."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pullthrough.cache.digests import Digest
from pullthrough.proxy.app import create_app
from pullthrough.proxy.keys import MIRRORS
from tests.integration.test_metrics import scrape, value
from tests.support.faults import FaultRegistry, digest_of
from tests.support.images import Image, make_image, make_index_image
from tests.support.mirror import MirrorProcess, settings_for
from tests.support.registry import AccessLogEntry, Registry
from tests.support.skopeo import Skopeo, dir_blob_digests

Server = Callable[[web.Application], Awaitable[TestServer]]
Client = Callable[..., Awaitable[TestClient[Any, Any]]]
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def blob_gets(entries: list[AccessLogEntry]) -> list[str]:
    """The digests of the blob downloads (2xx) the upstream served."""
    return [
        e.path.rsplit("/", 1)[1]
        for e in entries
        if e.method == "GET" and "/blobs/" in e.path and e.status < 300
    ]


def wait_idle(mirror: MirrorProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Metrics once no download runs (read-ahead may outlive the client's pull)."""
    deadline = time.monotonic() + 20
    while True:
        samples = scrape(mirror.url)
        if value(samples, "pullthrough_downloads_in_flight") == 0:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError("downloads still running after 20 s")
        time.sleep(0.05)


def pull(skopeo: Skopeo, mirror: MirrorProcess, image: Image, dest: Path) -> None:
    host = mirror.url.removeprefix("http://")
    skopeo.copy(f"docker://{host}/{image.name}:{image.tag}", f"dir:{dest}")


@pytest.mark.parametrize("prefetch", [True, False])
def test_cold_skopeo_pull_fetches_every_blob_once_and_counts_read_ahead(
    prefetch: bool, upstream: Registry, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    image = make_image("team/layers", f"v-{prefetch}", f"readahead-{prefetch}", [65536] * 8)
    upstream.push(image)
    env = {"PULLTHROUGH_PREFETCH": "true" if prefetch else "false"}
    mirror = MirrorProcess(tmp_path / "cache", upstream.url, env=env)
    mirror.start()
    try:
        mark = upstream.mark()
        pull(skopeo_cli, mirror, image, tmp_path / "pulled")
        samples = wait_idle(mirror)
        fetched = blob_gets(upstream.requests_since(mark))
    finally:
        mirror.stop()
    wanted = {b.digest for b in image.blobs_of(image.top)}
    assert dir_blob_digests(tmp_path / "pulled") == wanted
    assert sorted(fetched) == sorted(wanted), "each blob once from the upstream"
    started_ = value(samples, "pullthrough_prefetch_started_total")
    used = value(samples, "pullthrough_prefetch_used_total")
    prefetched = value(samples, "pullthrough_requests_total", kind="blob", result="prefetched")
    missed = value(samples, "pullthrough_requests_total", kind="blob", result="miss")
    assert prefetched + missed == len(wanted)
    assert value(samples, "pullthrough_prefetch_unclaimed_bytes") == 0
    if prefetch:
        assert started_ >= 1
        assert used == prefetched == started_
    else:
        assert started_ == used == prefetched == 0


def test_index_reads_ahead_only_the_platform_pulled(
    upstream: Registry, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    amd64 = make_image("team/multi", "", "ra-amd64", [32768] * 3, platform="linux/amd64")
    arm64 = make_image("team/multi", "", "ra-arm64", [32768] * 3, platform="linux/arm64")
    index = make_index_image("team/multi", "v1", [amd64, arm64])
    upstream.push(index)
    mirror = MirrorProcess(tmp_path / "cache", upstream.url)
    mirror.start()
    try:
        mark = upstream.mark()
        pull(skopeo_cli, mirror, index, tmp_path / "pulled")  # this host's platform only
        samples = wait_idle(mirror)
        fetched = blob_gets(upstream.requests_since(mark))
    finally:
        mirror.stop()
    wanted = {b.digest for b in amd64.blobs}
    assert dir_blob_digests(tmp_path / "pulled") == wanted
    assert sorted(fetched) == sorted(wanted), "no byte of the platform nobody pulled"
    assert value(samples, "pullthrough_prefetch_started_total") >= 1


# -- policy, against a fault upstream ------------------------------------------------


def layered(fault: FaultRegistry, tag: str, count: int, size: int) -> tuple[str, list[str]]:
    """An image of ``count`` layers on the fault upstream: (manifest digest, blobs)."""
    config = fault.add_blob(json.dumps({"tag": tag}).encode())
    layers = [fault.add_blob(os.urandom(size)) for _ in range(count)]
    doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/json", "digest": config, "size": 1},
        "layers": [
            {"mediaType": "application/octet-stream", "digest": d, "size": size} for d in layers
        ],
    }
    return fault.add_manifest(tag, doc), [config, *layers]


async def mirror_of(
    fault: FaultRegistry,
    aiohttp_server: Server,
    aiohttp_client: Client,
    tmp_path: Path,
    **overrides: object,
) -> TestClient[Any, Any]:
    server = await aiohttp_server(fault.app())
    upstream = str(server.make_url("/")).rstrip("/")
    return await aiohttp_client(create_app(settings_for(tmp_path / "cache", upstream, **overrides)))


async def settle(client: TestClient[Any, Any]) -> None:
    """Read-ahead done, and the downloads it started committed."""
    readahead = client.app[MIRRORS].default.readahead
    assert readahead is not None
    await readahead.settle()
    await client.app[MIRRORS].default.settle()


async def test_read_ahead_backs_off_after_a_429_and_clients_still_get_blobs(
    aiohttp_server: Server, aiohttp_client: Client, tmp_path: Path
) -> None:
    fault = FaultRegistry()
    _, blobs = layered(fault, "a", 6, 1024)
    layered(fault, "b", 6, 1024)
    fault.blob_status = 429
    fault.extra_headers = {"Retry-After": "60"}
    mirror = await mirror_of(fault, aiohttp_server, aiohttp_client, tmp_path, prefetch_per_image=2)
    async with mirror.get("/v2/app/manifests/a") as resp:
        assert resp.status == 200
    await settle(mirror)
    # Both workers of the image tried once, were refused, and stopped.
    assert fault.count("GET", "blobs") == 2
    async with mirror.get("/v2/app/manifests/b") as resp:
        assert resp.status == 200
    await settle(mirror)
    assert fault.count("GET", "blobs") == 2, "paused: no read-ahead for another image"
    # A client's own request still goes upstream, and hears the 429 with its body.
    async with mirror.get(f"/v2/app/blobs/{blobs[3]}") as resp:
        assert resp.status == 429
        assert (await resp.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    fault.blob_status = None
    async with mirror.get(f"/v2/app/blobs/{blobs[3]}") as resp:
        body = await resp.read()
    assert "sha256:" + hashlib.sha256(body).hexdigest() == blobs[3]
    metrics = (await (await mirror.get("/metrics")).text()).splitlines()
    assert "pullthrough_prefetch_backoffs_total 2.0" in metrics


@pytest.mark.parametrize(("max_size", "expected"), [(200_000, 0), (2_000_000, 6)])
async def test_read_ahead_skips_an_image_larger_than_the_cache_cap(
    max_size: int,
    expected: int,
    aiohttp_server: Server,
    aiohttp_client: Client,
    tmp_path: Path,
) -> None:
    fault = FaultRegistry()
    layered(fault, "a", 5, 100_000)  # 500 kB and a config
    mirror = await mirror_of(fault, aiohttp_server, aiohttp_client, tmp_path, max_size=max_size)
    async with mirror.get("/v2/app/manifests/a") as resp:
        assert resp.status == 200
    await settle(mirror)
    assert fault.count("GET", "blobs") == expected


async def test_many_downloads_starting_at_once_ask_for_one_token(
    aiohttp_server: Server, aiohttp_client: Client, tmp_path: Path
) -> None:
    fault = FaultRegistry(require_token=True)
    _, blobs = layered(fault, "a", 12, 4096)
    mirror = await mirror_of(fault, aiohttp_server, aiohttp_client, tmp_path, prefetch=False)

    async def get(digest: str) -> bytes:
        async with mirror.get(f"/v2/app/blobs/{digest}") as resp:
            assert resp.status == 200
            return await resp.read()

    bodies = await asyncio.gather(*(get(d) for d in blobs))
    assert [digest_of(b) for b in bodies] == blobs
    assert fault.tokens_issued == 1


async def test_a_cached_manifest_whose_layers_went_reads_them_ahead_again(
    aiohttp_server: Server, aiohttp_client: Client, tmp_path: Path
) -> None:
    fault = FaultRegistry()
    _, blobs = layered(fault, "a", 4, 2048)
    mirror = await mirror_of(fault, aiohttp_server, aiohttp_client, tmp_path)
    async with mirror.get("/v2/app/manifests/a") as resp:
        assert resp.status == 200
    await settle(mirror)
    assert fault.count("GET", "blobs") == len(blobs)
    store = mirror.app[MIRRORS].default.blobs
    for gone in blobs[1:3]:  # evicted, say
        assert await store.remove(Digest.parse(gone))
    async with mirror.get("/v2/app/manifests/a") as resp:
        assert resp.status == 200
    await settle(mirror)
    assert fault.count("GET", "blobs") == len(blobs) + 2
    async with mirror.get("/v2/app/manifests/a") as resp:  # all there: nothing more
        assert resp.status == 200
    await settle(mirror)
    assert fault.count("GET", "blobs") == len(blobs) + 2
    assert all([await store.stat(Digest.parse(d)) is not None for d in blobs])

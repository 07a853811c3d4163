"""A cache on a real small disk (a 100 MiB tmpfs) that fills up, with the real upstream.

A blob larger than the free space is still served whole and verified, and not
kept; a full disk still answers manifests; with a size cap, eviction makes room
before the mirror gives up on keeping a blob.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pullthrough.cache.blobs import BlobSink
from pullthrough.cache.space import RESERVE_BYTES
from pullthrough.proxy.app import create_app
from pullthrough.proxy.keys import MIRRORS
from tests.support.images import ACCEPT_ALL_MANIFESTS, HELLO, Blob, Image, make_image
from tests.support.mirror import (
    MirrorProcess,
    blob_files,
    settings_for,
    temp_files,
    workers_of,
)
from tests.support.registry import AccessLogEntry, Registry
from tests.support.tmpfs import fill, free_bytes, tmpfs

MiB = 1 << 20
Client = TestClient[Any, Any]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", "100m") as path:
        yield path


@pytest.fixture(scope="module")
def huge(upstream: Registry) -> Image:
    """One 150 MiB layer: more than the whole small disk."""
    image = make_image(
        "team/huge", "1", seed="disk-full huge", layer_sizes=(150 * MiB,), compresslevel=0
    )
    upstream.push(image)
    return image


@pytest.fixture(scope="module")
def halves(upstream: Registry) -> list[Image]:
    """Two 60 MiB layers: either fits the small disk, both do not."""
    images = [
        make_image(f"team/half{i}", "1", seed=f"disk-full {i}", layer_sizes=(60 * MiB,))
        for i in range(2)
    ]
    for image in images:
        upstream.push(image)
    return images


def layer(image: Image) -> Blob:
    return image.layers_of(image.top)[0]


async def mirror_on(path: Path, upstream: Registry, make: Any, **settings: object) -> Client:
    client: Client = await make(create_app(settings_for(path / "cache", upstream.url, **settings)))
    return client


async def pull_blob(client: Client, image: Image, blob: Blob) -> tuple[int, str, str]:
    """(bytes received, their digest, content type), read as a client reads."""
    async with client.get(f"/v2/{image.name}/blobs/{blob.digest}") as resp:
        assert resp.status == 200, await resp.text()
        hasher = hashlib.sha256()
        received = 0
        async for chunk in resp.content.iter_chunked(MiB):
            hasher.update(chunk)
            received += len(chunk)
        return received, f"sha256:{hasher.hexdigest()}", resp.content_type


async def settle(client: Client) -> None:
    for mirror in client.app[MIRRORS]:
        await mirror.settle()


async def metric(client: Client, name: str, **labels: str) -> float:
    async with client.get("/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def upstream_blob_gets(upstream: Registry, mark: int, blob: Blob) -> list[AccessLogEntry]:
    entries = await asyncio.to_thread(upstream.requests_since, mark)
    return [e for e in entries if e.method == "GET" and e.route.endswith(blob.digest)]


def probes(cache: Path) -> list[Path]:
    return sorted((cache / "tmp").glob("probe-*"))


async def test_a_blob_larger_than_the_disk_is_served_whole_and_not_kept(
    small_disk: Path,
    huge: Image,
    upstream: Registry,
    aiohttp_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await mirror_on(small_disk, upstream, aiohttp_client)
    cache = small_disk / "cache"
    blob = layer(huge)
    assert blob.size > 1.4 * free_bytes(small_disk)
    for pull in (1, 2):
        mark = await asyncio.to_thread(upstream.mark)
        received, digest, content_type = await pull_blob(client, huge, blob)
        assert (received, digest) == (blob.size, blob.digest)
        assert content_type == "application/octet-stream"
        await settle(client)
        assert blob_files(cache) == []
        assert temp_files(cache) == []
        # Nothing could be kept: every pull costs one upstream fetch, never more.
        fetches = await upstream_blob_gets(upstream, mark, blob)
        assert [e.status for e in fetches] == [200]
        print(
            f"MEASURED pull {pull}: {received} bytes of {blob.size}, digest ok, "
            f"{len(fetches)} upstream GET, left: {blob_files(cache) + temp_files(cache)}"
        )
    failures = await metric(client, "pullthrough_cache_write_failures_total", reason="no_space")
    assert failures == 2
    async with client.get("/readyz") as resp:
        body = await resp.json()
        assert resp.status == 200
        assert body == {"status": "ready", "cache": "full", "upstream": "reachable"}
    assert probes(cache) == []
    # Warned about, once: a full disk must not write a line per request.
    warnings = [r for r in caplog.records if r.name == "pullthrough.cache.space"]
    assert [r.levelname for r in warnings] == ["WARNING"]
    print(f"MEASURED readyz: {resp.status} {body}; write failures (no_space): {failures}")


async def test_a_full_disk_still_answers_manifests_and_small_blobs(
    small_disk: Path, upstream: Registry, aiohttp_client: Any
) -> None:
    client = await mirror_on(small_disk, upstream, aiohttp_client)
    cache = small_disk / "cache"
    async with client.get("/v2/") as resp:
        assert resp.status == 200
    fill(small_disk)
    assert free_bytes(small_disk) == 0
    hello = upstream.images[HELLO]
    name = hello.name.removeprefix("library/")
    headers = {"Accept": ACCEPT_ALL_MANIFESTS}
    mark = await asyncio.to_thread(upstream.mark)
    for reference in (hello.tag, hello.digest, hello.tag):
        async with client.get(f"/v2/{name}/manifests/{reference}", headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.content_type == hello.top.media_type
            assert resp.headers["Docker-Content-Digest"] == hello.digest
            assert await resp.read() == hello.top.data
    # Not on disk, but remembered: asked by digest again, it is not fetched again.
    entries = await asyncio.to_thread(upstream.requests_since, mark)
    assert len([e for e in entries if e.method == "GET" and "/manifests/" in e.route]) == 1
    assert [p for p in (cache / "manifests").rglob("*") if p.is_file()] == []
    small = layer(hello)
    assert await pull_blob(client, hello, small) == (
        small.size,
        small.digest,
        "application/octet-stream",
    )
    await settle(client)
    full = {"status": "ready", "cache": "full", "upstream": "reachable"}
    for _ in range(3):
        async with client.get("/readyz") as resp:
            assert resp.status == 200
            assert await resp.json() == full
    assert probes(cache) == []
    assert temp_files(cache) == []
    assert blob_files(cache) == []
    assert await metric(client, "pullthrough_cache_write_failures_total", reason="no_space") >= 3


async def test_with_a_size_cap_eviction_makes_room_before_giving_up(
    small_disk: Path, halves: list[Image], upstream: Registry, aiohttp_client: Any
) -> None:
    # The cap is above the disk's size: only a full disk can make room here.
    client = await mirror_on(small_disk, upstream, aiohttp_client, max_size=1 << 30)
    cache = small_disk / "cache"
    first, second = halves
    assert await pull_blob(client, first, layer(first)) == (
        layer(first).size,
        layer(first).digest,
        "application/octet-stream",
    )
    await settle(client)
    (kept,) = blob_files(cache)
    old = kept.stat().st_mtime - 600
    os.utime(kept, (old, old))  # unused for ten minutes: the one to go
    assert free_bytes(small_disk) < layer(second).size
    received, digest, _ = await pull_blob(client, second, layer(second))
    assert (received, digest) == (layer(second).size, layer(second).digest)
    await settle(client)
    assert [p.name for p in blob_files(cache)] == [layer(second).digest.removeprefix("sha256:")]
    assert temp_files(cache) == []
    assert await metric(client, "pullthrough_evictions_total", kind="blob") == 1
    assert await metric(client, "pullthrough_cache_write_failures_total", reason="no_space") == 0
    async with client.get("/readyz") as resp:
        assert (await resp.json())["cache"] == "writable"


async def test_a_follower_in_another_worker_goes_on_when_the_writer_gives_up(
    small_disk: Path,
    huge: Image,
    upstream: Registry,
    aiohttp_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two apps on one cache root meet each other's flocks as two worker processes do.
    settings = settings_for(small_disk / "cache", upstream.url)
    first: Client = await aiohttp_client(create_app(settings))
    second: Client = await aiohttp_client(create_app(settings))
    writer_store = first.app[MIRRORS].default.blobs
    joined = asyncio.Event()
    write = BlobSink.write

    async def write_once_followed(sink: BlobSink, chunk: bytes) -> None:
        # Only timing: the first worker's download waits, at 20 MiB, until the
        # other worker follows it, so that it surely gives up under a follower.
        if sink._store is writer_store and sink._download.writer.stored > 20 * MiB:
            await joined.wait()
        await write(sink, chunk)

    monkeypatch.setattr(BlobSink, "write", write_once_followed)
    blob = layer(huge)
    url = f"/v2/{huge.name}/blobs/{blob.digest}"
    mark = await asyncio.to_thread(upstream.mark)

    async def follow() -> tuple[int, str]:
        hasher = hashlib.sha256()
        async with second.get(url) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_chunked(MiB):
                joined.set()
                hasher.update(chunk)
        return resp.content_length or 0, f"sha256:{hasher.hexdigest()}"

    async with first.get(url) as resp:
        assert resp.status == 200
        lead = hashlib.sha256(await resp.content.readexactly(MiB))
        follower = asyncio.create_task(follow())
        async for chunk in resp.content.iter_chunked(MiB):
            lead.update(chunk)
    assert f"sha256:{lead.hexdigest()}" == blob.digest
    assert await follower == (blob.size, blob.digest)
    assert await metric(second, "pullthrough_coalesced_requests_total", kind="blob") == 1
    await settle(first)
    await settle(second)
    assert blob_files(small_disk / "cache") == []
    assert temp_files(small_disk / "cache") == []
    # The follower's worker fetched it again for itself: one upstream GET each.
    assert len(await upstream_blob_gets(upstream, mark, blob)) == 2


def _get(url: str, accept: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.status, resp.read()


def test_a_full_disk_does_not_keep_the_mirror_from_starting(
    small_disk: Path, upstream: Registry, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    """SQLite cannot open the tag index on a full disk: the space set aside for it
    is given back, so a restart (or a replaced worker) serves what is cached."""
    hello = upstream.images[HELLO]
    name = hello.name.removeprefix("library/")
    small = layer(hello)
    cache = small_disk / "cache"
    mirror = MirrorProcess(cache, upstream.url, workers=2)
    mirror.log = tmp_path / "mirror.log"  # the log must not need the full disk
    stop_later.append(mirror)
    mirror.start()
    manifest_url = f"{mirror.url}/v2/{name}/manifests/{hello.digest}"
    blob_url = f"{mirror.url}/v2/{name}/blobs/{small.digest}"
    assert _get(manifest_url, ACCEPT_ALL_MANIFESTS) == (200, hello.top.data)
    assert _get(blob_url) == (200, small.data)
    mirror.stop()
    assert (cache / "index.reserve").stat().st_size == RESERVE_BYTES

    fill(small_disk)
    assert free_bytes(small_disk) == 0
    mirror.start()
    assert mirror.proc is not None
    assert _get(manifest_url, ACCEPT_ALL_MANIFESTS) == (200, hello.top.data)
    assert _get(blob_url) == (200, small.data)
    assert not (cache / "index.reserve").exists()
    # A worker that dies on the full disk is replaced, and serves too.
    deadline = time.monotonic() + 20
    while len(workers_of(mirror.proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    before = workers_of(mirror.proc.pid)
    os.kill(min(before), signal.SIGKILL)
    while time.monotonic() < deadline and len(workers_of(mirror.proc.pid) - before) < 1:
        time.sleep(0.05)
    new = workers_of(mirror.proc.pid) - before
    assert len(new) == 1
    while f"worker pid {min(new)} serving" not in mirror.log.read_text():
        assert time.monotonic() < deadline, mirror.log.read_text()[-2000:]
        time.sleep(0.05)
    for _ in range(20):  # both workers answer, whichever takes the connection
        assert _get(blob_url) == (200, small.data)
    assert mirror.proc.poll() is None
    assert "Traceback" not in mirror.log.read_text()

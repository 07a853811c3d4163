"""Tag freshness, serving stale, offline mode and Accept negotiation, on a real upstream."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.images import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    Image,
    make_image,
    seed_images,
)
from tests.support.mirror import MirrorProcess
from tests.support.registry import AccessLogEntry, Registry, RegistryFactory
from tests.support.skopeo import Skopeo, dir_manifest

ALPINE = "library/alpine:3.19"


@pytest.fixture
def origin(make_registry: RegistryFactory) -> Registry:
    """An upstream of this test's own, which it may stop and whose tags it may move."""
    images = seed_images()
    return make_registry(seed=[images[ALPINE], images["library/hello:latest"]])


def mirror_of(upstream: Registry, cache: Path, **settings: str) -> MirrorProcess:
    env = {f"PULLTHROUGH_{k.upper()}": v for k, v in settings.items()}
    mirror = MirrorProcess(cache, upstream.url, env=env)
    mirror.start()
    return mirror


def summary(entries: list[AccessLogEntry]) -> list[str]:
    """'HEAD manifests 200' style lines: what reached the upstream."""
    out = []
    for e in entries:
        kind = next((k for k in ("manifests", "blobs", "tags") if f"/{k}/" in e.path), e.path)
        out.append(f"{e.method} {kind} {e.status}")
    return out


def pull(skopeo: Skopeo, mirror: MirrorProcess, ref: str, dest: Path) -> None:
    skopeo.copy(f"docker://{mirror.url.removeprefix('http://')}/{ref}", f"dir:{dest}")


def test_upstream_requests_cold_warm_and_after_the_ttl(
    origin: Registry, skopeo_cli: Skopeo, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    mirror = mirror_of(origin, tmp_path / "cache", tag_ttl="2")
    stop_later.append(mirror)
    mark = origin.mark()
    pull(skopeo_cli, mirror, "alpine:3.19", tmp_path / "cold")
    cold = summary(origin.requests_since(mark))
    assert cold.count("GET blobs 200") == 3  # config + 2 layers of linux/amd64
    assert "GET manifests 200" in cold

    mark = origin.mark()
    pull(skopeo_cli, mirror, "alpine:3.19", tmp_path / "warm")
    assert summary(origin.requests_since(mark)) == []  # inside the TTL: nothing at all

    time.sleep(2.2)
    mark = origin.mark()
    pull(skopeo_cli, mirror, "alpine:3.19", tmp_path / "stale")
    assert summary(origin.requests_since(mark)) == ["HEAD manifests 200"]
    assert dir_manifest(tmp_path / "stale") == dir_manifest(tmp_path / "cold")


def test_upstream_stopped_cached_content_is_still_served(
    origin: Registry, skopeo_cli: Skopeo, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    image = origin.images[ALPINE]
    mirror = mirror_of(origin, tmp_path / "cache", tag_ttl="0")  # revalidate every time
    stop_later.append(mirror)
    pull(skopeo_cli, mirror, "alpine:3.19", tmp_path / "before")
    origin.stop()

    pull(skopeo_cli, mirror, "alpine:3.19", tmp_path / "by-tag")
    pull(skopeo_cli, mirror, f"alpine@{image.digest}", tmp_path / "by-digest")
    assert dir_manifest(tmp_path / "by-tag") == dir_manifest(tmp_path / "before")
    failed = skopeo_cli.copy(
        f"docker://{mirror.url.removeprefix('http://')}/hello:latest",
        f"dir:{tmp_path / 'uncached'}",
        check=False,
    )
    assert failed.returncode != 0

    async def check() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{mirror.url}/v2/hello/manifests/latest") as resp:
                assert resp.status == 503
                assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
            async with session.get(f"{mirror.url}/metrics") as resp:
                text = await resp.text()
        stale = re.search(r'pullthrough_stale_served_total\{reason="unavailable"\} (\d+)', text)
        served = re.search(r'requests_total\{kind="manifest",result="stale"\} (\d+)', text)
        assert stale is not None
        assert served is not None
        assert int(stale[1]) == int(served[1]) >= 1  # skopeo asks for the tag twice a copy

    asyncio.run(check())


def test_a_moved_tag_is_seen_after_the_ttl_and_not_before(
    origin: Registry, skopeo_cli: Skopeo, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    first = make_image("library/moving", "1", seed="first")
    second = make_image("library/moving", "1", seed="second")
    origin.push(first)
    mirror = mirror_of(origin, tmp_path / "cache", tag_ttl="3")
    stop_later.append(mirror)
    pull(skopeo_cli, mirror, "moving:1", tmp_path / "a")
    assert dir_manifest(tmp_path / "a") == first.top.data

    origin.push(second)
    pull(skopeo_cli, mirror, "moving:1", tmp_path / "b")
    assert dir_manifest(tmp_path / "b") == first.top.data  # still inside the TTL

    time.sleep(3.2)
    pull(skopeo_cli, mirror, "moving:1", tmp_path / "c")
    assert dir_manifest(tmp_path / "c") == second.top.data


def test_offline_mode_serves_the_cache_and_never_calls_upstream(
    origin: Registry, skopeo_cli: Skopeo, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    cache = tmp_path / "cache"
    online = mirror_of(origin, cache)
    pull(skopeo_cli, online, "alpine:3.19", tmp_path / "online")
    online.stop()

    offline = mirror_of(origin, cache, offline="true", tag_ttl="0")
    stop_later.append(offline)
    mark = origin.mark()
    pull(skopeo_cli, offline, "alpine:3.19", tmp_path / "offline")
    assert dir_manifest(tmp_path / "offline") == dir_manifest(tmp_path / "online")

    async def check() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{offline.url}/v2/hello/manifests/latest") as resp:
                assert resp.status == 404
                assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
            blob = "sha256:" + "1" * 64
            async with session.get(f"{offline.url}/v2/hello/blobs/{blob}") as resp:
                assert resp.status == 404
                assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"

    asyncio.run(check())
    assert origin.requests_since(mark) == []


async def test_clients_accepting_different_types_get_their_own_answer(
    origin: Registry, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    image: Image = origin.images[ALPINE]
    amd64 = image.for_platform("linux/amd64")
    mirror = await asyncio.to_thread(mirror_of, origin, tmp_path / "cache")
    stop_later.append(mirror)
    url = f"{mirror.url}/v2/alpine/manifests/3.19"
    schema2_only = [("Accept", DOCKER_MANIFEST)]
    lists_too = [("Accept", DOCKER_MANIFEST_LIST), ("Accept", DOCKER_MANIFEST)]
    async with aiohttp.ClientSession() as session:
        for round_ in ("cold", "warm"):
            mark = origin.mark()
            async with session.get(url, headers=schema2_only) as resp:
                assert resp.headers["Content-Type"] == DOCKER_MANIFEST, round_
                assert await resp.read() == amd64.data
            async with session.get(url, headers=lists_too) as resp:
                assert resp.headers["Content-Type"] == DOCKER_MANIFEST_LIST, round_
                assert await resp.read() == image.top.data
            if round_ == "warm":
                assert origin.requests_since(mark) == []


async def test_tag_list_is_proxied_paginated_cached_and_served_when_upstream_is_down(
    origin: Registry, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    origin.push(make_image("library/alpine", "3.20", seed="320"))
    mirror = await asyncio.to_thread(mirror_of, origin, tmp_path / "cache", tag_ttl="0")
    stop_later.append(mirror)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{mirror.url}/v2/alpine/tags/list") as resp:
            assert resp.status == 200
            assert json.loads(await resp.read()) == {
                "name": "library/alpine",
                "tags": ["3.19", "3.20"],
            }
        mark = origin.mark()
        page = f"{mirror.url}/v2/alpine/tags/list?n=1&last=3.10"
        async with session.get(page) as resp:
            assert resp.status == 200
            first = await resp.read()
        # distribution 2.8 ignores n and last (pagination came in v3); what
        # matters here is that they reached it, and that each page is kept.
        [listed] = origin.requests_since(mark)
        assert listed.path == "/v2/library/alpine/tags/list?n=1&last=3.10"
        await asyncio.to_thread(origin.stop)
        async with session.get(page) as resp:
            assert resp.status == 200  # stale, from the cache
            assert await resp.read() == first
        async with session.get(f"{mirror.url}/v2/alpine/tags/list?n=0") as resp:
            assert resp.status == 400
            assert (await resp.json())["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"

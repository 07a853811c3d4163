"""Bit rot: a flipped byte on disk is found, taken out of service and fetched again.

Real parts throughout: the upstream is distribution with token auth, pulls are
skopeo or HTTP, ``cache verify`` runs as the operator runs it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from pullthrough.proxy.app import create_app
from tests.support import httpclient
from tests.support.images import Image, make_image
from tests.support.mirror import MirrorProcess, run_cli, settings_for
from tests.support.registry import AccessLogEntry, Registry
from tests.support.skopeo import Skopeo, dir_blob_digests

MiB = 1024 * 1024
HELLO = "library/hello:latest"
Client = Any


def flip_byte(path: Path, offset: int | None = None) -> None:
    """What a failing disk does: one byte changes, the size does not."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def blob_path(cache: Path, digest: str) -> Path:
    hex_ = digest.removeprefix("sha256:")
    return cache / "blobs" / "sha256" / hex_[:2] / hex_


def manifest_path(cache: Path, digest: str) -> Path:
    hex_ = digest.removeprefix("sha256:")
    return cache / "manifests" / "sha256" / hex_[:2] / hex_


def blob_gets(entries: list[AccessLogEntry], digest: str) -> list[AccessLogEntry]:
    return [e for e in entries if e.method == "GET" and e.route.endswith(f"/blobs/{digest}")]


def metric(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + (f"{{{selector}}}" if labels else "")) + r" ([0-9.e+]+)"
    found = re.search(pattern, text)
    return float(found[1]) if found else 0.0


def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text: str = resp.read().decode()
        return text


def test_cache_verify_finds_a_flipped_byte_and_the_next_pull_is_right(
    upstream: Registry, skopeo_cli: Skopeo, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    image = upstream.images[HELLO]
    layer = image.layers_of(image.top)[0].digest
    cache = tmp_path / "cache"
    # No background scrub: this test is about the command finding it.
    mirror = MirrorProcess(cache, upstream.url, env={"PULLTHROUGH_SCRUB_RATE": "0"})
    stop_later.append(mirror)
    mirror.start()
    ref = f"docker://{mirror.url.removeprefix('http://')}/hello:latest"
    skopeo_cli.copy(ref, f"dir:{tmp_path / 'cold'}")

    clean = run_cli("cache", "verify", cache=cache, upstream=upstream.url)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "all intact" in clean.stdout

    original = blob_path(cache, layer).read_bytes()
    flip_byte(blob_path(cache, layer))
    found = run_cli("cache", "verify", cache=cache, upstream=upstream.url)
    assert found.returncode == 1, found.stdout + found.stderr
    assert f"corrupt blob {layer}" in found.stdout, found.stdout
    assert "1 corrupt" in found.stdout
    assert not blob_path(cache, layer).exists()
    evidence = cache / "quarantine" / f"blob-sha256-{layer.removeprefix('sha256:')}"
    assert evidence.read_bytes() != original
    assert len(evidence.read_bytes()) == len(original)

    mark = upstream.mark()
    skopeo_cli.copy(ref, f"dir:{tmp_path / 'again'}")  # skopeo checks every digest
    assert dir_blob_digests(tmp_path / "again") == {b.digest for b in image.blobs_of(image.top)}
    pulled = (tmp_path / "again" / layer.removeprefix("sha256:")).read_bytes()
    assert pulled == original
    assert len(blob_gets(upstream.requests_since(mark), layer)) == 1  # fetched again
    assert hashlib.sha256(blob_path(cache, layer).read_bytes()).hexdigest() in layer

    again = run_cli("cache", "verify", cache=cache, upstream=upstream.url)
    assert again.returncode == 0, again.stdout + again.stderr
    du = run_cli("cache", "du", cache=cache, upstream=upstream.url)
    assert "1 quarantined file(s)" in du.stdout, du.stdout


def fresh_image(upstream: Registry, name: str, size: int) -> Image:
    image = make_image(f"bitrot/{name}", "1", seed=f"bitrot-{name}", layer_sizes=(size,))
    upstream.push(image)
    return image


async def warm(upstream: Registry, cache: Path, image: Image) -> None:
    result = await asyncio.to_thread(
        run_cli, "warm", f"{image.name}:{image.tag}", cache=cache, upstream=upstream.url
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_the_scrub_finds_a_flipped_byte_and_the_next_pull_is_right(
    aiohttp_client: Client, upstream: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    image = fresh_image(upstream, "scrubbed", 4 * MiB)
    layer = image.layers_of(image.top)[0]
    cache = tmp_path / "cache"
    await warm(upstream, cache, image)  # rot happens to what has been cached a while
    flip_byte(blob_path(cache, layer.digest))

    rate = 64 * MiB
    started = time.monotonic()
    client: TestClient[Any, Any] = await aiohttp_client(
        create_app(settings_for(cache, upstream.url, scrub_rate=rate))
    )
    deadline = started + 30
    while True:
        if not blob_path(cache, layer.digest).exists() or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    took = time.monotonic() - started
    assert not blob_path(cache, layer.digest).exists(), "the scrub did not find it"
    print(f"scrub found the flipped byte {took:.2f}s after start at {rate} bytes/s")
    text = await (await client.get("/metrics")).text()
    assert metric(text, "pullthrough_corrupt_objects_total", kind="blob") == 1
    assert f"corrupt blob {layer.digest}" in caplog.text
    assert metric(text, "pullthrough_scrub_bytes_total") >= layer.size

    mark = upstream.mark()
    resp = await client.get(f"/v2/{image.name}/blobs/{layer.digest}")
    body = await resp.read()
    assert resp.status == 200
    assert "sha256:" + hashlib.sha256(body).hexdigest() == layer.digest
    assert resp.headers["Docker-Content-Digest"] == layer.digest
    assert len(blob_gets(upstream.requests_since(mark), layer.digest)) == 1


def test_the_scrub_keeps_to_its_rate_with_several_workers(
    upstream: Registry, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    image = fresh_image(upstream, "ratelimited", 24 * MiB)
    cache = tmp_path / "cache"
    asyncio.run(warm(upstream, cache, image))
    rate = 4 * MiB
    # Two workers: only one may scrub, or the server would read at twice the rate.
    mirror = MirrorProcess(
        cache, upstream.url, workers=2, env={"PULLTHROUGH_SCRUB_RATE": f"{rate // MiB}MiB"}
    )
    stop_later.append(mirror)
    started = time.monotonic()
    mirror.start()
    time.sleep(3)
    scrubbed = metric(scrape(mirror.url), "pullthrough_scrub_bytes_total")
    elapsed = time.monotonic() - started
    print(f"scrubbed {scrubbed:.0f} bytes in {elapsed:.2f}s at a rate of {rate} bytes/s")
    # The throttle starts after the process does: it can only be under this.
    assert scrubbed <= rate * elapsed + MiB
    assert scrubbed >= rate * elapsed * 0.25  # and it does make progress


def get_manifest(url: str, name: str, digest: str) -> httpclient.Response:
    return httpclient.request(
        "GET",
        f"{url}/v2/{name}/manifests/{digest}",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )


def test_a_corrupt_manifest_is_fetched_again_after_a_restart_or_unknown_offline(
    upstream: Registry, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    image = upstream.images[HELLO]
    name = "library/hello"
    cache = tmp_path / "cache"
    quiet = {"PULLTHROUGH_SCRUB_RATE": "0"}  # the read path must catch it, not the scrub
    first = MirrorProcess(cache, upstream.url, env=quiet)
    stop_later.append(first)
    first.start()
    assert get_manifest(first.url, name, image.digest).body == image.top.data
    first.stop()

    path = manifest_path(cache, image.digest)
    flip_byte(path, offset=len(path.read_bytes()) - 10)  # inside the JSON
    second = MirrorProcess(cache, upstream.url, env=quiet)
    stop_later.append(second)
    second.start()
    mark = upstream.mark()
    resp = get_manifest(second.url, name, image.digest)
    assert resp.status == 200
    assert resp.body == image.top.data
    assert resp.header("Docker-Content-Digest") == image.digest
    fetched = [e for e in upstream.requests_since(mark) if e.route.endswith(image.digest)]
    assert [(e.method, e.status) for e in fetched] == [("GET", 200)]
    assert metric(scrape(second.url), "pullthrough_corrupt_objects_total", kind="manifest") == 1
    quarantined = cache / "quarantine" / f"manifest-sha256-{image.digest.removeprefix('sha256:')}"
    assert quarantined.exists()
    assert second.log.read_text().count("corrupt manifest") == 1
    second.stop()

    flip_byte(path, offset=len(path.read_bytes()) - 10)
    offline = MirrorProcess(cache, upstream.url, env={**quiet, "PULLTHROUGH_OFFLINE": "true"})
    stop_later.append(offline)
    offline.start()
    resp = get_manifest(offline.url, name, image.digest)
    assert resp.status == 404
    assert resp.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert image.top.data not in resp.body

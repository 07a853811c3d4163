"""Size cap and LRU eviction, pins, warm, cache ls/du and gc, with a real upstream."""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.images import Image, make_image
from tests.support.mirror import MirrorProcess, blob_files, run_cli
from tests.support.registry import Registry, RegistryFactory
from tests.support.skopeo import Skopeo, dir_blob_digests

MiB = 1024 * 1024


def images(n: int) -> list[Image]:
    # One incompressible ~1 MiB layer each (compresslevel 0 keeps sizes exact).
    return [
        make_image(f"team/img{i}", "1", seed=f"evict-{i}", layer_sizes=(MiB,), compresslevel=0)
        for i in range(n)
    ]


def cli(*args: str, cache: Path, upstream: Registry) -> str:
    result = run_cli(*args, cache=cache, upstream=upstream.url)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in blob_files(cache)) + sum(
        p.stat().st_size for p in (cache / "manifests").rglob("*") if p.is_file()
    )


def age_everything(cache: Path, seconds: float) -> None:
    """As if ``seconds`` passed without anything in the cache being used."""
    for folder in ("blobs", "manifests"):
        for p in (cache / folder).rglob("*"):
            if p.is_file():
                st = p.stat()
                os.utime(p, (st.st_atime - seconds, st.st_mtime - seconds))


def layer_of(image: Image) -> str:
    return image.layers_of(image.top)[0].digest


def wait_for(predicate: object, what: str, timeout: float = 15) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("pin", [False, True])
def test_lru_eviction_keeps_the_cache_under_its_cap(
    pin: bool, make_registry: RegistryFactory, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    one, two, three = images(3)
    origin = make_registry(seed=[one, two, three])
    cache = tmp_path / "cache"
    limit = int(2.5 * MiB)
    if pin:
        cli("cache", "pin", f"{one.name}:{one.tag}", cache=cache, upstream=origin)
    mirror = MirrorProcess(cache, origin.url, env={"PULLTHROUGH_MAX_SIZE": str(limit)})
    mirror.start()
    host = mirror.url.removeprefix("http://")

    def pull(image: Image, dest: str) -> None:
        skopeo_cli.copy(f"docker://{host}/{image.name}:{image.tag}", f"dir:{tmp_path / dest}")

    try:
        pull(one, "one")
        age_everything(cache, 7200)
        pull(two, "two")
        age_everything(cache, 3600)  # one was last used three hours ago, two one hour ago
        pull(three, "three")  # 3 MiB > 2.5 MiB: the least recently used must go
        evicted, kept = (two, [one, three]) if pin else (one, [two, three])

        def gone() -> bool:
            return layer_of(evicted).removeprefix("sha256:") not in {
                p.name for p in blob_files(cache)
            }

        wait_for(gone, "the eviction")
        on_disk = {p.name for p in blob_files(cache)}
        for image in kept:
            assert layer_of(image).removeprefix("sha256:") in on_disk, image.name
        assert cache_bytes(cache) <= limit
        with urllib.request.urlopen(f"{mirror.url}/metrics", timeout=5) as resp:
            assert 'pullthrough_evictions_total{kind="blob"}' in resp.read().decode()

        mark = origin.mark()
        pull(evicted, "again")  # an evicted image is fetched again, and works
        assert dir_blob_digests(tmp_path / "again") == {
            b.digest for b in evicted.blobs_of(evicted.top)
        }
        fetched = [e.path for e in origin.requests_since(mark) if "/blobs/" in e.path]
        assert any(layer_of(evicted) in path for path in fetched)
    finally:
        mirror.stop()


def test_warm_then_serve_without_upstream_blob_requests(
    upstream: Registry, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    out = cli("warm", "alpine:3.19", "--platform", "linux/amd64", cache=cache, upstream=upstream)
    image = upstream.images["library/alpine:3.19"]
    amd64 = image.blobs_of(image.for_platform("linux/amd64"))
    assert f"fetched {len(amd64)} blob(s)" in out, out
    again = cli("warm", "alpine:3.19", "--platform", "linux/amd64", cache=cache, upstream=upstream)
    assert "fetched 0 blob(s)" in again, again
    assert f"{len(amd64)} already cached" in again, again

    mirror = MirrorProcess(cache, upstream.url)
    mirror.start()
    try:
        mark = upstream.mark()
        host = mirror.url.removeprefix("http://")
        skopeo_cli.copy(f"docker://{host}/alpine:3.19", f"dir:{tmp_path / 'pulled'}")
        assert dir_blob_digests(tmp_path / "pulled") == {b.digest for b in amd64}
        assert not [e for e in upstream.requests_since(mark) if "/blobs/" in e.path]
    finally:
        mirror.stop()

    listing = cli("cache", "ls", cache=cache, upstream=upstream)
    assert "docker.io/library/alpine:3.19" in listing
    usage = cli("cache", "du", cache=cache, upstream=upstream)
    assert f"{len(amd64)} blob(s)" in usage


def test_gc_reports_then_removes_orphans_and_crash_leftovers(
    upstream: Registry, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cli("warm", "hello", cache=cache, upstream=upstream)
    orphan = cache / "blobs" / "sha256" / "ab" / ("ab" * 32)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"nobody needs me")
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    leftover = cache / "tmp" / f"sha256-{'cd' * 32}.partial"
    leftover.write_bytes(b"half a layer")

    report = cli("gc", cache=cache, upstream=upstream)
    assert "would remove 1 unreferenced blob(s)" in report
    assert orphan.exists()  # a dry run by default
    assert leftover.exists()

    done = cli("gc", "--delete", cache=cache, upstream=upstream)
    assert "removed 1 unreferenced blob(s)" in done
    assert not orphan.exists()
    assert not leftover.exists()
    image = upstream.images["library/hello:latest"]
    assert {p.name for p in blob_files(cache)} == {
        b.digest.removeprefix("sha256:") for b in image.blobs_of(image.top)
    }

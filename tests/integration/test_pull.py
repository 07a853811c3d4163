"""Pulls through a real mirror process, from a real distribution upstream, with skopeo."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.images import ACCEPT_ALL_MANIFESTS, Image
from tests.support.mirror import MirrorProcess
from tests.support.registry import AccessLogEntry, Registry
from tests.support.skopeo import Skopeo, dir_blob_digests, dir_manifest
from tests.support.tokenserver import ALICE


@pytest.fixture
def mirror(upstream: Registry, tmp_path: Path) -> Iterator[MirrorProcess]:
    process = MirrorProcess(tmp_path / "cache", upstream.url)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def host(url: str) -> str:
    return url.removeprefix("http://")


def blob_gets(entries: list[AccessLogEntry]) -> list[AccessLogEntry]:
    """Blob downloads (2xx): a 401 that teaches a fresh mirror the challenge carries no bytes."""
    return [e for e in entries if e.method == "GET" and "/blobs/" in e.path and e.status < 300]


def challenges(entries: list[AccessLogEntry]) -> list[AccessLogEntry]:
    return [e for e in entries if e.status == 401]


def manifest_gets(entries: list[AccessLogEntry]) -> list[AccessLogEntry]:
    return [e for e in entries if e.method == "GET" and "/manifests/" in e.path]


def pull(skopeo: Skopeo, mirror: MirrorProcess, image: Image, dest: Path, *, all_: bool) -> None:
    name = image.name.removeprefix("library/")  # as Docker users type it
    skopeo.copy(f"docker://{host(mirror.url)}/{name}:{image.tag}", f"dir:{dest}", all_images=all_)


def assert_same_as_upstream(image: Image, dest: Path, *, all_: bool) -> None:
    """skopeo's copy holds the upstream's exact manifest bytes and blob digests."""
    if all_ or not image.is_index:
        assert dir_manifest(dest) == image.top.data
    expected: set[str] = set()
    manifests = image.manifests if all_ else [image.for_platform("linux/amd64")]
    for manifest in manifests:
        if manifest.is_index:
            continue
        expected.update(b.digest for b in image.blobs_of(manifest))
        if all_ and image.is_index:
            assert dir_manifest(dest, manifest.digest) == manifest.data
    assert dir_blob_digests(dest) == expected


@pytest.mark.parametrize(
    ("ref", "all_"),
    [
        ("library/alpine:3.19", True),
        ("library/alpine:3.19", False),
        ("library/hello:latest", False),
        ("library/ociapp:v1", True),
        ("library/big:latest", False),
    ],
)
def test_skopeo_pull_through_mirror_is_identical_and_warm_pull_fetches_no_blob(
    ref: str,
    all_: bool,
    upstream: Registry,
    mirror: MirrorProcess,
    skopeo_cli: Skopeo,
    tmp_path: Path,
) -> None:
    image = upstream.images[ref]
    cold_mark = upstream.mark()
    pull(skopeo_cli, mirror, image, tmp_path / "cold", all_=all_)
    assert_same_as_upstream(image, tmp_path / "cold", all_=all_)
    cold = upstream.requests_since(cold_mark)
    # Every blob crossed the upstream exactly once.
    fetched = [e.path.rsplit("/", 1)[1] for e in blob_gets(cold)]
    assert sorted(fetched) == sorted(set(fetched))
    assert set(fetched) == dir_blob_digests(tmp_path / "cold")

    warm_mark = upstream.mark()
    pull(skopeo_cli, mirror, image, tmp_path / "warm", all_=all_)
    assert_same_as_upstream(image, tmp_path / "warm", all_=all_)
    warm = upstream.requests_since(warm_mark)
    assert blob_gets(warm) == []
    assert manifest_gets(warm) == []  # tags resolve with HEAD; content comes from disk


async def test_twenty_concurrent_cold_requests_cause_one_upstream_get(
    upstream: Registry, tmp_path: Path
) -> None:
    image = upstream.images["library/big:latest"]
    layer = image.layers_of(image.top)[0]
    for workers in (1, 2):
        mirror = MirrorProcess(tmp_path / f"cache-{workers}", upstream.url, workers=workers)
        mirror.start()
        try:
            mark = upstream.mark()
            url = f"{mirror.url}/v2/big/blobs/{layer.digest}"

            async def get(session: aiohttp.ClientSession, url: str = url) -> str:
                async with session.get(url) as resp:
                    assert resp.status == 200
                    digest = hashlib.sha256()
                    async for chunk in resp.content.iter_any():
                        digest.update(chunk)
                    return "sha256:" + digest.hexdigest()

            connector = aiohttp.TCPConnector(limit=0, force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                digests = await asyncio.gather(*(get(session) for _ in range(20)))
            assert digests == [layer.digest] * 20
            seen = upstream.requests_since(mark)
            assert len(blob_gets(seen)) == 1, f"{workers} worker(s)"
            # Each fresh worker process learns the challenge once, at most.
            assert len(challenges(seen)) <= workers
        finally:
            mirror.stop()


def test_pull_by_digest_and_head_answers(
    upstream: Registry, mirror: MirrorProcess, skopeo_cli: Skopeo
) -> None:
    image = upstream.images["library/hello:latest"]
    raw = skopeo_cli.inspect_raw(f"docker://{host(mirror.url)}/hello@{image.digest}")
    assert raw == image.top.data
    mark = upstream.mark()
    assert skopeo_cli.inspect_raw(f"docker://{host(mirror.url)}/hello@{image.digest}") == raw
    assert upstream.requests_since(mark) == []  # a cached digest never goes upstream


async def test_head_manifest_does_not_spend_a_get(
    upstream: Registry, mirror: MirrorProcess
) -> None:
    image = upstream.images["library/alpine:3.19"]
    mark = upstream.mark()
    headers = [("Accept", a.strip()) for a in ACCEPT_ALL_MANIFESTS.split(",")]
    async with (
        aiohttp.ClientSession() as session,
        session.head(f"{mirror.url}/v2/alpine/manifests/3.19", headers=headers) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == image.digest
        assert resp.headers["Content-Type"] == image.top.media_type
        assert int(resp.headers["Content-Length"]) == len(image.top.data)
    assert manifest_gets(upstream.requests_since(mark)) == []


async def test_unknown_things_are_oci_errors(upstream: Registry, mirror: MirrorProcess) -> None:
    missing = "sha256:" + "0" * 64
    cases = [
        (
            "/v2/library/nope/manifests/latest",
            {401, 404},
            {"UNAUTHORIZED", "MANIFEST_UNKNOWN", "NAME_UNKNOWN"},
        ),
        ("/v2/library/hello/manifests/nope", {404}, {"MANIFEST_UNKNOWN"}),
        (f"/v2/library/hello/blobs/{missing}", {404}, {"BLOB_UNKNOWN"}),
        ("/v2/private/secret/manifests/1", {401}, {"UNAUTHORIZED"}),
    ]
    async with aiohttp.ClientSession() as session:
        for path, statuses, codes in cases:
            async with session.get(mirror.url + path) as resp:
                assert resp.status in statuses, path
                body = await resp.json()
                assert body["errors"][0]["code"] in codes, path


def test_credentials_reach_a_private_repository_and_tokens_are_reused(
    upstream: Registry, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    image = upstream.images["private/secret:1"]
    user, password = ALICE
    mirror = MirrorProcess(
        tmp_path / "cache",
        upstream.url,
        env={"PULLTHROUGH_UPSTREAM_USERNAME": user, "PULLTHROUGH_UPSTREAM_PASSWORD": password},
    )
    mirror.start()
    try:
        tokens = upstream.tokens.mark()
        pull(skopeo_cli, mirror, image, tmp_path / "one", all_=False)
        pull(skopeo_cli, mirror, image, tmp_path / "two", all_=False)
        assert_same_as_upstream(image, tmp_path / "two", all_=False)
        fetched = upstream.tokens.requests_since(tokens)
        # One token for the repository, fetched with alice's credentials, reused.
        assert [(t.scope, t.user) for t in fetched] == [("repository:private/secret:pull", user)]
        assert password not in mirror.log.read_text()
    finally:
        mirror.stop()


async def test_containerd_namespace_query_is_accepted(
    upstream: Registry, mirror: MirrorProcess
) -> None:
    image = upstream.images["library/hello:latest"]
    url = f"{mirror.url}/v2/library/hello/manifests/latest?ns=docker.io"
    headers = {"Accept": image.top.media_type}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        assert resp.status == 200
        assert await resp.read() == image.top.data
        assert resp.headers["Docker-Content-Digest"] == image.digest

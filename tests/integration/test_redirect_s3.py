"""Pulls from an upstream that sends blobs to a CDN: distribution with S3 storage
(SeaweedFS) answers blob GETs and HEADs with a 307 to a presigned URL, as Docker
Hub and ghcr.io do. Every request the mirror sends to S3 goes through a recording
relay, so what it carried is seen, not inferred."""

from __future__ import annotations

import hashlib
import re
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pullthrough.proxy.upstream import USER_AGENT
from tests.support.images import Image, make_image, push_images
from tests.support.mirror import MirrorProcess
from tests.support.registry import AccessLogEntry
from tests.support.seaweed import S3Registry, SeaweedS3
from tests.support.skopeo import Skopeo, dir_blob_digests, dir_manifest
from tests.support.tokenserver import ALICE, TokenServer

PUBLIC = make_image("library/s3app", "1", "s3app", (3_000_000, 200_000))
PRIVATE = make_image("private/s3secret", "1", "s3secret", (500_000,))


@pytest.fixture(scope="module")
def s3_upstream(
    seaweed: SeaweedS3,
    token_server: TokenServer,
    registry_binary: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[S3Registry]:
    registry = S3Registry(
        tmp_path_factory.mktemp("s3-upstream"), seaweed, tokens=token_server, binary=registry_binary
    )
    try:
        registry.start()
        push_images(registry.url, [PUBLIC, PRIVATE])
        yield registry
    finally:
        registry.stop()


def from_mirror(seaweed: SeaweedS3, since: int) -> list[tuple[str, str, bool]]:
    """(method, target, carried Authorization) of what the mirror sent to S3."""
    return [
        (r.method, r.target, "Authorization" in r.headers)
        for r in seaweed.relayed()[since:]
        if r.headers.get("User-Agent") == USER_AGENT
    ]


def blob_answers(entries: list[AccessLogEntry]) -> list[AccessLogEntry]:
    return [e for e in entries if "/blobs/" in e.path and e.status != 401]


def metric(mirror: MirrorProcess, line_start: str) -> float:
    with urllib.request.urlopen(f"{mirror.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    lines = [line for line in text.splitlines() if line.startswith(line_start)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def pull(skopeo: Skopeo, mirror: MirrorProcess, image: Image, dest: Path) -> None:
    name = image.name.removeprefix("library/")
    skopeo.copy(f"docker://{mirror.url.removeprefix('http://')}/{name}:{image.tag}", f"dir:{dest}")


def assert_identical(image: Image, dest: Path) -> None:
    assert dir_manifest(dest) == image.top.data
    expected = {b.digest for b in image.blobs}
    assert dir_blob_digests(dest) == expected
    for digest in expected:
        data = (dest / digest.removeprefix("sha256:")).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest


@pytest.mark.parametrize(
    ("image", "credentials"), [(PUBLIC, None), (PRIVATE, ALICE)], ids=["anonymous", "credentials"]
)
def test_cold_and_warm_pulls_follow_presigned_redirects_without_credentials(
    image: Image,
    credentials: tuple[str, str] | None,
    s3_upstream: S3Registry,
    seaweed: SeaweedS3,
    skopeo_cli: Skopeo,
    tmp_path: Path,
) -> None:
    env = {}
    if credentials is not None:
        env = {
            "PULLTHROUGH_UPSTREAM_USERNAME": credentials[0],
            "PULLTHROUGH_UPSTREAM_PASSWORD": credentials[1],
        }
    mirror = MirrorProcess(tmp_path / "cache", s3_upstream.url, env=env)
    mirror.start()
    try:
        relayed, logged = len(seaweed.relayed()), s3_upstream.mark()
        pull(skopeo_cli, mirror, image, tmp_path / "cold")
        assert_identical(image, tmp_path / "cold")
        # Every blob came from S3 by its presigned URL, once, with no Authorization
        # (the upstream's token is for the upstream; the URL carries its own).
        sent = from_mirror(seaweed, relayed)
        assert sorted(m for m, _, _ in sent) == ["GET"] * len(image.blobs)
        assert all(re.search(r"[?&]X-Amz-Signature=", target) for _, target, _ in sent)
        assert not any(auth for _, _, auth in sent)
        answers = blob_answers(s3_upstream.requests_since(logged))
        assert [e.status for e in answers] == [307] * len(image.blobs)
        redirects = 'pullthrough_upstream_redirects_total{status="200",upstream="docker.io"}'
        assert metric(mirror, redirects) == len(image.blobs)

        # Warm: nothing reaches S3 or the upstream's blob endpoint.
        relayed, logged = len(seaweed.relayed()), s3_upstream.mark()
        pull(skopeo_cli, mirror, image, tmp_path / "warm")
        assert_identical(image, tmp_path / "warm")
        assert from_mirror(seaweed, relayed) == []
        assert blob_answers(s3_upstream.requests_since(logged)) == []
    finally:
        mirror.stop()


def test_blob_head_follows_the_redirect_too(
    s3_upstream: S3Registry, seaweed: SeaweedS3, tmp_path: Path
) -> None:
    mirror = MirrorProcess(tmp_path / "cache", s3_upstream.url)
    mirror.start()
    try:
        blob = PUBLIC.blobs[-1]
        relayed = len(seaweed.relayed())
        request = urllib.request.Request(
            f"{mirror.url}/v2/s3app/blobs/{blob.digest}", method="HEAD"
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(blob.size)
        sent = from_mirror(seaweed, relayed)
        assert [(m, auth) for m, _, auth in sent] == [("HEAD", False)]
    finally:
        mirror.stop()


def test_twenty_concurrent_cold_pulls_fetch_each_blob_once(
    s3_upstream: S3Registry,
    seaweed: SeaweedS3,
    skopeo: str,
    tmp_path: Path,
) -> None:
    mirror = MirrorProcess(tmp_path / "cache", s3_upstream.url)
    mirror.start()
    try:
        relayed = len(seaweed.relayed())
        clients = [Skopeo(skopeo, tmp_path / f"skopeo-{i}") for i in range(20)]
        with ThreadPoolExecutor(max_workers=20) as pool:
            list(
                pool.map(
                    lambda i: pull(clients[i], mirror, PUBLIC, tmp_path / f"pull-{i}"), range(20)
                )
            )
        for i in range(20):
            assert_identical(PUBLIC, tmp_path / f"pull-{i}")
        sent = from_mirror(seaweed, relayed)
        assert sorted(target.partition("?")[0] for _, target, _ in sent) == sorted(
            {target.partition("?")[0] for _, target, _ in sent}
        ), "a blob was fetched from S3 more than once"
        assert len(sent) == len(PUBLIC.blobs)
        assert not any(auth for _, _, auth in sent)
    finally:
        mirror.stop()

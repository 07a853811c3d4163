"""Blobs and manifests on S3 (SeaweedFS): pulls through a mirror whose storage is a
bucket, one upstream fetch for stores sharing it, nothing partial ever visible."""

from __future__ import annotations

import asyncio
import hashlib
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pullthrough.cache import s3
from pullthrough.cache.coordination import LocalLocks
from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import DigestMismatch
from pullthrough.cache.s3 import PART_BYTES, S3BlobStore
from pullthrough.cache.s3_location import S3Location
from pullthrough.cache.storage import DownloadSink
from pullthrough.proxy.app import create_app
from pullthrough.proxy.keys import MIRRORS
from tests.integration.test_redirect_s3 import assert_identical, pull
from tests.support.faults import FaultRegistry, digest_of
from tests.support.images import make_image, push_images
from tests.support.mirror import MirrorProcess, blob_files, settings_for
from tests.support.processes import ExitedEarly, free_port
from tests.support.registry import AccessLogEntry, Registry
from tests.support.seaweed import SeaweedS3
from tests.support.skopeo import Skopeo
from tests.support.trackers import read_all

# One layer over a multipart part, so the upload goes up in parts.
IMAGE = make_image("library/s3store", "1", "s3store", (PART_BYTES + 3_000_017, 200_000))

Server = Callable[[web.Application], Awaitable[TestServer]]
Client = Callable[..., Awaitable[TestClient[Any, Any]]]


def location(seaweed: SeaweedS3) -> S3Location:
    """A prefix of its own in the bucket."""
    return S3Location(
        seaweed.bucket,
        f"t-{uuid.uuid4().hex}/",
        endpoint_url=seaweed.direct_endpoint,
        region=seaweed.region,
        access_key=seaweed.access_key,
        secret_key=seaweed.secret_key,
    )


def aws_env(seaweed: SeaweedS3) -> dict[str, str]:
    """Credentials the way an operator gives them: the standard AWS variables."""
    return {
        "AWS_ACCESS_KEY_ID": seaweed.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
        "AWS_DEFAULT_REGION": seaweed.region,
    }


@pytest.fixture(scope="module")
def pushed(upstream: Registry) -> Registry:
    push_images(upstream.url, [IMAGE])
    return upstream


def blob_gets(entries: list[AccessLogEntry]) -> list[AccessLogEntry]:
    return [e for e in entries if e.method == "GET" and "/blobs/" in e.path and e.status == 200]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_pulls_through_a_mirror_on_s3_and_warm_ones_from_s3_or_by_redirect(
    pushed: Registry, seaweed: SeaweedS3, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    storage = f"s3://{seaweed.bucket}/pulls-{uuid.uuid4().hex}"
    env = {
        **aws_env(seaweed),
        "PULLTHROUGH_STORAGE": storage,
        "PULLTHROUGH_S3_ENDPOINT_URL": seaweed.direct_endpoint,
    }
    first = MirrorProcess(tmp_path / "node-1", pushed.url, env=env)
    first.start()
    try:
        mark = pushed.mark()
        pull(skopeo_cli, first, IMAGE, tmp_path / "cold")
        assert_identical(IMAGE, tmp_path / "cold")
        assert len(blob_gets(pushed.requests_since(mark))) == len(IMAGE.blobs)
        assert blob_files(tmp_path / "node-1") == []  # the blobs went to S3
    finally:
        first.stop()
    # Another node on the same bucket, its own (empty) cache folder: all from S3.
    second = MirrorProcess(tmp_path / "node-2", pushed.url, env=env)
    second.start()
    try:
        mark = pushed.mark()
        pull(skopeo_cli, second, IMAGE, tmp_path / "warm")
        assert_identical(IMAGE, tmp_path / "warm")
        layer = IMAGE.blobs[0]
        ranged = urllib.request.Request(
            f"{second.url}/v2/s3store/blobs/{layer.digest}", headers={"Range": "bytes=100-"}
        )
        with urllib.request.urlopen(ranged, timeout=30) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes 100-{layer.size - 1}/{layer.size}"
            assert resp.read() == layer.data[100:]
        assert blob_gets(pushed.requests_since(mark)) == []
    finally:
        second.stop()
    # redirect = true: blob GETs are sent to presigned URLs, which skopeo follows.
    third = MirrorProcess(
        tmp_path / "node-3", pushed.url, env={**env, "PULLTHROUGH_REDIRECT": "true"}
    )
    third.start()
    try:
        layer = IMAGE.blobs[-1]
        opener = urllib.request.build_opener(_NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as answer:
            opener.open(f"{third.url}/v2/s3store/blobs/{layer.digest}", timeout=30)
        answer.value.close()
        assert answer.value.code == 307
        target = answer.value.headers["Location"]
        assert target.startswith(seaweed.direct_endpoint)
        assert "X-Amz-Signature=" in target
        with urllib.request.urlopen(target, timeout=30) as resp:
            assert hashlib.sha256(resp.read()).hexdigest() == layer.digest.removeprefix("sha256:")
        mark = pushed.mark()
        pull(skopeo_cli, third, IMAGE, tmp_path / "redirected")
        assert_identical(IMAGE, tmp_path / "redirected")
        assert blob_gets(pushed.requests_since(mark)) == []
    finally:
        third.stop()


class Feed:
    """A fetch function serving ``data`` in chunks, counting its calls; with
    ``fail_at`` it breaks off there, as an upstream connection would."""

    def __init__(self, data: bytes, *, fail_at: int | None = None) -> None:
        self.data = data
        self.fail_at = fail_at
        self.calls = 0

    async def __call__(self, sink: DownloadSink) -> None:
        self.calls += 1
        await sink.begin(len(self.data))
        for pos in range(0, len(self.data), 1 << 20):
            if self.fail_at is not None and pos >= self.fail_at:
                raise ConnectionResetError("the upstream went away")
            await sink.write(self.data[pos : pos + (1 << 20)])
            await asyncio.sleep(0)


async def uploads_under(store: S3BlobStore) -> list[str]:
    client = await store.connection.client()
    listed = await client.list_multipart_uploads(
        Bucket=store.location.bucket, Prefix=store.location.prefix
    )
    return [u.get("Key", "") for u in listed.get("Uploads", [])]


async def test_two_nodes_sharing_the_locks_and_bucket_fetch_once(
    seaweed: SeaweedS3, tmp_path: Path
) -> None:
    data = os.urandom(2 * PART_BYTES + 12_345)
    digest = Digest.parse(digest_of(data))
    where, locks = location(seaweed), LocalLocks()
    nodes = [
        S3BlobStore(where, locks=locks, staging=tmp_path / f"node-{i}" / "tmp") for i in range(2)
    ]
    feed = Feed(data)

    async def client(i: int) -> bytes:
        tracker = await nodes[i % 2].track(digest, feed, committed=True)
        assert tracker is not None
        return await read_all(tracker)

    try:
        got = await asyncio.gather(*(client(i) for i in range(20)))
        assert feed.calls == 1
        assert got == [data] * 20
        for node in nodes:
            await node.settle()
            assert await node.stat(digest) == len(data)
        assert await uploads_under(nodes[0]) == []
    finally:
        for node in nodes:
            await node.close()


async def test_a_waiter_fetches_itself_when_the_holder_lets_go_without_a_commit(
    seaweed: SeaweedS3, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    digest = Digest.parse(digest_of(data))
    locks = LocalLocks()
    store = S3BlobStore(location(seaweed), locks=locks, staging=tmp_path / "tmp")
    elsewhere = await locks.acquire(f"blob:{digest}")  # another node fetches it
    assert elsewhere is not None
    feed = Feed(data)
    try:
        tracker = await store.track(digest, feed)
        assert tracker is not None
        assert tracker.joined
        reader = asyncio.create_task(read_all(tracker))
        for _ in range(100):
            await asyncio.sleep(0)
        assert feed.calls == 0  # waiting for the other node
        assert not reader.done()
        await elsewhere.release(committed=False)  # it failed, or died
        assert await reader == data
        assert feed.calls == 1
        await store.settle()
        assert await store.stat(digest) == len(data)
    finally:
        await store.close()


@pytest.mark.parametrize("fault", ["cut", "wrong"])
async def test_a_failed_download_leaves_no_object_and_no_upload(
    fault: str, seaweed: SeaweedS3, tmp_path: Path
) -> None:
    data = os.urandom(PART_BYTES + 3 * (1 << 20))
    digest = Digest.parse(digest_of(data))
    sent = data if fault == "cut" else data[:-1] + bytes([data[-1] ^ 1])
    # Cut after a whole part went up: there is an upload to abort.
    feed = Feed(sent, fail_at=PART_BYTES + (1 << 20) if fault == "cut" else None)
    store = S3BlobStore(location(seaweed), locks=LocalLocks(), staging=tmp_path / "tmp")
    try:
        tracker = await store.track(digest, feed)
        assert tracker is not None
        with pytest.raises(ConnectionResetError if fault == "cut" else DigestMismatch):
            await read_all(tracker)
        await store.settle()
        assert await store.stat(digest) is None
        assert [d async for d in store.digests()] == []
        assert await uploads_under(store) == []
        assert list((tmp_path / "tmp").iterdir()) == []  # the staging file is gone
    finally:
        await store.close()


async def test_uploads_of_a_dead_download_are_cleaned(seaweed: SeaweedS3, tmp_path: Path) -> None:
    store = S3BlobStore(location(seaweed), locks=LocalLocks(), staging=tmp_path / "tmp")
    try:
        client = await store.connection.client()
        # What a node killed mid-download leaves: an upload never completed.
        key = store.location.key("blobs", Digest.parse(digest_of(b"never finished")))
        made = await client.create_multipart_upload(Bucket=store.location.bucket, Key=key)
        await client.upload_part(
            Bucket=store.location.bucket,
            Key=key,
            UploadId=made["UploadId"],
            PartNumber=1,
            Body=b"x" * 1024,
        )
        assert await uploads_under(store) == [key]
        assert await store.clean_uploads() == 0  # not old enough to be a dead one's
        assert await store.clean_uploads(older_than=0) == 1
        assert await uploads_under(store) == []
        assert [d async for d in store.digests()] == []
    finally:
        await store.close()


@pytest.fixture
def fault_registry() -> FaultRegistry:
    registry = FaultRegistry()
    registry.add_manifest(
        "1.0",
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "layers": [],
        },
    )
    return registry


@pytest.mark.parametrize("mode", ["corrupt", "truncate"])
async def test_a_bad_upstream_body_through_the_mirror_leaves_nothing_in_s3(
    mode: str,
    fault_registry: FaultRegistry,
    seaweed: SeaweedS3,
    aiohttp_server: Server,
    aiohttp_client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in aws_env(seaweed).items():
        monkeypatch.setenv(name, value)
    blob = os.urandom(PART_BYTES * 2 + 77)
    digest = fault_registry.add_blob(blob)
    fault_registry.mode = mode
    upstream = await aiohttp_server(fault_registry.app())
    where = location(seaweed)
    settings = settings_for(
        tmp_path / "cache",
        str(upstream.make_url("/")).rstrip("/"),
        storage=f"s3://{where.bucket}/{where.prefix}",
        s3_endpoint_url=seaweed.direct_endpoint,
    )
    mirror = await aiohttp_client(create_app(settings))
    url = f"/v2/library/app/blobs/{digest}"
    async with mirror.get(url) as resp:
        # The last byte waits for the digest: a bad body is always cut short.
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await mirror.app[MIRRORS].default.settle()
    store = S3BlobStore(where, locks=LocalLocks(), staging=tmp_path / "probe")
    try:
        assert await store.stat(Digest.parse(digest)) is None
        assert await uploads_under(store) == []
        # A good upstream afterwards: fetched, served whole, committed.
        fault_registry.mode = "ok"
        async with mirror.get(url) as resp:
            assert resp.status == 200
            assert await resp.read() == blob
    finally:
        await store.close()


def test_a_missing_bucket_stops_the_server_with_one_line(
    seaweed: SeaweedS3, tmp_path: Path, pushed: Registry
) -> None:
    mirror = MirrorProcess(
        tmp_path / "cache",
        pushed.url,
        env={
            **aws_env(seaweed),
            "PULLTHROUGH_STORAGE": "s3://no-such-bucket/x",
            "PULLTHROUGH_S3_ENDPOINT_URL": seaweed.direct_endpoint,
        },
    )
    with pytest.raises(ExitedEarly):
        mirror.start()
    assert mirror.proc is not None
    assert mirror.proc.wait(10) == 1
    lines = mirror.log.read_text().strip().splitlines()
    assert (
        lines[-1] == "pullthrough: storage s3://no-such-bucket/x/: the bucket does not exist (404)"
    )
    assert "Traceback" not in mirror.log.read_text()


async def test_storage_down_is_a_503_and_manifests_still_come_from_the_upstream(
    fault_registry: FaultRegistry,
    aiohttp_server: Server,
    aiohttp_client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nothing")
    digest = fault_registry.add_blob(os.urandom(1000))
    upstream = await aiohttp_server(fault_registry.app())
    settings = settings_for(
        tmp_path / "cache",
        str(upstream.make_url("/")).rstrip("/"),
        storage="s3://gone/x",
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
    )
    mirror = await aiohttp_client(create_app(settings))
    async with mirror.get("/v2/library/app/manifests/1.0") as resp:
        assert resp.status == 200
        assert await resp.read() == fault_registry.manifests["1.0"][1]
    async with mirror.get(f"/v2/library/app/blobs/{digest}") as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "5"
        body = await resp.json()
        assert body["errors"][0]["code"] == "UNAVAILABLE"
    assert fault_registry.count("GET", "blobs") == 0
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_a_fetch_failing_before_any_byte_fails_its_readers(
    seaweed: SeaweedS3, tmp_path: Path
) -> None:
    async def refused(sink: DownloadSink) -> None:
        raise ConnectionRefusedError("the upstream is down")

    store = S3BlobStore(location(seaweed), locks=LocalLocks(), staging=tmp_path / "tmp")
    digest = Digest.parse(digest_of(b"never sent"))
    try:
        tracker = await store.track(digest, refused)
        assert tracker is not None
        with pytest.raises(ConnectionRefusedError):
            await tracker.size()
        await store.settle()
        assert await store.stat(digest) is None
        assert await uploads_under(store) == []
    finally:
        await store.close()


async def test_closing_the_store_completes_a_verified_upload(
    seaweed: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(PART_BYTES + 500_000)
    digest = Digest.parse(digest_of(data))
    gate = asyncio.Event()
    complete = s3._Upload.finish

    async def held_back(upload: s3._Upload, total: int) -> None:
        await gate.wait()  # the completion is still to come when the node stops
        await complete(upload, total)

    monkeypatch.setattr(s3._Upload, "finish", held_back)
    where = location(seaweed)
    store = S3BlobStore(where, locks=LocalLocks(), staging=tmp_path / "tmp")
    tracker = await store.track(digest, Feed(data))
    assert tracker is not None
    assert await read_all(tracker) == data  # the reader had every byte: verified
    closing = asyncio.create_task(store.close())
    for _ in range(100):
        await asyncio.sleep(0)
    assert not closing.done()
    gate.set()
    await closing
    other = S3BlobStore(where, locks=LocalLocks(), staging=tmp_path / "other")
    try:
        assert await other.stat(digest) == len(data)
        assert await uploads_under(other) == []
    finally:
        await other.close()

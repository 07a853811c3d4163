"""The operator's tools on S3 storage (SeaweedFS) with the tag index on Redis:
cache ls/du, the cache size metrics, cache verify and gc see the bucket, not the
node's empty folders."""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from pullthrough.cache.digests import Digest
from pullthrough.cache.evict import GRACE_SECONDS, LOW_WATER
from pullthrough.cache.s3_location import S3Location
from pullthrough.proxy.console import human
from pullthrough.proxy.images import open_images
from tests.support.images import Image, make_image
from tests.support.mirror import MirrorProcess, run_cli, settings_for
from tests.support.processes import free_port
from tests.support.redis import RedisServer
from tests.support.registry import Registry, RegistryFactory
from tests.support.seaweed import SeaweedS3
from tests.support.skopeo import Skopeo, dir_blob_digests

pytest.importorskip("aiobotocore", reason="the s3 extra is not installed")

from pullthrough.cache import s3_admin
from pullthrough.cache.s3 import blocking_client


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with RedisServer(tmp_path / "redis") as server:
        yield server.url


def node_env(seaweed: SeaweedS3, redis_url: str, prefix: str) -> dict[str, str]:
    return seaweed.mirror_env(prefix, redis_url)


def location(seaweed: SeaweedS3, prefix: str) -> S3Location:
    return S3Location(
        seaweed.bucket,
        f"{prefix}/",
        endpoint_url=seaweed.direct_endpoint,
        region=seaweed.region,
        access_key=seaweed.access_key,
        secret_key=seaweed.secret_key,
    )


def stored_bytes(image: Image) -> int:
    """What the image's objects weigh on S3: a manifest's starts with its media type."""
    manifests = sum(len(m.media_type) + 1 + len(m.data) for m in image.manifests)
    return sum(b.size for b in image.blobs) + manifests


def blob_key(prefix: str, digest: str) -> str:
    return f"{prefix}/blobs/sha256/{digest.removeprefix('sha256:')}"


def keys(client: Any, bucket: str, prefix: str) -> set[str]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for item in listed.get("Contents", [])}


@pytest.fixture
def s3(seaweed: SeaweedS3) -> Iterator[Any]:
    client = blocking_client(location(seaweed, "unused"))
    try:
        yield client
    finally:
        client.close()


def pull(skopeo: Skopeo, node: MirrorProcess, image: Image, dest: Path) -> None:
    host = node.url.removeprefix("http://")
    skopeo.copy(f"docker://{host}/{image.name}:{image.tag}", f"dir:{dest}")


def cli(*args: str, tmp_path: Path, origin: Registry, env: dict[str, str]) -> tuple[int, str]:
    # Another machine's view: its own (empty) cache folder, the same bucket and Redis.
    result = run_cli(*args, cache=tmp_path / "operator", upstream=origin.url, env=env)
    return result.returncode, result.stdout + result.stderr


SCRAPED = ("pullthrough_cache_", "pullthrough_scrub_", "pullthrough_corrupt_")


def scrape(url: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(SCRAPED):
                found[(sample.name, sample.labels.get("kind", ""))] = sample.value
    return found


def test_ls_du_and_the_size_metrics_measure_the_bucket(
    seaweed: SeaweedS3,
    redis_url: str,
    make_registry: RegistryFactory,
    skopeo_cli: Skopeo,
    tmp_path: Path,
) -> None:
    image = make_image(
        "team/tools", "1", seed="s3tools-ls", layer_sizes=(300_000, 70_000), compresslevel=0
    )
    origin = make_registry(seed=[image])
    prefix = f"tools-{uuid.uuid4().hex}"
    # A size limit far above the image: the node's eviction passes run, remove nothing.
    env = {**node_env(seaweed, redis_url, prefix), "PULLTHROUGH_MAX_SIZE": str(1 << 30)}
    node = MirrorProcess(tmp_path / "node", origin.url, env=env)
    node.start()
    try:
        pull(skopeo_cli, node, image, tmp_path / "pulled")
        measured = scrape(node.url)
        with urllib.request.urlopen(f"{node.url}/status.json", timeout=10) as resp:
            status = json.load(resp)
    finally:
        node.stop()
    total = stored_bytes(image)
    # The status page lists what the bucket holds, with the platform its config names.
    (row,) = [r for r in status["images"]["rows"] if r["image"].endswith("team/tools:1")]
    assert (row["size"], row["platforms"]) == (total, ["linux/amd64"])
    assert measured[("pullthrough_cache_size_bytes", "")] == total
    assert measured[("pullthrough_cache_objects", "blob")] == len(image.blobs)
    assert measured[("pullthrough_cache_objects", "manifest")] == len(image.manifests)

    code, out = cli("cache", "ls", tmp_path=tmp_path, origin=origin, env=env)
    assert code == 0, out
    # IMAGE DIGEST SIZE (number, unit) LAST USED (day, time) NOTES
    rows = [line.split() for line in out.splitlines() if "team/tools:1" in line]
    assert len(rows) == 1, out
    assert rows[0][1] == image.top.digest[:19], out
    assert " ".join(rows[0][2:4]) == human(total), out
    assert rows[0][6] == "-", out  # complete, not pinned

    code, out = cli("cache", "du", tmp_path=tmp_path, origin=origin, env=env)
    assert code == 0, out
    assert out.startswith(
        f"{human(total)} in {len(image.blobs)} blob(s) "
        f"({human(sum(b.size for b in image.blobs))}) and {len(image.manifests)} manifest(s)"
    ), out


def test_verify_quarantines_a_damaged_blob_which_the_next_pull_fetches_again(
    seaweed: SeaweedS3,
    redis_url: str,
    make_registry: RegistryFactory,
    skopeo_cli: Skopeo,
    s3: Any,
    tmp_path: Path,
) -> None:
    image = make_image("team/rot", "1", seed="s3tools-rot", layer_sizes=(200_000,))
    origin = make_registry(seed=[image])
    layer = image.layers_of(image.top)[0]
    prefix = f"rot-{uuid.uuid4().hex}"
    env = node_env(seaweed, redis_url, prefix)
    node = MirrorProcess(tmp_path / "node", origin.url, env=env)
    node.start()
    try:
        pull(skopeo_cli, node, image, tmp_path / "cold")
        key = blob_key(prefix, layer.digest)
        data = bytearray(s3.get_object(Bucket=seaweed.bucket, Key=key)["Body"].read())
        data[len(data) // 2] ^= 0x01
        s3.put_object(Bucket=seaweed.bucket, Key=key, Body=bytes(data))

        code, out = cli("cache", "verify", tmp_path=tmp_path, origin=origin, env=env)
        assert code == 1, out
        assert f"corrupt blob {layer.digest}" in out
        assert "1 corrupt" in out
        assert key not in keys(s3, seaweed.bucket, f"{prefix}/blobs/")
        aside = f"{prefix}/quarantine/blobs/sha256/{layer.digest.removeprefix('sha256:')}"
        assert keys(s3, seaweed.bucket, f"{prefix}/quarantine/") == {aside}

        mark = origin.mark()
        pull(skopeo_cli, node, image, tmp_path / "again")
        fetched = [
            e
            for e in origin.requests_since(mark, settle=0.3)
            if e.method == "GET" and "/blobs/" in e.path
        ]
        assert [e.path.rsplit("/", 1)[-1] for e in fetched] == [layer.digest]
        assert dir_blob_digests(tmp_path / "again") == {b.digest for b in image.blobs}
        again = (tmp_path / "again" / layer.digest.removeprefix("sha256:")).read_bytes()
        assert "sha256:" + hashlib.sha256(again).hexdigest() == layer.digest
    finally:
        node.stop()
    code, out = cli("cache", "verify", tmp_path=tmp_path, origin=origin, env=env)
    assert code == 0, out
    assert f"verified {len(image.blobs)} blob(s) and {len(image.manifests)} manifest(s)" in out


def test_gc_removes_an_orphan_blob_and_a_dead_upload_and_keeps_what_manifests_name(
    seaweed: SeaweedS3,
    redis_url: str,
    make_registry: RegistryFactory,
    skopeo_cli: Skopeo,
    s3: Any,
    tmp_path: Path,
) -> None:
    image = make_image("team/gc", "1", seed="s3tools-gc", layer_sizes=(50_000, 20_000))
    origin = make_registry(seed=[image])
    prefix = f"gc-{uuid.uuid4().hex}"
    env = node_env(seaweed, redis_url, prefix)
    node = MirrorProcess(tmp_path / "node", origin.url, env=env)
    node.start()
    try:
        pull(skopeo_cli, node, image, tmp_path / "pulled")
    finally:
        node.stop()
    orphan = b"no manifest names this blob" * 100
    orphan_digest = str(Digest.of(orphan))
    s3.put_object(Bucket=seaweed.bucket, Key=blob_key(prefix, orphan_digest), Body=orphan)
    dead = s3.create_multipart_upload(
        Bucket=seaweed.bucket, Key=blob_key(prefix, str(Digest.of(b"a dead download")))
    )
    referenced = {blob_key(prefix, b.digest) for b in image.blobs}

    # Just written: it may be a pull whose manifest is on its way, so it stays.
    code, out = cli("gc", "--delete", tmp_path=tmp_path, origin=origin, env=env)
    assert code == 0, out
    assert "removed 0 unreferenced blob(s)" in out, out
    assert keys(s3, seaweed.bucket, f"{prefix}/blobs/") == referenced | {
        blob_key(prefix, orphan_digest)
    }

    # Older than the grace (as if ten minutes passed): reported, then removed.
    admin = s3_admin.S3Admin(location(seaweed, prefix))
    try:
        report = s3_admin.collect([admin], protected=set(), delete=False, grace=0, upload_age=0)
        assert report.unreferenced == [blob_key(prefix, orphan_digest)]
        assert report.unreferenced_bytes == len(orphan)
        assert report.uploads == 1
        assert keys(s3, seaweed.bucket, f"{prefix}/blobs/") == referenced | {
            blob_key(prefix, orphan_digest)
        }
        s3_admin.collect([admin], protected=set(), delete=True, grace=0, upload_age=0)
    finally:
        admin.close()
    assert keys(s3, seaweed.bucket, f"{prefix}/blobs/") == referenced
    uploads = s3.list_multipart_uploads(Bucket=seaweed.bucket, Prefix=f"{prefix}/")
    assert dead["UploadId"] not in {u["UploadId"] for u in uploads.get("Uploads", [])}


def test_export_from_one_prefix_and_import_into_another_then_pull_it_offline(
    seaweed: SeaweedS3,
    redis_url: str,
    make_registry: RegistryFactory,
    skopeo_cli: Skopeo,
    s3: Any,
    tmp_path: Path,
) -> None:
    image = make_image("team/carry", "1", seed="s3tools-carry", layer_sizes=(120_000, 30_000))
    origin = make_registry(seed=[image])
    first = node_env(seaweed, redis_url, f"from-{uuid.uuid4().hex}")
    node = MirrorProcess(tmp_path / "node", origin.url, env=first)
    node.start()
    try:
        pull(skopeo_cli, node, image, tmp_path / "pulled")
    finally:
        node.stop()
    archive = tmp_path / "carry.tar"
    code, out = cli(
        "export", "-o", str(archive), "team/carry:1", tmp_path=tmp_path, origin=origin, env=first
    )
    assert code == 0, out
    assert f"{len(image.blobs)} blob(s)" in out

    # Elsewhere: another prefix, another Redis, and no way to the upstream.
    prefix = f"to-{uuid.uuid4().hex}"
    with RedisServer(tmp_path / "redis-2") as other:
        second = node_env(seaweed, other.url, prefix)
        code, out = cli("import", str(archive), tmp_path=tmp_path, origin=origin, env=second)
        assert code == 0, out
        assert f"{len(image.blobs)} blob(s) added" in out
        assert keys(s3, seaweed.bucket, f"{prefix}/blobs/") == {
            blob_key(prefix, b.digest) for b in image.blobs
        }
        offline = MirrorProcess(tmp_path / "offline", f"http://127.0.0.1:{free_port()}", env=second)
        offline.start()
        try:
            pull(skopeo_cli, offline, image, tmp_path / "offline-pull")
        finally:
            offline.stop()
    assert dir_blob_digests(tmp_path / "offline-pull") == {b.digest for b in image.blobs}
    for blob in image.blobs:
        data = (tmp_path / "offline-pull" / blob.digest.removeprefix("sha256:")).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest


@pytest.mark.parametrize("pin", [False, True])
def test_eviction_removes_the_least_recently_used_unpinned_blobs_from_s3(
    pin: bool,
    seaweed: SeaweedS3,
    redis_url: str,
    make_registry: RegistryFactory,
    skopeo_cli: Skopeo,
    s3: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pullthrough.cache import s3_evict

    one, two, three = (
        make_image(f"team/lru{i}", "1", seed=f"s3tools-lru-{i}", layer_sizes=(1 << 20,))
        for i in range(3)
    )
    origin = make_registry(seed=[one, two, three])
    prefix = f"lru-{uuid.uuid4().hex}"
    env = node_env(seaweed, redis_url, prefix)
    if pin:
        code, out = cli("cache", "pin", "team/lru1:1", tmp_path=tmp_path, origin=origin, env=env)
        assert code == 0, out
    node = MirrorProcess(tmp_path / "node", origin.url, env=env)
    node.start()
    try:
        for n, image in enumerate((one, two, three)):
            pull(skopeo_cli, node, image, tmp_path / f"first-{n}")
            time.sleep(1.1)  # S3 keeps write times to the second: an order to see
    finally:
        node.stop()
    # Hits on another node (a node records a blob's use at most every 20 s, and
    # the first pull's reads were just now): recorded in Redis, so `one` is now
    # the most recently used for every node.
    other = MirrorProcess(tmp_path / "other", origin.url, env=env)
    other.start()
    try:
        pull(skopeo_cli, other, one, tmp_path / "again")
    finally:
        other.stop()
    every = {blob_key(prefix, b.digest) for i in (one, two, three) for b in i.blobs}
    assert keys(s3, seaweed.bucket, f"{prefix}/blobs/") == every
    lru = three if pin else two
    admin = s3_admin.S3Admin(location(seaweed, prefix))
    try:
        total, _, _ = admin.usage()
        # Room for all but about one layer: one image has to go.
        limit = int((total - (1 << 19)) / LOW_WATER)
        # What the pins protect, found as the server's housekeeper finds it: on S3.
        for name, value in env.items():
            if name.startswith("AWS_"):
                monkeypatch.setenv(name, value)
        settings = settings_for(
            tmp_path / "operator",
            origin.url,
            storage=env["PULLTHROUGH_STORAGE"],
            s3_endpoint_url=seaweed.direct_endpoint,
            redis_url=redis_url,
        )
        with open_images(settings) as images:
            protected = images.protected()
        assert ({Digest.parse(b.digest) for b in two.blobs} <= protected) is pin

        def evict() -> s3_evict.S3Eviction | None:
            return s3_evict.evict(
                [admin],
                redis_url=redis_url,
                lock_dir=tmp_path / "operator",
                max_size=limit,
                max_age_seconds=None,
                protected=protected,
                now=time.time() + 2 * GRACE_SECONDS,  # as if a minute passed
            )

        # Another node evicting holds the lock: this one leaves it alone.
        held = redis.Redis.from_url(redis_url)
        held.set("pullthrough:lock:evict", "another node", px=60_000)
        assert evict() is None
        held.delete("pullthrough:lock:evict")
        held.close()

        result = evict()
        assert result is not None
        removed = {str(o.digest) for o in result.removed}
        # Its layer (its config too, when listed first: written in the same second).
        assert lru.layers_of(lru.top)[0].digest in removed
        assert removed <= {b.digest for b in lru.blobs}
    finally:
        admin.close()
    assert keys(s3, seaweed.bucket, f"{prefix}/blobs/") == every - {
        blob_key(prefix, d) for d in removed
    }
    # The command line's pass (the server's housekeeper) on the same bucket: a
    # dry run counts, and removes nothing.
    limited = {**env, "PULLTHROUGH_MAX_SIZE": "1"}
    code, out = cli("gc", tmp_path=tmp_path, origin=origin, env=limited)
    assert code == 0, out
    assert re.search(r"\d+ blob\(s\) over the size/age limits \(.*\) from S3", out), out
    assert keys(s3, seaweed.bucket, f"{prefix}/blobs/") == every - {
        blob_key(prefix, d) for d in removed
    }


def test_warm_fetches_into_the_bucket_and_a_second_warm_fetches_nothing(
    seaweed: SeaweedS3, redis_url: str, make_registry: RegistryFactory, s3: Any, tmp_path: Path
) -> None:
    image = make_image("team/warm", "1", seed="s3tools-warm", layer_sizes=(90_000, 10_000))
    origin = make_registry(seed=[image])
    prefix = f"warm-{uuid.uuid4().hex}"
    env = node_env(seaweed, redis_url, prefix)
    code, out = cli("warm", "team/warm:1", tmp_path=tmp_path, origin=origin, env=env)
    assert code == 0, out
    assert keys(s3, seaweed.bucket, f"{prefix}/blobs/") == {
        blob_key(prefix, b.digest) for b in image.blobs
    }
    mark = origin.mark()
    code, out = cli("warm", "team/warm:1", tmp_path=tmp_path, origin=origin, env=env)
    assert code == 0, out
    fetched = [e for e in origin.requests_since(mark) if "/blobs/" in e.path]
    assert fetched == []
    code, out = cli("cache", "ls", tmp_path=tmp_path, origin=origin, env=env)
    assert code == 0, out
    assert "team/warm:1" in out


def test_one_node_of_two_scrubs_the_bucket_and_quarantines_a_damaged_blob(
    seaweed: SeaweedS3,
    redis_url: str,
    make_registry: RegistryFactory,
    skopeo_cli: Skopeo,
    s3: Any,
    tmp_path: Path,
) -> None:
    image = make_image("team/scrub", "1", seed="s3tools-scrub", layer_sizes=(150_000,))
    origin = make_registry(seed=[image])
    layer = image.layers_of(image.top)[0]
    prefix = f"scrub-{uuid.uuid4().hex}"
    env = node_env(seaweed, redis_url, prefix)
    node = MirrorProcess(tmp_path / "node", origin.url, env=env)
    node.start()
    try:
        pull(skopeo_cli, node, image, tmp_path / "pulled")
    finally:
        node.stop()
    key = blob_key(prefix, layer.digest)
    data = bytearray(s3.get_object(Bucket=seaweed.bucket, Key=key)["Body"].read())
    data[7] ^= 0x80
    s3.put_object(Bucket=seaweed.bucket, Key=key, Body=bytes(data))
    aside = f"{prefix}/quarantine/blobs/sha256/{layer.digest.removeprefix('sha256:')}"

    nodes = [MirrorProcess(tmp_path / f"node-{i}", origin.url, env=env) for i in (1, 2)]
    try:
        for each in nodes:
            each.start()
        deadline = time.monotonic() + 30
        while aside not in keys(s3, seaweed.bucket, f"{prefix}/quarantine/"):
            assert time.monotonic() < deadline, "the damaged blob was not quarantined"
            time.sleep(0.2)
        assert key not in keys(s3, seaweed.bucket, f"{prefix}/blobs/")
        scraped = [scrape(each.url) for each in nodes]
    finally:
        for each in nodes:
            each.stop()
    corrupt = [m.get(("pullthrough_corrupt_objects_total", "blob"), 0.0) for m in scraped]
    assert sorted(corrupt) == [0.0, 1.0]
    scrubbed = [m.get(("pullthrough_scrub_bytes_total", ""), 0.0) for m in scraped]
    assert sorted(scrubbed)[0] == 0.0  # the other node waits for the lock
    assert sorted(scrubbed)[1] >= layer.size

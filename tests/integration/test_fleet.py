"""Three mirror nodes sharing one S3 store (SeaweedFS) and one Redis: a blob is
fetched from the upstream once for the whole fleet, a node killed mid-download
is taken over by another, and real clients pull through nginx in front of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.integration.test_clients import PLATFORM, podman_sandbox, require_root, run
from tests.integration.test_fleet_nginx import nginx_in_front
from tests.support.binaries import require_binary
from tests.support.faults import FaultRegistry, digest_of
from tests.support.images import make_image
from tests.support.mirror import MirrorProcess
from tests.support.redis import RedisServer
from tests.support.registry import RegistryFactory
from tests.support.seaweed import SeaweedS3
from tests.support.skopeo import Skopeo, dir_blob_digests, dir_manifest


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with RedisServer(tmp_path / "redis") as server:
        yield server.url


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # podman keeps sockets under its run root: a path short enough for them.
    path = Path(f"/tmp/pt-fleet-{uuid.uuid4().hex[:8]}")
    path.mkdir()
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


def fleet_env(seaweed: SeaweedS3, redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    return {**seaweed.mirror_env(prefix, redis_url), **extra}


@contextlib.contextmanager
def fleet(
    tmp_path: Path, upstream: str, env: dict[str, str], *, workers: int = 1
) -> Iterator[list[MirrorProcess]]:
    nodes = [
        MirrorProcess(tmp_path / f"node{i}" / "cache", upstream, workers=workers, env=env)
        for i in (1, 2, 3)
    ]
    try:
        for node in nodes:
            node.cache_dir.parent.mkdir(parents=True, exist_ok=True)
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def final_keys(seaweed: SeaweedS3, prefix: str) -> list[str]:
    """The committed blobs under ``prefix`` in the bucket (not staging uploads)."""
    client = seaweed.client()
    try:
        listed = client.list_objects_v2(Bucket=seaweed.bucket, Prefix=f"{prefix}/blobs/")
        return [item["Key"] for item in listed.get("Contents", [])]
    finally:
        client.close()


async def sha256_of(session: aiohttp.ClientSession, url: str) -> str:
    digest = hashlib.sha256()
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        async for chunk in resp.content.iter_chunked(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def test_twenty_cold_requests_over_three_nodes_cost_one_upstream_get(
    seaweed: SeaweedS3, redis_url: str, make_registry: RegistryFactory, tmp_path: Path
) -> None:
    image = make_image("team/big", "1", seed="fleet-20", layer_sizes=[24 << 20], compresslevel=0)
    origin = make_registry(seed=[image])
    layer = max(image.blobs, key=lambda b: b.size)
    prefix = f"fleet-{uuid.uuid4().hex}"
    # Two workers a node: six processes race for the one fetch.
    with fleet(tmp_path, origin.url, fleet_env(seaweed, redis_url, prefix), workers=2) as nodes:
        mark = origin.mark()
        urls = [f"{n.url}/v2/team/big/blobs/{layer.digest}" for n in nodes]

        async def twenty() -> list[str]:
            connector = aiohttp.TCPConnector(limit=0, force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                return await asyncio.gather(*(sha256_of(session, urls[i % 3]) for i in range(20)))

        assert asyncio.run(twenty()) == [layer.digest] * 20
        gets = [
            e
            for e in origin.requests_since(mark, settle=0.3)
            if e.method == "GET" and e.path.endswith(f"/blobs/{layer.digest}")
        ]
        assert len(gets) == 1, gets
        assert final_keys(seaweed, prefix) == [
            f"{prefix}/blobs/sha256/{layer.digest.removeprefix('sha256:')}"
        ]


BLOB = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(64 * 1024))  # 2 MiB
DIGEST = digest_of(BLOB)


async def test_the_fetching_node_killed_mid_download_is_taken_over(
    seaweed: SeaweedS3, redis_url: str, tmp_path: Path
) -> None:
    fault = FaultRegistry()
    fault.add_blob(BLOB)
    fault.stall = asyncio.Event()  # the body stops half-way until released
    fault.stall_after = len(BLOB) // 2
    server = TestServer(fault.app())
    await server.start_server()
    prefix = f"fleet-{uuid.uuid4().hex}"
    env = fleet_env(seaweed, redis_url, prefix, PULLTHROUGH_FETCH_LEASE="2")
    base = str(server.make_url("/")).rstrip("/")
    nodes = [MirrorProcess(tmp_path / f"node{i}" / "cache", base, env=env) for i in (1, 2, 3)]
    try:
        for node in nodes:
            node.cache_dir.parent.mkdir()
            await asyncio.to_thread(node.start)
        urls = [f"{n.url}/v2/library/app/blobs/{DIGEST}" for n in nodes]
        async with aiohttp.ClientSession() as session:
            first = await session.get(urls[0])
            assert first.status == 200
            await first.content.readexactly(len(BLOB) // 4)
            waiting = [asyncio.create_task(sha256_of(session, url)) for url in urls[1:]]
            await asyncio.sleep(1.0)
            assert not any(task.done() for task in waiting)  # they wait for the fetcher
            assert fault.count("GET", "blobs") == 1
            assert final_keys(seaweed, prefix) == []  # nothing partial is visible
            await asyncio.to_thread(nodes[0].kill)  # SIGKILL: no clean-up runs
            killed = time.monotonic()
            fault.stall = None  # the next fetch runs through
            with pytest.raises(aiohttp.ClientPayloadError):
                await first.read()
            first.release()
            assert await asyncio.gather(*waiting) == [DIGEST, DIGEST]
            took = time.monotonic() - killed
        # The lease ran out (2 s) and one of the two waiters fetched for both.
        assert fault.count("GET", "blobs") == 2
        assert took < 10, took
        print(f"taken over and served {took:.2f} s after the SIGKILL")
        assert final_keys(seaweed, prefix) == [f"{prefix}/blobs/sha256/{DIGEST[7:]}"]
    finally:
        for node in nodes:
            await asyncio.to_thread(node.stop)
        await server.close()


def test_skopeo_and_podman_pull_through_nginx_in_front_of_the_fleet(
    seaweed: SeaweedS3,
    redis_url: str,
    make_registry: RegistryFactory,
    skopeo_cli: Skopeo,
    short_dir: Path,
    tmp_path: Path,
) -> None:
    podman = require_binary("podman")
    require_root("podman")
    image = make_image("library/fleetapp", "1", seed="fleet-lb", layer_sizes=[1 << 20, 300_000])
    origin = make_registry(seed=[image])
    prefix = f"fleet-{uuid.uuid4().hex}"
    env = fleet_env(seaweed, redis_url, prefix)
    with fleet(tmp_path, origin.url, env) as nodes, nginx_in_front(tmp_path / "lb", nodes) as port:
        lb = f"127.0.0.1:{port}"
        mark = origin.mark()
        skopeo_cli.copy(f"docker://{lb}/{image.ref}", f"dir:{tmp_path / 'pulled'}")
        assert dir_manifest(tmp_path / "pulled") == image.top.data
        assert dir_blob_digests(tmp_path / "pulled") == {b.digest for b in image.blobs}

        conf, penv, podman_ = podman_sandbox(
            podman,
            tmp_path,
            short_dir,
            "[[registry]]\n"
            'prefix = "docker.io"\n'
            'location = "docker.io"\n\n'
            "[[registry.mirror]]\n"
            f'location = "{lb}"\n'
            "insecure = true\n",
        )
        ref = f"docker.io/{image.ref}"
        image_id = run(
            [
                *podman_,
                "pull",
                "--quiet",
                "--platform",
                PLATFORM,
                "--authfile",
                str(conf / "auth.json"),
                "--signature-policy",
                str(conf / "policy.json"),
                ref,
            ],
            penv,
        ).strip()
        assert f"sha256:{image_id}" == image.top.json["config"]["digest"]
        seen = origin.requests_since(mark, settle=0.3)
    # Each blob came from the upstream once for both clients and all three nodes.
    blob_gets = [e.path for e in seen if e.method == "GET" and "/blobs/" in e.path]
    assert sorted(blob_gets) == sorted({f"/v2/{image.name}/blobs/{b.digest}" for b in image.blobs})

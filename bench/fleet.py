"""Two mirror nodes on one S3 store and one Redis: pullthrough versus distribution.

``python -m bench.fleet`` (``--size-mib``, ``--mbit``, ``--rtt-ms``). Both products
run two nodes sharing SeaweedFS (S3) and Redis; distribution 2.8 in proxy mode
with its S3 driver and its Redis blob-descriptor cache, pullthrough with
``storage = "s3://..."`` and ``redis_url``. The upstream is distribution with
Docker-Hub-style token auth behind an emulated WAN link (bench/wan.py's relay),
so a cold fetch takes as long as it would from a registry on the internet.

Measured, each on fresh nodes and a fresh bucket prefix:
- upstream blob GETs for 16 concurrent cold requests, 8 on each node;
- time to first byte of a cold big blob on the node that fetches it, and on
  the other node asked once the first has begun (the upstream GETs are counted
  too: a node that does not wait for its peer fetches again);
- warm throughput of the big blob from S3 through a node, and through a 307 to
  a presigned URL that the client follows.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis as redis_py

from bench.run import MiB, start_upstream
from bench.wan import Wan
from tests.support.images import DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST, Blob, Image, Manifest
from tests.support.mirror import MirrorProcess
from tests.support.redis import RedisServer
from tests.support.registry import AccessLogEntry, Registry
from tests.support.seaweed import SeaweedS3

REPO = "bench/fleet"


class DistributionNode(Registry):
    """distribution 2.8 as a pull-through proxy on S3, with Redis as its cache."""

    def __init__(
        self, workdir: Path, *, remote: str, s3: SeaweedS3, redis: RedisServer, root: str
    ) -> None:
        super().__init__(workdir, proxy_remote_url=remote)
        self.s3 = s3
        self.redis = redis
        self.root = root
        self.redirect = False

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["storage"] = {
            "s3": {
                "accesskey": self.s3.access_key,
                "secretkey": self.s3.secret_key,
                "region": self.s3.region,
                "regionendpoint": self.s3.direct_endpoint,
                "bucket": self.s3.bucket,
                "rootdirectory": self.root,
                "secure": False,
                "v4auth": True,
            },
            "cache": {"blobdescriptor": "redis"},
            "maintenance": {"uploadpurging": {"enabled": False}},
            "redirect": {"disable": not self.redirect},
        }
        cfg["redis"] = {"addr": self.redis.url.removeprefix("redis://").split("/")[0], "db": 0}
        return cfg

    def process_env(self) -> dict[str, str] | None:
        return {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}


@dataclass
class Node:
    url: str
    stop: Callable[[], None]
    kill: Callable[[], None]


def pullthrough_node(
    work: Path, remote: str, s3: SeaweedS3, redis: RedisServer, prefix: str, *, redirect: bool
) -> Node:
    mirror = MirrorProcess(
        work / "cache",
        remote,
        workers=1,
        env={
            "PULLTHROUGH_LOG_LEVEL": "WARNING",
            "PULLTHROUGH_STORAGE": f"s3://{s3.bucket}/{prefix}",
            "PULLTHROUGH_S3_ENDPOINT_URL": s3.direct_endpoint,
            "PULLTHROUGH_S3_REGION": s3.region,
            "PULLTHROUGH_REDIS_URL": redis.url,
            "PULLTHROUGH_REDIRECT": "true" if redirect else "false",
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        },
    )
    work.mkdir(parents=True, exist_ok=True)
    mirror.start()
    return Node(mirror.url, mirror.stop, mirror.kill)


def distribution_node(
    work: Path, remote: str, s3: SeaweedS3, redis: RedisServer, prefix: str, *, redirect: bool
) -> Node:
    node = DistributionNode(work, remote=remote, s3=s3, redis=redis, root=f"/{prefix}")
    node.redirect = redirect
    node.start()
    return Node(node.url, node.stop, node.stop)


async def get_digest(session: aiohttp.ClientSession, url: str) -> tuple[str, float, float]:
    """(digest, seconds to the first byte, seconds to the last) of one GET."""
    started = time.monotonic()
    first = 0.0
    digest = hashlib.sha256()
    async with session.get(url) as resp:
        resp.raise_for_status()
        async for chunk in resp.content.iter_chunked(1 << 20):
            if not first:
                first = time.monotonic() - started
            digest.update(chunk)
    return "sha256:" + digest.hexdigest(), first, time.monotonic() - started


def new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        timeout=aiohttp.ClientTimeout(total=600),
    )


async def spread(urls: list[str], n: int) -> list[str]:
    async with new_session() as session:
        got = await asyncio.gather(*(get_digest(session, urls[i % len(urls)]) for i in range(n)))
    return [digest for digest, _, _ in got]


async def two_nodes(
    first: str, second: str, gap: float
) -> tuple[tuple[str, float, float], tuple[str, float, float]]:
    """The cold blob asked of ``first``, and ``gap`` seconds later of ``second``
    (the first node is fetching it by then): (digest, first byte, last byte) of
    each, the times counted from the first request."""
    async with new_session() as session:
        one = asyncio.create_task(get_digest(session, first))
        await asyncio.sleep(gap)
        two = await get_digest(session, second)
        a = await one
    return a, (two[0], two[1] + gap, two[2] + gap)


def upstream_blob_gets(entries: list[AccessLogEntry], digest: str) -> int:
    return sum(1 for e in entries if e.method == "GET" and e.path.endswith(f"/blobs/{digest}"))


def warm_throughput(url: str, size: int, *, follow: bool) -> float:
    out = subprocess.run(
        ["curl", "-sf", *(["-L"] if follow else []), "-o", "/dev/null", "-w", "%{time_total}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return size / MiB / float(out)


def seed(upstream: Registry, size: int, layers: int) -> tuple[Image, list[Blob]]:
    blobs = [Blob.of(os.urandom(size if i == 0 else 1 * MiB), DOCKER_LAYER) for i in range(layers)]
    config = Blob.of(json.dumps({"architecture": "amd64", "os": "linux"}).encode(), DOCKER_CONFIG)
    manifest = Manifest.of(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": config.descriptor(),
            "layers": [b.descriptor() for b in blobs],
        }
    )
    image = Image(REPO, "1", (manifest,), (config, *blobs), manifest)
    upstream.push(image)
    return image, blobs


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="pt-fleet-") as tmp:
        work = Path(tmp)
        upstream = start_upstream(stack, work)
        _, blobs = seed(upstream, args.size_mib * MiB, 3)
        big, small = blobs[0], blobs[1]
        wan = Wan(int(upstream.host.rsplit(":", 1)[1]), args.rtt_ms / 1000, args.mbit)
        wan.start()
        stack.callback(wan.stop)
        remote = f"http://{wan.host}"
        s3 = SeaweedS3(work / "s3")
        s3.start()
        stack.callback(s3.stop)
        redis = RedisServer(work / "redis")
        redis.start()
        stack.callback(redis.stop)
        serial = 0
        makers = {"pullthrough": pullthrough_node, "distribution": distribution_node}

        def pair(who: str, *, redirect: bool = False) -> list[Node]:
            nonlocal serial
            serial += 1
            # A fresh bucket prefix: what Redis remembers of the last pair is stale.
            client = redis_py.Redis.from_url(redis.url)
            client.flushall()
            client.close()
            prefix = f"{who}-{serial}"
            nodes = [
                makers[who](work / f"{prefix}-{i}", remote, s3, redis, prefix, redirect=redirect)
                for i in range(2)
            ]
            for node in nodes:
                stack.callback(node.stop)
            return nodes

        for who in args.products:
            print(f"{who}: 16 concurrent cold requests over two nodes...", flush=True)
            nodes = pair(who)
            mark = upstream.mark()
            urls = [f"{n.url}/v2/{REPO}/blobs/{small.digest}" for n in nodes]
            digests = asyncio.run(spread(urls, 16))
            assert set(digests) == {small.digest}, f"{who} served wrong bytes"
            gets = upstream_blob_gets(upstream.requests_since(mark, settle=0.5), small.digest)
            results.setdefault("upstream_blob_gets_16_cold_2_nodes", {})[who] = gets
            print(f"  upstream GETs: {gets}", flush=True)

            print(f"{who}: time to first byte, fetching node and waiting node...", flush=True)
            mark = upstream.mark()
            urls = [f"{n.url}/v2/{REPO}/blobs/{big.digest}" for n in nodes]
            one, two = asyncio.run(two_nodes(urls[0], urls[1], args.gap))
            assert one[0] == two[0] == big.digest, f"{who} served wrong bytes"
            first, second = one[1], two[1] - args.gap
            gets = upstream_blob_gets(upstream.requests_since(mark, settle=0.5), big.digest)
            results.setdefault("ttfb_fetching_node_s", {})[who] = first
            results.setdefault("ttfb_waiting_node_s", {})[who] = second
            results.setdefault("last_byte_fetching_node_s", {})[who] = one[2]
            results.setdefault("last_byte_waiting_node_s", {})[who] = two[2]
            results.setdefault("upstream_blob_gets_big_2_nodes", {})[who] = gets
            print(
                f"  first byte: fetching node {first:.3f} s, waiting node {second:.3f} s; "
                f"last byte (from the first ask): {one[2]:.3f} s and {two[2]:.3f} s; GETs {gets}",
                flush=True,
            )

            print(f"{who}: warm throughput from S3...", flush=True)
            rates = [warm_throughput(urls[1], big.size, follow=False) for _ in range(3)]
            results.setdefault("warm_mib_s_through_node", {})[who] = max(rates)
            for node in nodes:
                node.stop()
            nodes = pair(who, redirect=True)
            asyncio.run(spread([f"{nodes[0].url}/v2/{REPO}/blobs/{big.digest}"], 1))
            url = f"{nodes[1].url}/v2/{REPO}/blobs/{big.digest}"
            rates = [warm_throughput(url, big.size, follow=True) for _ in range(3)]
            results.setdefault("warm_mib_s_redirect", {})[who] = max(rates)
            for node in nodes:
                node.stop()
            print(
                f"  {results['warm_mib_s_through_node'][who]:.0f} MiB/s through, "
                f"{results['warm_mib_s_redirect'][who]:.0f} MiB/s by redirect",
                flush=True,
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=128, help="the big blob (MiB)")
    parser.add_argument("--mbit", type=float, default=400.0, help="upstream link rate")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="upstream round trip")
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between the two asks")
    parser.add_argument(
        "--products",
        nargs="+",
        default=["distribution", "pullthrough"],
        choices=("distribution", "pullthrough"),
    )
    args = parser.parse_args(argv)
    results = run(args)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

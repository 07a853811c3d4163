"""Warm blob throughput from S3 storage (``python -m bench.s3``).

SeaweedFS (``weed mini``) holds one incompressible blob, committed through the S3
blob store; a pullthrough process with ``storage = s3://...`` and ``offline =
true`` (nothing to fetch: every answer is a hit) serves it. ``curl`` downloads
it three times each way, median MiB/s:

- ``stream``: through the mirror, which reads it from S3 with a ranged GET;
- ``redirect``: ``redirect = true``, curl follows the 307 to the presigned URL;
- ``s3 direct``: a presigned URL straight from SeaweedFS, the ceiling of both.

Then the time to the first byte of a cold blob of the same size for a reader on
the store that fetches it and for one on a second store sharing its fetch locks
(another node): the waiting one is served the committed object, so it waits for
the whole download and upload.

Loopback, one machine: the mirror, SeaweedFS and curl share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from pullthrough.cache.coordination import LocalLocks
from pullthrough.cache.digests import Digest
from pullthrough.cache.s3 import S3BlobStore
from pullthrough.cache.s3_location import S3Location
from pullthrough.cache.storage import DownloadSink
from tests.support.binaries import require_binary
from tests.support.mirror import MirrorProcess
from tests.support.seaweed import SeaweedS3

CHUNK = 1 << 20


async def _commit(location: S3Location, staging: Path, size: int) -> tuple[Digest, str]:
    """Put ``size`` random bytes in the bucket as a blob; (digest, presigned URL)."""
    data = os.urandom(size)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())

    async def feed(sink: DownloadSink) -> None:
        await sink.begin(size)
        for pos in range(0, size, CHUNK):
            await sink.write(data[pos : pos + CHUNK])

    store = S3BlobStore(location, locks=LocalLocks(), staging=staging, redirect=True)
    try:
        tracker = await store.track(digest, feed)
        assert tracker is not None
        async for _ in tracker.read(max(size - 1, 0), None):
            pass
        await store.settle()
        held = await store.open(digest)
        assert held is not None
        assert held.location is not None
        return digest, held.location
    finally:
        await store.close()


async def _first_bytes(location: S3Location, staging: Path, size: int) -> tuple[float, float]:
    """Seconds to the first byte for a reader on the fetching store and one on a
    second store sharing its locks (another node): (fetching, waiting)."""
    data = os.urandom(size)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())

    async def feed(sink: DownloadSink) -> None:
        await sink.begin(size)
        for pos in range(0, size, CHUNK):
            await sink.write(data[pos : pos + CHUNK])
            await asyncio.sleep(0)  # an upstream's chunks arrive between other work

    locks = LocalLocks()
    nodes = [S3BlobStore(location, locks=locks, staging=staging / str(i)) for i in range(2)]
    start = time.monotonic()

    async def first_byte(node: S3BlobStore) -> float:
        tracker = await node.track(digest, feed)
        assert tracker is not None
        seen = None
        async for _ in tracker.read(0, None):
            seen = seen or time.monotonic() - start
        assert seen is not None
        return seen

    try:
        fetching, waiting = await asyncio.gather(*(first_byte(node) for node in nodes))
        return fetching, waiting
    finally:
        for node in nodes:
            await node.close()


def _curl(curl: str, url: str, *, follow: bool = False) -> float:
    """MiB/s of one download to /dev/null."""
    out = subprocess.run(
        [curl, "-sS", "-o", "/dev/null", "-w", "%{http_code} %{speed_download}"]
        + (["-L"] if follow else [])
        + [url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    if out[0] != "200":
        raise RuntimeError(f"{url} answered {out[0]}")
    return float(out[1]) / (1 << 20)


def run(size_mib: int, reps: int) -> dict[str, float]:
    curl = require_binary("curl")
    work = Path(tempfile.mkdtemp(prefix="pt-bench-s3-"))
    results: dict[str, float] = {}
    try:
        with SeaweedS3(work / "seaweed") as s3:
            location = S3Location(
                s3.bucket,
                f"bench-{uuid.uuid4().hex}/",
                endpoint_url=s3.direct_endpoint,
                region=s3.region,
                access_key=s3.access_key,
                secret_key=s3.secret_key,
            )
            digest, presigned = asyncio.run(_commit(location, work / "staging", size_mib << 20))
            env = {
                "AWS_ACCESS_KEY_ID": s3.access_key,
                "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                "AWS_DEFAULT_REGION": s3.region,
                "PULLTHROUGH_STORAGE": f"s3://{location.bucket}/{location.prefix}",
                "PULLTHROUGH_S3_ENDPOINT_URL": s3.direct_endpoint,
                "PULLTHROUGH_OFFLINE": "true",
                "PULLTHROUGH_LOG_LEVEL": "WARNING",
            }
            for name, redirect in (("stream", "false"), ("redirect", "true")):
                mirror = MirrorProcess(
                    work / f"cache-{name}",
                    "http://127.0.0.1:9",
                    env={**env, "PULLTHROUGH_REDIRECT": redirect},
                )
                mirror.start()
                try:
                    url = f"{mirror.url}/v2/library/bench/blobs/{digest}"
                    speeds = [_curl(curl, url, follow=True) for _ in range(reps)]
                finally:
                    mirror.stop()
                results[name] = statistics.median(speeds)
            results["s3 direct"] = statistics.median(_curl(curl, presigned) for _ in range(reps))
            fetching, waiting = asyncio.run(_first_bytes(location, work / "ttfb", size_mib << 20))
            results["ttfb fetching s"] = fetching
            results["ttfb waiting s"] = waiting
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.s3", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256, help="blob size (default 256)")
    parser.add_argument("--reps", type=int, default=3, help="downloads per figure (median)")
    args = parser.parse_args(argv)
    results = run(args.size_mib, args.reps)
    print(f"warm {args.size_mib} MiB blob from S3, median of {args.reps}:")
    for name, value in results.items():
        if name.startswith("ttfb"):
            print(f"  {name:16s} {value:8.3f} (cold, two stores sharing locks)")
        else:
            print(f"  {name:16s} {value:8.0f} MiB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

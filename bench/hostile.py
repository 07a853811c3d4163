"""Figures for hostile and broken upstreams, with the default settings.

    python -m bench.hostile            # fault upstreams only (about 20 s)
    python -m bench.hostile --s3       # also pulls from distribution on SeaweedFS S3

Prints what a foreign token realm received, how often an internal service was
reached through manifest and tag-list redirects, how long a pull of a cached tag
waits when the upstream accepts connections and never answers, how long a
trickling blob holds a client, what an unreachable upstream reads like, and
(with --s3) cold, warm and 20 concurrent pulls through presigned redirects.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from pullthrough.proxy.app import create_app
from pullthrough.proxy.config import Settings
from pullthrough.proxy.upstream import USER_AGENT
from tests.support.binaries import require_binary
from tests.support.faults import (
    MANIFEST_TYPE,
    FaultRegistry,
    ForeignRealm,
    InternalService,
    digest_of,
)
from tests.support.images import make_image, push_images
from tests.support.mirror import MirrorProcess
from tests.support.processes import free_port
from tests.support.seaweed import S3Registry, SeaweedS3
from tests.support.skopeo import Skopeo, dir_blob_digests
from tests.support.tokenserver import TokenServer

BLOB = os.urandom(64 * 1024)
DIGEST = digest_of(BLOB)


def _settings(cache: Path, upstream: str, **overrides: Any) -> Settings:
    return Settings(host="127.0.0.1", cache_dir=cache, upstream=URL(upstream), **overrides)


async def _serve(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def _mirror(cache: Path, upstream: TestServer | str, **overrides: Any) -> TestServer:
    url = upstream if isinstance(upstream, str) else str(upstream.make_url("")).rstrip("/")
    return await _serve(create_app(_settings(cache, url, **overrides)))


def _fault() -> FaultRegistry:
    fault = FaultRegistry()
    fault.add_blob(BLOB)
    fault.add_manifest("1.0", {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": []})
    return fault


async def hostile(work: Path) -> None:
    async with aiohttp.ClientSession() as client:
        # A redirect to a foreign realm, with credentials configured.
        fault = _fault()
        fault.require_token = True
        foreign = ForeignRealm()
        foreign_server = await _serve(foreign.app())
        fault.redirect_to = str(foreign_server.make_url("")).rstrip("/")
        upstream = await _serve(fault.app())
        mirror = await _mirror(
            work / "a",
            upstream,
            upstream_username="mirror",
            upstream_password="s3cret",  # noqa: S106
        )
        async with client.get(mirror.make_url(f"/v2/library/app/blobs/{DIGEST}")) as resp:
            blob_status = resp.status
        async with client.get(mirror.make_url("/v2/other/image/manifests/1.0")) as resp:
            other_status = resp.status
        print(f"foreign realm: blob through it -> {blob_status}, next image -> {other_status}")
        for seen in foreign.seen:
            has_auth = "Authorization" in seen.headers
            print(f"  it received: {seen.method} {seen.path[:40]}... Authorization={has_auth}")
        token_requests = [s for s in foreign.seen if s.path.startswith("/token")]
        print(f"  token requests to it: {len(token_requests)}")
        print(
            f"  token requests to the upstream's realm: {len(fault.token_auth)}, all Basic: "
            f"{all((a or '').startswith('Basic ') for a in fault.token_auth)}"
        )
        await mirror.close()
        await upstream.close()
        await foreign_server.close()

        # Manifest, HEAD and tag-list redirects to an internal service.
        fault = _fault()
        internal = InternalService()
        internal_server = await _serve(internal.app())
        fault.redirect_manifests_to = str(internal_server.make_url("/internal/meta"))
        fault.redirect_tags_to = str(internal_server.make_url("/internal/tags"))
        upstream = await _serve(fault.app())
        mirror = await _mirror(work / "b", upstream)
        statuses = []
        for method, path in [
            ("GET", "manifests/1.0"),
            ("HEAD", "manifests/1.0"),
            ("GET", "tags/list"),
        ] * 10:
            async with client.request(method, mirror.make_url(f"/v2/library/app/{path}")) as resp:
                statuses.append(resp.status)
        print(
            f"internal service: 30 redirected requests -> statuses {sorted(set(statuses))}, "
            f"internal hits {len(internal.hits)}"
        )
        await mirror.close()
        await upstream.close()
        await internal_server.close()

        # A stalled upstream (accepts, reads the request, never answers), cached tag.
        fault = _fault()
        upstream = await _serve(fault.app())
        mirror = await _mirror(work / "c", upstream, tag_ttl=0.0)
        async with client.get(mirror.make_url("/v2/library/app/manifests/1.0")) as resp:
            await resp.read()
        fault.hang = asyncio.Event()
        started = time.monotonic()
        async with client.get(mirror.make_url("/v2/library/app/manifests/1.0")) as resp:
            await resp.read()
            stale = resp.status
        print(
            f"stalled upstream, cached tag: {stale} after {time.monotonic() - started:.2f} s "
            "(revalidate_timeout 5 s; read_timeout 60 s)"
        )
        fault.hang.set()
        await mirror.close()
        await upstream.close()

        # A blob that trickles one byte every 5 s.
        fault = _fault()
        fault.trickle = 5.0
        upstream = await _serve(fault.app())
        mirror = await _mirror(work / "d", upstream)
        started = time.monotonic()
        async with client.get(mirror.make_url(f"/v2/library/app/blobs/{DIGEST}")) as resp:
            try:
                got = len(await resp.read())
                outcome = f"{got} bytes"
            except aiohttp.ClientPayloadError:
                outcome = "cut short"
        kept = [p for p in (work / "d").rglob("*") if p.is_file() and "blobs" in p.parts]
        print(
            f"trickling blob (1 byte / 5 s): {outcome} after {time.monotonic() - started:.2f} s, "
            f"blobs kept {len(kept)} (upstream_min_rate 1 KiB/s over 10 s)"
        )
        await mirror.close()
        await upstream.close()

        # Nothing listens at the upstream's address.
        port = free_port()
        mirror = await _mirror(work / "e", f"http://127.0.0.1:{port}")
        async with client.get(mirror.make_url("/v2/library/app/manifests/1.0")) as resp:
            body = await resp.json()
        print(f"unreachable upstream: {resp.status} {body['errors'][0]}")
        await mirror.close()


def s3(work: Path) -> None:
    image = make_image("library/s3app", "1", "s3bench", (8_000_000, 1_000_000, 200_000))
    skopeo = require_binary("skopeo")
    with TokenServer(workdir=work / "tokens") as tokens, SeaweedS3(work / "s3") as store:
        registry = S3Registry(work / "registry", store, tokens=tokens, binary="docker-registry")
        with registry:
            push_images(registry.url, [image])

            def pull(mirror: MirrorProcess, name: str) -> float:
                dest = work / name
                started = time.monotonic()
                Skopeo(skopeo, work / f"skopeo-{name}").copy(
                    f"docker://{mirror.url.removeprefix('http://')}/s3app:1", f"dir:{dest}"
                )
                elapsed = time.monotonic() - started
                assert dir_blob_digests(dest) == {b.digest for b in image.blobs}
                for blob in image.blobs:
                    data = (dest / blob.digest.removeprefix("sha256:")).read_bytes()
                    assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest
                return elapsed

            def mirror_requests(since: int) -> tuple[int, int]:
                relayed = store.relayed()[since:]
                sent = [r for r in relayed if r.headers.get("User-Agent") == USER_AGENT]
                return len(sent), sum("Authorization" in r.headers for r in sent)

            for label, env in (
                ("anonymous", {}),
                (
                    "credentials",
                    {
                        "PULLTHROUGH_UPSTREAM_USERNAME": "alice",
                        "PULLTHROUGH_UPSTREAM_PASSWORD": "wonderland",
                    },
                ),
            ):
                mirror = MirrorProcess(work / f"cache-{label}", registry.url, env=env)
                mirror.start()
                try:
                    mark = len(store.relayed())
                    cold = pull(mirror, f"cold-{label}")
                    cold_sent = mirror_requests(mark)
                    mark = len(store.relayed())
                    warm = pull(mirror, f"warm-{label}")
                    warm_sent = mirror_requests(mark)
                    print(
                        f"S3 upstream, {label}: cold {cold:.2f} s (S3 GETs {cold_sent[0]}, "
                        f"with Authorization {cold_sent[1]}), warm {warm:.2f} s "
                        f"(S3 GETs {warm_sent[0]}), {len(image.blobs)} blobs, identical"
                    )
                finally:
                    mirror.stop()

            mirror = MirrorProcess(work / "cache-20", registry.url)
            mirror.start()
            try:
                mark = len(store.relayed())
                started = time.monotonic()
                with ThreadPoolExecutor(max_workers=20) as pool:
                    list(pool.map(lambda i: pull(mirror, f"c20-{i}"), range(20)))
                elapsed = time.monotonic() - started
                sent = mirror_requests(mark)
                print(
                    f"S3 upstream, 20 concurrent cold skopeo pulls: {elapsed:.2f} s, all "
                    f"identical, S3 GETs {sent[0]} for {len(image.blobs)} blobs, "
                    f"with Authorization {sent[1]}"
                )
            finally:
                mirror.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--s3", action="store_true", help="also pull from an S3-backed upstream")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pullthrough-hostile-") as tmp:
        asyncio.run(hostile(Path(tmp)))
        if args.s3:
            s3(Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

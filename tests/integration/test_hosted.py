"""Hosted repositories over HTTP against the in-process app: push (monolithic,
chunked, resumed, mounted), manifests, tags, catalog, delete, referrers, the
error cases of the distribution-spec, and who may push."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from pullthrough.cache.digests import Digest
from pullthrough.cache.layout import Layout
from pullthrough.proxy.app import create_app
from pullthrough.proxy.commands.stats import summarize
from pullthrough.proxy.config import AccessRule
from pullthrough.proxy.hosted import Hosted
from pullthrough.proxy.push_routes import HOSTED_KEY
from tests.integration.test_tls_access import htpasswd_line
from tests.support.mirror import settings_for
from tests.support.registry import Registry
from tests.support.tmpfs import tmpfs

Client = TestClient[Any, Any]
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(data: bytes, media_type: str) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}


def image_manifest(config: bytes, layers: list[bytes], **extra: Any) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(config, "application/vnd.oci.image.config.v1+json"),
        "layers": [descriptor(layer, "application/vnd.oci.image.layer.v1.tar") for layer in layers],
        **extra,
    }
    return json.dumps(doc).encode()


async def hosted_app(aiohttp_client: Any, tmp_path: Path, upstream: Registry, **kw: Any) -> Client:
    settings = settings_for(tmp_path / "cache", upstream.url, hosted=("myorg/", "golden/"), **kw)
    client: Client = await aiohttp_client(create_app(settings))
    return client


async def push_blob(client: Client, name: str, data: bytes) -> str:
    digest = digest_of(data)
    resp = await client.post(f"/v2/{name}/blobs/uploads/?digest={digest}", data=data)
    assert resp.status == 201, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == digest
    return digest


async def push_manifest(client: Client, name: str, ref: str, data: bytes) -> Any:
    return await client.put(
        f"/v2/{name}/manifests/{ref}", data=data, headers={"Content-Type": OCI_MANIFEST}
    )


async def error_code(resp: Any) -> str:
    body = await resp.json()
    return str(body["errors"][0]["code"])


async def test_monolithic_push_then_pull_by_tag_and_digest_never_asks_upstream(
    aiohttp_client: Any, tmp_path: Path, upstream: Registry
) -> None:
    client = await hosted_app(aiohttp_client, tmp_path, upstream)
    mark = upstream.mark()
    config, layer = b'{"architecture":"amd64"}', b"layer bytes" * 1000
    await push_blob(client, "myorg/app", config)
    # POST then PUT: the other monolithic form.
    resp = await client.post("/v2/myorg/app/blobs/uploads/")
    assert resp.status == 202
    location = resp.headers["Location"]
    resp = await client.put(f"{location}?digest={digest_of(layer)}", data=layer)
    assert resp.status == 201, await resp.text()
    manifest = image_manifest(config, [layer])
    resp = await push_manifest(client, "myorg/app", "v1", manifest)
    assert resp.status == 201, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == digest_of(manifest)

    for ref in ("v1", digest_of(manifest)):
        resp = await client.get(f"/v2/myorg/app/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
        assert resp.status == 200
        assert await resp.read() == manifest
        assert resp.headers["Content-Type"] == OCI_MANIFEST
    resp = await client.get(f"/v2/myorg/app/blobs/{digest_of(layer)}")
    assert await resp.read() == layer
    resp = await client.head(f"/v2/myorg/app/blobs/{digest_of(layer)}")
    assert resp.headers["Content-Length"] == str(len(layer))
    resp = await client.get("/v2/myorg/app/manifests/nope")
    assert resp.status == 404
    assert await error_code(resp) == "MANIFEST_UNKNOWN"
    resp = await client.get("/v2/myorg/other/blobs/" + digest_of(layer))
    assert resp.status == 404  # another repository does not hold it
    assert upstream.requests_since(mark) == []
    resp = await push_manifest(client, "myorg/app", "v2", image_manifest(config, [b"never"]))
    assert resp.status == 400  # MANIFEST_BLOB_UNKNOWN
    text = await (await client.get("/metrics")).text()
    assert 'pullthrough_pushes_total{kind="blob",result="ok"} 2.0' in text
    assert 'pullthrough_pushes_total{kind="manifest",result="ok"} 1.0' in text
    assert 'pullthrough_pushes_total{kind="manifest",result="invalid"} 1.0' in text
    assert f"pullthrough_pushed_bytes_total {float(len(config) + len(layer))}" in text
    # On disk: a manifest's file also records its media type.
    layout = Layout(tmp_path / "cache")
    files = [layout.blob(Digest.parse(digest_of(b))) for b in (config, layer)]
    files.append(layout.manifest(Digest.parse(digest_of(manifest))))
    stored = sum(f.stat().st_size for f in files)
    assert f"pullthrough_hosted_size_bytes {float(stored)}" in text
    assert 'pullthrough_hosted_objects{kind="blob"} 2.0' in text
    assert 'pullthrough_hosted_objects{kind="manifest"} 1.0' in text
    assert "pullthrough_hosted_repositories 1.0" in text
    summary = summarize(text)
    assert "pushes        2 blobs" in summary
    assert "1 invalid" in summary
    assert "hosted        " in summary


async def test_chunked_upload_with_status_and_resume_after_a_rejected_chunk(
    aiohttp_client: Any, tmp_path: Path, upstream: Registry
) -> None:
    client = await hosted_app(aiohttp_client, tmp_path, upstream)
    data = bytes(range(256)) * 4096  # 1 MiB
    parts = [data[:300_000], data[300_000:700_000], data[700_000:]]
    resp = await client.post("/v2/golden/base/blobs/uploads/")
    location = resp.headers["Location"]
    assert resp.headers["Range"] == "0-0"
    resp = await client.patch(
        location,
        data=parts[0],
        headers={
            "Content-Range": f"0-{len(parts[0]) - 1}",
            "Content-Type": "application/octet-stream",
        },
    )
    assert resp.status == 202
    assert resp.headers["Range"] == f"0-{len(parts[0]) - 1}"
    # A chunk that skips ahead (as after a lost response) is refused with where
    # the upload really ends; the client resumes from there.
    resp = await client.patch(
        location, data=parts[2], headers={"Content-Range": f"700000-{len(data) - 1}"}
    )
    assert resp.status == 416
    assert await error_code(resp) == "BLOB_UPLOAD_INVALID"
    status = await client.get(location)
    assert status.status == 204
    end = int(status.headers["Range"].split("-")[1]) + 1
    assert end == len(parts[0])
    resp = await client.patch(location, data=parts[1], headers={"Content-Range": f"{end}-699999"})
    assert resp.status == 202
    # The last chunk comes with the closing PUT.
    resp = await client.put(
        f"{location}?digest={digest_of(data)}",
        data=parts[2],
        headers={"Content-Range": f"700000-{len(data) - 1}"},
    )
    assert resp.status == 201, await resp.text()
    resp = await client.get(f"/v2/golden/base/blobs/{digest_of(data)}")
    assert await resp.read() == data
    resp = await client.get(location)
    assert resp.status == 404
    assert await error_code(resp) == "BLOB_UPLOAD_UNKNOWN"


async def test_streamed_patch_without_content_range(
    aiohttp_client: Any, tmp_path: Path, upstream: Registry
) -> None:
    client = await hosted_app(aiohttp_client, tmp_path, upstream)
    data = b"x" * 200_000

    async def chunks() -> Any:
        for i in range(0, len(data), 50_000):
            yield data[i : i + 50_000]

    resp = await client.post("/v2/myorg/s/blobs/uploads/")
    location = resp.headers["Location"]
    resp = await client.patch(location, data=chunks())
    assert resp.status == 202
    resp = await client.put(f"{location}?digest={digest_of(data)}")
    assert resp.status == 201


async def test_push_errors_answer_with_oci_codes(
    aiohttp_client: Any, tmp_path: Path, upstream: Registry
) -> None:
    client = await hosted_app(aiohttp_client, tmp_path, upstream, max_upload_size=1000)
    resp = await client.post(f"/v2/myorg/e/blobs/uploads/?digest={digest_of(b'a')}", data=b"b")
    assert resp.status == 400
    assert await error_code(resp) == "DIGEST_INVALID"
    resp = await client.post(
        f"/v2/myorg/e/blobs/uploads/?digest={digest_of(b'a' * 2000)}", data=b"a" * 2000
    )
    assert resp.status == 413
    assert await error_code(resp) == "SIZE_INVALID"
    assert not list((tmp_path / "cache" / "uploads").iterdir())  # nothing left behind
    resp = await client.patch("/v2/myorg/e/blobs/uploads/" + "0" * 32, data=b"x")
    assert resp.status == 404
    assert await error_code(resp) == "BLOB_UPLOAD_UNKNOWN"
    resp = await client.get("/v2/myorg/e/blobs/uploads/../../etc")
    assert resp.status in (400, 404)
    config = await push_blob(client, "myorg/e", b"{}")
    assert config
    missing = image_manifest(b"{}", [b"never pushed"])
    resp = await push_manifest(client, "myorg/e", "v1", missing)
    assert resp.status == 400
    assert await error_code(resp) == "MANIFEST_BLOB_UNKNOWN"
    for hostile in (b"not json", b"[" * 100_000):  # the second: too deep for json.loads
        resp = await push_manifest(client, "myorg/e", "v1", hostile)
        assert resp.status == 400
        assert await error_code(resp) == "MANIFEST_INVALID"
    resp = await client.put(
        "/v2/myorg/e/manifests/v1",
        data=image_manifest(b"{}", []),
        headers={"Content-Type": "text/plain"},
    )
    assert await error_code(resp) == "MANIFEST_INVALID"
    good = image_manifest(b"{}", [])
    resp = await push_manifest(client, "myorg/e", digest_of(b"other"), good)
    assert resp.status == 400
    assert await error_code(resp) == "DIGEST_INVALID"
    resp = await push_manifest(client, "myorg/e", "bad tag!", good)
    assert resp.status == 400
    # Pushes outside the hosted prefixes: the mirror stays read-only there.
    resp = await client.post("/v2/library/alpine/blobs/uploads/")
    assert resp.status == 405
    assert await error_code(resp) == "UNSUPPORTED"


async def test_tags_and_catalog_paginate(
    aiohttp_client: Any, tmp_path: Path, upstream: Registry
) -> None:
    client = await hosted_app(aiohttp_client, tmp_path, upstream)
    await push_blob(client, "myorg/t", b"{}")
    for tag in ("c", "a", "b", "d"):
        resp = await push_manifest(client, "myorg/t", tag, image_manifest(b"{}", []))
        assert resp.status == 201
    for name in ("golden/x", "myorg/a/b"):
        await push_blob(client, name, b"{}")
    resp = await client.get("/v2/myorg/t/tags/list")
    assert await resp.json() == {"name": "myorg/t", "tags": ["a", "b", "c", "d"]}
    resp = await client.get("/v2/myorg/t/tags/list?n=2")
    assert (await resp.json())["tags"] == ["a", "b"]
    assert resp.headers["Link"] == '</v2/myorg/t/tags/list?n=2&last=b>; rel="next"'
    resp = await client.get("/v2/myorg/t/tags/list?n=2&last=b")
    assert (await resp.json())["tags"] == ["c", "d"]
    assert "Link" not in resp.headers
    resp = await client.get("/v2/myorg/none/tags/list")
    assert resp.status == 404
    assert await error_code(resp) == "NAME_UNKNOWN"
    resp = await client.get("/v2/_catalog")
    assert (await resp.json())["repositories"] == ["golden/x", "myorg/a/b", "myorg/t"]
    resp = await client.get("/v2/_catalog?n=1&last=golden/x")
    assert (await resp.json())["repositories"] == ["myorg/a/b"]
    assert "last=myorg/a/b" in resp.headers["Link"]


async def test_cross_repository_mount(
    aiohttp_client: Any, tmp_path: Path, upstream: Registry
) -> None:
    client = await hosted_app(aiohttp_client, tmp_path, upstream)
    layer = b"shared layer"
    digest = await push_blob(client, "myorg/one", layer)
    resp = await client.post(f"/v2/myorg/two/blobs/uploads/?mount={digest}&from=myorg/one")
    assert resp.status == 201
    assert resp.headers["Location"] == f"/v2/myorg/two/blobs/{digest}"
    assert await (await client.get(f"/v2/myorg/two/blobs/{digest}")).read() == layer
    # Not in the source: an upload session instead, as the spec says.
    resp = await client.post(f"/v2/myorg/three/blobs/uploads/?mount={digest}&from=myorg/none")
    assert resp.status == 202
    blobs = [p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 1  # one copy in the shared store


async def test_delete_is_off_unless_enabled(
    aiohttp_client: Any, tmp_path: Path, upstream: Registry
) -> None:
    client = await hosted_app(aiohttp_client, tmp_path / "off", upstream)
    await push_blob(client, "myorg/d", b"{}")
    manifest = image_manifest(b"{}", [])
    await push_manifest(client, "myorg/d", "v1", manifest)
    resp = await client.delete(f"/v2/myorg/d/manifests/{digest_of(manifest)}")
    assert resp.status == 405
    assert await error_code(resp) == "UNSUPPORTED"

    client = await hosted_app(aiohttp_client, tmp_path / "on", upstream, delete_enabled=True)
    await push_blob(client, "myorg/d", b"{}")
    await push_manifest(client, "myorg/d", "v1", manifest)
    await push_manifest(client, "myorg/d", "v2", manifest)
    resp = await client.delete("/v2/myorg/d/manifests/v2")  # a tag
    assert resp.status == 202
    assert (await (await client.get("/v2/myorg/d/tags/list")).json())["tags"] == ["v1"]
    resp = await client.delete(f"/v2/myorg/d/manifests/{digest_of(manifest)}")
    assert resp.status == 202
    assert (await client.get(f"/v2/myorg/d/manifests/{digest_of(manifest)}")).status == 404
    assert (await (await client.get("/v2/myorg/d/tags/list")).json())["tags"] == []
    resp = await client.delete(f"/v2/myorg/d/blobs/{digest_of(b'{}')}")
    assert resp.status == 202
    assert (await client.get(f"/v2/myorg/d/blobs/{digest_of(b'{}')}")).status == 404
    resp = await client.delete(f"/v2/myorg/d/blobs/{digest_of(b'{}')}")
    assert resp.status == 404


async def test_referrers_with_artifact_type_filter(
    aiohttp_client: Any, tmp_path: Path, upstream: Registry
) -> None:
    client = await hosted_app(aiohttp_client, tmp_path, upstream)
    await push_blob(client, "myorg/r", b"{}")
    subject = image_manifest(b"{}", [])
    await push_manifest(client, "myorg/r", "v1", subject)
    empty = b"{}"
    signature, sbom = b"signature", b"sbom"
    for blob in (signature, sbom):
        await push_blob(client, "myorg/r", blob)
    referrers = {}
    for kind, blob in (("application/vnd.example.sig", signature), ("application/spdx+json", sbom)):
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": kind,
            "config": descriptor(empty, EMPTY_CONFIG),
            "layers": [descriptor(blob, "application/octet-stream")],
            "subject": descriptor(subject, OCI_MANIFEST),
            "annotations": {"org.example": kind},
        }
        data = json.dumps(doc).encode()
        resp = await push_manifest(client, "myorg/r", digest_of(data), data)
        assert resp.status == 201, await resp.text()
        assert resp.headers["OCI-Subject"] == digest_of(subject)
        referrers[kind] = digest_of(data)
    resp = await client.get(f"/v2/myorg/r/referrers/{digest_of(subject)}")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == OCI_INDEX
    index = await resp.json()
    assert {m["digest"] for m in index["manifests"]} == set(referrers.values())
    assert {m["artifactType"] for m in index["manifests"]} == set(referrers)
    resp = await client.get(
        f"/v2/myorg/r/referrers/{digest_of(subject)}?artifactType=application/spdx%2Bjson"
    )
    assert resp.headers["OCI-Filters-Applied"] == "artifactType"
    index = await resp.json()
    assert [m["digest"] for m in index["manifests"]] == [referrers["application/spdx+json"]]
    resp = await client.get(f"/v2/myorg/r/referrers/{digest_of(b'nothing')}")
    assert (await resp.json())["manifests"] == []


async def test_concurrent_pushes_sharing_layers(
    aiohttp_client: Any, tmp_path: Path, upstream: Registry
) -> None:
    client = await hosted_app(aiohttp_client, tmp_path, upstream)
    shared = [bytes([i]) * 300_000 for i in range(3)]

    async def push(i: int) -> None:
        own = f"own {i}".encode()
        for layer in (*shared, own, b"{}"):
            await push_blob(client, f"myorg/c{i}", layer)
        resp = await push_manifest(
            client, f"myorg/c{i}", "v1", image_manifest(b"{}", [*shared, own])
        )
        assert resp.status == 201

    await asyncio.gather(*(push(i) for i in range(8)))
    for i in range(8):
        resp = await client.get(f"/v2/myorg/c{i}/blobs/{digest_of(shared[0])}")
        assert await resp.read() == shared[0]
    blobs = [p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 3 + 8 + 1
    hosted: Hosted = client.app[HOSTED_KEY]
    assert not list(hosted.uploads.folder.iterdir())


async def test_pushes_only_from_loopback_without_users(
    aiohttp_client: Any, tmp_path: Path, upstream: Registry
) -> None:
    client = await hosted_app(aiohttp_client, tmp_path, upstream, trusted_proxies=("127.0.0.1/32",))
    remote = {"X-Forwarded-For": "192.0.2.7"}
    resp = await client.post("/v2/myorg/p/blobs/uploads/", headers=remote)
    assert resp.status == 403
    assert await error_code(resp) == "DENIED"
    resp = await client.post("/v2/myorg/p/blobs/uploads/")
    assert resp.status == 202
    client = await hosted_app(
        aiohttp_client,
        tmp_path / "open",
        upstream,
        trusted_proxies=("127.0.0.1/32",),
        open_push=True,
    )
    resp = await client.post("/v2/myorg/p/blobs/uploads/", headers=remote)
    assert resp.status == 202


@pytest.mark.parametrize("who", ["anonymous", "reader", "writer"])
async def test_push_needs_the_push_right(
    aiohttp_client: Any, tmp_path: Path, upstream: Registry, who: str
) -> None:
    users = tmp_path / "htpasswd"
    users.write_text(htpasswd_line("reader", "r-pass") + htpasswd_line("writer", "w-pass"))
    rules = (AccessRule(upstream="hosted", repository="myorg/*", pull=("*",), push=("writer",)),)
    client = await hosted_app(aiohttp_client, tmp_path, upstream, htpasswd=users, access=rules)
    auth = {}
    if who != "anonymous":
        basic = base64.b64encode(f"{who}:{who[0]}-pass".encode()).decode()
        resp = await client.get("/token", headers={"Authorization": f"Basic {basic}"})
        auth = {"Authorization": f"Bearer {(await resp.json())['token']}"}
    resp = await client.post(
        f"/v2/myorg/x/blobs/uploads/?digest={digest_of(b'z')}", data=b"z", headers=auth
    )
    expected = {"anonymous": 401, "reader": 403, "writer": 201}[who]
    assert resp.status == expected, await resp.text()
    if who == "anonymous":
        assert "push" in resp.headers["WWW-Authenticate"]


async def test_an_upload_cut_off_midway_resumes_where_its_bytes_end(
    aiohttp_client: Any, tmp_path: Path, upstream: Registry
) -> None:
    client = await hosted_app(aiohttp_client, tmp_path, upstream)
    data = bytes(range(256)) * 2048  # 512 KiB
    resp = await client.post("/v2/myorg/cut/blobs/uploads/")
    location = resp.headers["Location"]
    # A client whose connection ends after 200 000 of the bytes it announced.
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    head = (
        f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
        f"Content-Range: 0-{len(data) - 1}\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    writer.write(head.encode() + data[:200_000])
    writer.write_eof()
    await reader.read()  # the server is done with the connection
    writer.close()
    deadline = time.monotonic() + 5
    while True:  # the handler keeps what came as it unwinds, just after the close
        status = await client.get(location)
        assert status.status == 204
        end = int(status.headers["Range"].split("-")[1]) + 1
        if end == 200_000 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    assert end == 200_000
    resp = await client.patch(
        location, data=data[end:], headers={"Content-Range": f"{end}-{len(data) - 1}"}
    )
    assert resp.status == 202
    resp = await client.put(f"{location}?digest={digest_of(data)}")
    assert resp.status == 201, await resp.text()
    assert await (await client.get(f"/v2/myorg/cut/blobs/{digest_of(data)}")).read() == data


async def test_eviction_keeps_hosted_content(
    aiohttp_client: Any, tmp_path: Path, upstream: Registry
) -> None:
    client = await hosted_app(aiohttp_client, tmp_path, upstream)
    image = upstream.images["library/alpine:3.19"]
    layer = image.layers_of(image.for_platform())[0]
    resp = await client.get(f"/v2/library/alpine/blobs/{layer.digest}")  # cached from upstream
    assert await resp.read() == layer.data
    pushed = b"the only copy" * 10_000
    await push_blob(client, "myorg/keep", pushed)
    await client.close()
    cache = tmp_path / "cache"
    long_ago = time.time() - 7200
    files = [p for p in cache.rglob("*") if p.is_file() and ("blobs" in p.parts)]
    for path in files:
        os.utime(path, (long_ago, long_ago))
    cached = cache / "blobs" / "sha256" / layer.digest[7:9] / layer.digest[7:]
    kept = cache / "blobs" / "sha256" / digest_of(pushed)[7:9] / digest_of(pushed)[7:]
    assert cached.exists()
    assert kept.exists()
    # A cap of one byte: the start-up pass removes all it may.
    client = await hosted_app(aiohttp_client, tmp_path, upstream, max_size=1)
    for _ in range(250):
        if not cached.exists():
            break
        await asyncio.sleep(0.02)
    assert not cached.exists()
    assert kept.exists()
    assert await (await client.get(f"/v2/myorg/keep/blobs/{digest_of(pushed)}")).read() == pushed


async def test_a_full_disk_answers_507_and_the_upload_resumes(
    aiohttp_client: Any, tmp_path: Path, upstream: Registry
) -> None:
    with tmpfs(tmp_path / "disk", "8m") as disk:
        settings = settings_for(disk / "cache", upstream.url, hosted=("myorg/",), scrub_rate=0)
        client: Client = await aiohttp_client(create_app(settings))
        data = bytes(range(256)) * (24 * 1024)  # 6 MiB
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * (4 << 20))
        resp = await client.post("/v2/myorg/full/blobs/uploads/")
        location = resp.headers["Location"]
        resp = await client.patch(location, data=io.BytesIO(data))
        assert resp.status == 507
        assert await error_code(resp) == "UNAVAILABLE"
        ballast.unlink()
        status = await client.get(location)
        end = int(status.headers["Range"].split("-")[1]) + 1
        assert 0 < end < len(data)
        resp = await client.put(
            f"{location}?digest={digest_of(data)}",
            data=io.BytesIO(data[end:]),
            headers={"Content-Range": f"{end}-{len(data) - 1}"},
        )
        assert resp.status == 201, await resp.text()
        await client.close()


async def test_gc_while_pushes_run_never_takes_what_a_manifest_needs(
    aiohttp_client: Any, tmp_path: Path, upstream: Registry
) -> None:
    client = await hosted_app(aiohttp_client, tmp_path, upstream, delete_enabled=True)
    hosted: Hosted = client.app[HOSTED_KEY]
    shared = [bytes([i]) * 100_000 for i in range(4)]
    orphan = b"pushed, never used by a manifest"
    # Old links no manifest references: what a collection may take. The shared
    # layers among them are pushed again below, concurrently with collections.
    for layer in (*shared, orphan):
        await push_blob(client, "myorg/old", layer)
    long_ago = time.time() - 7200
    for path in (tmp_path / "cache" / "hosted" / "myorg" / "old" / "_blobs").rglob("*"):
        os.utime(path, (long_ago, long_ago))

    done = asyncio.Event()
    passes = []

    async def collect() -> None:
        while not done.is_set():
            passes.append(await hosted.collect(grace=30.0))
            await asyncio.sleep(0)

    async def push(i: int) -> None:
        for round_ in range(3):
            own = f"own {i} {round_}".encode()
            for layer in (*shared, own, b"{}"):
                await push_blob(client, f"myorg/p{i}", layer)
            manifest = image_manifest(b"{}", [*shared, own])
            resp = await push_manifest(client, f"myorg/p{i}", f"r{round_}", manifest)
            assert resp.status == 201, await resp.text()

    collector = asyncio.create_task(collect())
    await asyncio.gather(*(push(i) for i in range(6)))
    done.set()
    await collector
    assert passes
    for i in range(6):
        for layer in shared:
            resp = await client.get(f"/v2/myorg/p{i}/blobs/{digest_of(layer)}")
            assert await resp.read() == layer
    removed = {str(d) for p in passes for d in p.removed}
    # The orphan goes; a shared layer only if a pass came before any push
    # linked it again (then it was pushed anew, and is served above).
    assert digest_of(orphan) in removed
    assert removed <= {digest_of(layer) for layer in (*shared, orphan)}
    # Deleting the manifests of one repository frees what only they used.
    for round_ in range(3):
        resp = await client.get(f"/v2/myorg/p0/manifests/r{round_}")
        digest = resp.headers["Docker-Content-Digest"]
        assert (await client.delete(f"/v2/myorg/p0/manifests/{digest}")).status == 202
    result = await hosted.collect(grace=0.0)
    assert {str(d) for d in result.removed} == {digest_of(f"own 0 {r}".encode()) for r in range(3)}
    assert result.kept >= len(shared) + 1  # still used by the other repositories
    print(
        f"gc during pushes: {len(passes)} passes removed {len(removed)} blob(s); "
        f"after deletes: removed {len(result.removed)}, kept {result.kept}"
    )

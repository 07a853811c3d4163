"""Real clients push to hosted repositories and pull back what they pushed:
skopeo, podman, and docker through dockerd."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pullthrough.cache.digests import Digest
from pullthrough.cache.layout import Layout
from pullthrough.proxy.console import human
from tests.integration import test_clients
from tests.integration.test_clients import (
    ALPINE,
    PLATFORM,
    podman_sandbox,
    require_root,
    run,
    start_dockerd,
)
from tests.integration.test_metrics import scrape, value
from tests.support import httpclient
from tests.support.binaries import require_binary
from tests.support.mirror import MirrorProcess, run_cli
from tests.support.registry import Registry
from tests.support.skopeo import Skopeo, dir_blob_digests, dir_manifest

# test_clients' fixture: daemon sockets under a short path, mounts cleaned up.
short_dir = test_clients.short_dir

HOSTED = {"PULLTHROUGH_HOSTED": "myorg/,golden/", "PULLTHROUGH_DELETE_ENABLED": "true"}


@pytest.fixture
def mirror(upstream: Registry, tmp_path: Path) -> Iterator[MirrorProcess]:
    # Two workers: an upload's chunks may land on either.
    process = MirrorProcess(tmp_path / "cache", upstream.url, workers=2, env=HOSTED)
    try:
        process.start()
        yield process
    finally:
        process.stop()


def host(mirror: MirrorProcess) -> str:
    return mirror.url.removeprefix("http://")


def test_skopeo_copies_into_a_hosted_repository_and_back_out(
    upstream: Registry, mirror: MirrorProcess, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    image = upstream.images[ALPINE]  # an index with several platforms
    source = f"docker://{upstream.host}/{image.ref}"
    skopeo_cli.copy(source, f"docker://{host(mirror)}/golden/alpine:3.19", all_images=True)
    mark = upstream.mark()
    out = tmp_path / "out"
    skopeo_cli.copy(f"docker://{host(mirror)}/golden/alpine:3.19", f"dir:{out}", all_images=True)
    assert upstream.requests_since(mark) == []  # hosted pulls never go upstream
    assert dir_manifest(out) == image.top.data
    assert dir_blob_digests(out) >= {b.digest for b in image.blobs}
    raw = skopeo_cli.inspect_raw(f"docker://{host(mirror)}/golden/alpine@{image.digest}")
    assert raw == image.top.data
    listing = json.loads(httpclient.request("GET", f"{mirror.url}/v2/_catalog").body)
    assert listing == {"repositories": ["golden/alpine"]}


def test_a_skopeo_push_is_counted_and_the_hosted_storage_measured(
    upstream: Registry, mirror: MirrorProcess, skopeo_cli: Skopeo
) -> None:
    image = upstream.images[ALPINE]  # an index: two platforms sharing a layer
    skopeo_cli.copy(
        f"docker://{upstream.host}/{image.ref}",
        f"docker://{host(mirror)}/golden/alpine:3.19",
        all_images=True,
    )
    # The same image again, to a second repository: its blobs are stored once.
    skopeo_cli.copy(
        f"docker://{host(mirror)}/golden/alpine:3.19",
        f"docker://{host(mirror)}/myorg/alpine:copy",
        all_images=True,
    )
    samples = scrape(mirror.url)  # two workers: the counts are both of theirs
    manifests = len(image.manifests)
    assert value(samples, "pullthrough_pushes_total", kind="manifest", result="ok") == (
        2 * manifests
    )
    # Each blob uploaded once to the first repository; the second mounts (or
    # uploads again) what is there already.
    uploaded = value(samples, "pullthrough_pushes_total", kind="blob", result="ok")
    mounted = value(samples, "pullthrough_pushes_total", kind="mount", result="ok")
    assert uploaded + mounted == 2 * len(image.blobs)
    blob_bytes = sum(b.size for b in image.blobs)
    assert value(samples, "pullthrough_pushed_bytes_total") >= blob_bytes
    assert value(samples, "pullthrough_hosted_repositories") == 2
    assert value(samples, "pullthrough_hosted_objects", kind="blob") == len(image.blobs)
    assert value(samples, "pullthrough_hosted_objects", kind="manifest") == manifests
    layout = Layout(mirror.cache_dir)
    on_disk = sum(layout.blob(Digest.parse(b.digest)).stat().st_size for b in image.blobs) + sum(
        layout.manifest(Digest.parse(m.digest)).stat().st_size for m in image.manifests
    )
    assert value(samples, "pullthrough_hosted_size_bytes") == on_disk
    stats = run_cli("stats", "--url", mirror.url, cache=mirror.cache_dir, upstream=upstream.url)
    assert stats.returncode == 0, stats.stderr
    out = stats.stdout
    assert f"{manifests * 2} manifests" in out
    assert f"hosted        {human(on_disk)} in 2 repositories" in out


def test_podman_pushes_and_pulls_back(
    upstream: Registry, mirror: MirrorProcess, short_dir: Path, tmp_path: Path
) -> None:
    podman = require_binary("podman")
    require_root("podman")
    image = upstream.images[ALPINE]
    conf, env, podman_ = podman_sandbox(podman, tmp_path, short_dir / "podman")
    common = [
        "--authfile",
        str(conf / "auth.json"),
        "--signature-policy",
        str(conf / "policy.json"),
        "--tls-verify=false",
    ]
    source = f"{upstream.host}/{image.ref}"
    run([*podman_, "pull", "--quiet", "--platform", PLATFORM, *common, source], env)
    target = f"{host(mirror)}/myorg/alpine:v1"
    run([*podman_, "tag", source, target], env)
    run([*podman_, "push", "--quiet", *common, target], env)
    run([*podman_, "rmi", source, target], env)
    run([*podman_, "pull", "--quiet", *common, target], env)
    (info,) = json.loads(run([*podman_, "image", "inspect", target], env))
    config = image.for_platform(PLATFORM).json["config"]["digest"]
    assert f"sha256:{info['Id']}" == config
    tags = json.loads(httpclient.request("GET", f"{mirror.url}/v2/myorg/alpine/tags/list").body)
    assert tags == {"name": "myorg/alpine", "tags": ["v1"]}


def test_docker_push_list_and_delete_the_seeds_exercise(
    upstream: Registry, mirror: MirrorProcess, short_dir: Path, tmp_path: Path
) -> None:
    dockerd = require_binary("dockerd")
    docker = require_binary("docker")
    require_root("dockerd")
    image = upstream.images[ALPINE]
    with contextlib.ExitStack() as stack:
        env = start_dockerd(stack, dockerd, short_dir, tmp_path, {"registry-mirrors": [mirror.url]})
        run([docker, "pull", "--quiet", "--platform", PLATFORM, "alpine:3.19"], env)
        # The seeds' exercise: tag for the local registry, push every tag, list, delete.
        tags = ("v1", "v2")
        for tag in tags:
            target = f"{host(mirror)}/myorg/gallery/ui:{tag}"
            run([docker, "image", "tag", "alpine:3.19", target], env)
            run([docker, "push", "--quiet", target], env)
        listed = httpclient.request("GET", f"{mirror.url}/v2/myorg/gallery/ui/tags/list")
        assert json.loads(listed.body) == {"name": "myorg/gallery/ui", "tags": list(tags)}
        run([docker, "rmi", *(f"{host(mirror)}/myorg/gallery/ui:{t}" for t in tags)], env)
        run([docker, "pull", "--quiet", f"{host(mirror)}/myorg/gallery/ui:v1"], env)
        (info,) = json.loads(
            run([docker, "image", "inspect", f"{host(mirror)}/myorg/gallery/ui:v1"], env)
        )
        assert info["Id"] == image.for_platform(PLATFORM).json["config"]["digest"]
        head = httpclient.request(
            "HEAD",
            f"{mirror.url}/v2/myorg/gallery/ui/manifests/v1",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        )
        digest = head.headers["Docker-Content-Digest"]
        deleted = httpclient.request(
            "DELETE", f"{mirror.url}/v2/myorg/gallery/ui/manifests/{digest}"
        )
        assert deleted.status == 202
        listed = httpclient.request("GET", f"{mirror.url}/v2/myorg/gallery/ui/tags/list")
        assert json.loads(listed.body)["tags"] == []


def test_oras_pushes_an_artifact_with_a_subject_found_through_referrers(
    upstream: Registry, mirror: MirrorProcess, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    oras_provider = pytest.importorskip("oras.provider")
    oras_oci = pytest.importorskip("oras.oci")
    image = upstream.images[ALPINE]
    skopeo_cli.copy(
        f"docker://{upstream.host}/{image.ref}",
        f"docker://{host(mirror)}/golden/alpine:3.19",
        all_images=True,
    )
    signature = tmp_path / "signature.txt"
    signature.write_bytes(b"signed, sealed, delivered\n" * 4096)
    client = oras_provider.Registry(hostname=host(mirror), insecure=True, auth_backend="basic")
    subject = oras_oci.Subject(image.top.media_type, image.digest, image.top.size)
    # Chunked: PATCHes with Content-Range, as oras sends them.
    response = client.push(
        target=f"{host(mirror)}/golden/alpine:signature",
        files=[f"{signature}:application/vnd.example.signature"],
        subject=subject,
        do_chunked=True,
        chunk_size=16384,
        disable_path_validation=True,
        quiet=True,
    )
    assert response.status_code == 201
    pushed = response.headers["Docker-Content-Digest"]
    base = f"{mirror.url}/v2/golden/alpine/referrers/{image.digest}"
    index = httpclient.request("GET", base).json()
    assert [m["digest"] for m in index["manifests"]] == [pushed]
    kind = index["manifests"][0]["artifactType"]
    filtered = httpclient.request("GET", f"{base}?artifactType={kind}").json()
    assert [m["digest"] for m in filtered["manifests"]] == [pushed]
    other = httpclient.request("GET", f"{base}?artifactType=application/x-none").json()
    assert other["manifests"] == []


def test_streamed_chunked_uploads_through_the_server_never_stall(mirror: MirrorProcess) -> None:
    # A chunked PATCH as skopeo streams it. The server's guard sits in front of
    # aiohttp's parser; when the handler falls behind, the parser holds the rest
    # back and resumes through an empty data_received call, which the guard once
    # swallowed: the upload's last bytes stayed parked and the client waited forever.
    data = os.urandom(24 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    for round_ in range(6):
        conn = http.client.HTTPConnection("127.0.0.1", mirror.port, timeout=30)
        conn.request("POST", "/v2/myorg/streamed/blobs/uploads/")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 202
        location = resp.getheader("Location")
        assert location is not None
        pieces = (data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20))
        conn.request("PATCH", location, body=pieces, encode_chunked=True)
        resp = conn.getresponse()  # a stall is a TimeoutError here
        resp.read()
        assert resp.status == 202, round_
        assert resp.getheader("Range") == f"0-{len(data) - 1}"
        conn.request(
            "PUT",
            f"{location}&digest={digest}" if "?" in location else f"{location}?digest={digest}",
        )
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 201
        conn.close()
    got = httpclient.request("GET", f"{mirror.url}/v2/myorg/streamed/blobs/{digest}")
    assert hashlib.sha256(got.body).hexdigest() == digest.removeprefix("sha256:")

"""Several upstreams behind one mirror: routing by ?ns= and by path prefix."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support.faults import FaultRegistry
from tests.support.images import Image, make_image
from tests.support.mirror import MirrorProcess
from tests.support.processes import free_port
from tests.support.registry import Registry, RegistryFactory
from tests.support.skopeo import Skopeo, dir_blob_digests, dir_manifest
from tests.support.tokenserver import ALICE

SAME_NAME = "team/app:1"


class Two:
    def __init__(self, make_registry: RegistryFactory) -> None:
        self.hub_image = make_image("team/app", "1", seed="hub side")
        self.beta_image = make_image("team/app", "1", seed="beta side")
        self.secret = make_image("private/secret", "1", seed="beta secret")
        # "Docker Hub" for this test: anonymous.
        self.hub: Registry = make_registry(seed=[self.hub_image])
        # A private registry: its private/ repositories need alice's credentials.
        self.beta: Registry = make_registry(seed=[self.beta_image, self.secret])


@pytest.fixture
def two(make_registry: RegistryFactory) -> Two:
    return Two(make_registry)


@pytest.fixture
def mirror(two: Two, tmp_path: Path) -> Iterator[MirrorProcess]:
    config = tmp_path / "pullthrough.toml"
    user, password = ALICE
    config.write_text(
        f"""
[upstreams."beta.example"]
url = "{two.beta.url}"
username = "{user}"
password = "{password}"
"""
    )
    process = MirrorProcess(tmp_path / "cache", two.hub.url, config=config)
    process.start()
    yield process
    process.stop()


def pull(skopeo: Skopeo, mirror: MirrorProcess, ref: str, dest: Path) -> None:
    skopeo.copy(f"docker://{mirror.url.removeprefix('http://')}/{ref}", f"dir:{dest}")


def assert_image(dest: Path, image: Image) -> None:
    assert dir_manifest(dest) == image.top.data
    assert dir_blob_digests(dest) == {b.digest for b in image.blobs_of(image.top)}


def test_path_prefix_and_default_route_to_the_right_upstream(
    two: Two, mirror: MirrorProcess, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    hub_mark, beta_mark = two.hub.mark(), two.beta.mark()
    pull(skopeo_cli, mirror, SAME_NAME, tmp_path / "hub")
    pull(skopeo_cli, mirror, f"beta.example/{SAME_NAME}", tmp_path / "beta")
    pull(skopeo_cli, mirror, "beta.example/private/secret:1", tmp_path / "secret")
    assert_image(tmp_path / "hub", two.hub_image)
    assert_image(tmp_path / "beta", two.beta_image)  # same name, the other registry's content
    assert_image(tmp_path / "secret", two.secret)  # with the credentials configured for it

    hub_seen = {e.path.split("/")[3] for e in two.hub.requests_since(hub_mark)}
    beta_seen = {e.path.split("/")[3] for e in two.beta.requests_since(beta_mark)}
    assert hub_seen == {"app"}  # /v2/team/app/...: nothing of beta's reached the hub
    assert beta_seen == {"app", "secret"}


async def test_ns_query_routes_and_is_echoed(two: Two, mirror: MirrorProcess) -> None:
    accept = {"Accept": two.hub_image.top.media_type}
    async with aiohttp.ClientSession() as session:
        for ns, image in (("beta.example", two.beta_image), ("docker.io", two.hub_image)):
            url = f"{mirror.url}/v2/team/app/manifests/1?ns={ns}"
            async with session.get(url, headers=accept) as resp:
                assert resp.status == 200
                assert resp.headers["OCI-Namespace"] == ns
                assert resp.headers["Docker-Content-Digest"] == image.digest
                assert await resp.read() == image.top.data


async def test_unconfigured_hosts_are_refused_without_an_outbound_connection(
    two: Two, tmp_path: Path
) -> None:
    # A live registry the mirror is not configured for: it must never be contacted.
    bystander = FaultRegistry()
    runner = web.AppRunner(bystander.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    mirror = MirrorProcess(tmp_path / "cache", two.hub.url)
    await asyncio.to_thread(mirror.start)
    try:
        hub_mark = two.hub.mark()
        async with aiohttp.ClientSession() as session:
            for path in (
                f"/v2/127.0.0.1:{port}/team/app/manifests/1",
                f"/v2/team/app/manifests/1?ns=127.0.0.1:{port}",
                "/v2/evil.example/team/app/manifests/1",
                "/v2/team/app/blobs/sha256:" + "a" * 64 + "?ns=quay.io",
            ):
                async with session.get(mirror.url + path) as resp:
                    assert resp.status == 404, path
                    error = (await resp.json())["errors"][0]
                    assert error["code"] == "NAME_UNKNOWN", path
                    assert "not configured" in error["message"]
        assert bystander.seen == []
        assert two.hub.requests_since(hub_mark) == []
    finally:
        mirror.stop()
        await runner.cleanup()


async def test_private_content_is_not_answered_under_another_upstream(
    two: Two, mirror: MirrorProcess
) -> None:
    secret_layer = two.secret.layers_of(two.secret.top)[0]
    async with aiohttp.ClientSession() as session:
        url = f"{mirror.url}/v2/beta.example/private/secret/blobs/{secret_layer.digest}"
        async with session.get(url) as resp:
            assert resp.status == 200
            assert await resp.read() == secret_layer.data
        # Cached now; but asking the hub side for that digest must not reveal it.
        url = f"{mirror.url}/v2/team/app/blobs/{secret_layer.digest}"
        async with session.get(url) as resp:
            assert resp.status == 404
            assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"

"""The test-support layer is real: a token-auth distribution registry, seeded."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import aiohttp
import pytest

from tests.support.binaries import REQUIRE_ENV, require_binary
from tests.support.httpclient import Response, parse_challenge, request
from tests.support.images import (
    ACCEPT_ALL_MANIFESTS,
    ALPINE,
    ATTESTATION_REF_DIGEST,
    ATTESTATION_REF_TYPE,
    BIG,
    BIG_LAYER_SIZE,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    HELLO,
    IN_TOTO,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    OCIAPP,
    SECRET,
    Image,
    make_image,
    sha256_digest,
)
from tests.support.registry import Registry, RegistryFactory
from tests.support.skopeo import Skopeo, dir_blob_digests, dir_manifest
from tests.support.tokenserver import ALICE, TokenRequest

SERVICE = "pullthrough-test"


def get_manifest(
    registry: Registry, name: str, reference: str, token: str | None, method: str = "GET"
) -> Response:
    headers = {"Accept": ACCEPT_ALL_MANIFESTS}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return request(method, f"{registry.url}/v2/{name}/manifests/{reference}", headers=headers)


def pull_token(registry: Registry, name: str, creds: tuple[str, str] | None = None) -> str:
    return registry.tokens.fetch(f"repository:{name}:pull", credentials=creds)


def test_v2_demands_a_bearer_token(upstream: Registry) -> None:
    resp = request("GET", f"{upstream.url}/v2/")
    assert resp.status == 401
    scheme, params = parse_challenge(resp.header("WWW-Authenticate"))
    assert scheme == "bearer"
    assert params == {"realm": f"{upstream.tokens.url}/token", "service": SERVICE}

    token = upstream.tokens.fetch()
    ok = request("GET", f"{upstream.url}/v2/", headers={"Authorization": f"Bearer {token}"})
    assert ok.status == 200


def test_seeded_images_have_the_expected_shapes(upstream: Registry) -> None:
    images = upstream.images
    assert set(images) == {ALPINE, HELLO, OCIAPP, BIG, SECRET}

    alpine = images[ALPINE]
    assert alpine.top.media_type == DOCKER_MANIFEST_LIST
    amd64, arm64 = alpine.for_platform("linux/amd64"), alpine.for_platform("linux/arm64")
    assert amd64.media_type == arm64.media_type == DOCKER_MANIFEST
    assert len(amd64.layer_digests) == len(arm64.layer_digests) == 2
    assert len(set(amd64.layer_digests) & set(arm64.layer_digests)) == 1

    oci = images[OCIAPP]
    assert oci.top.media_type == OCI_INDEX
    app = oci.for_platform("linux/amd64")
    assert app.media_type == OCI_MANIFEST
    assert {oci.blob(d).media_type for d in app.layer_digests} == {OCI_LAYER}
    att_desc = next(
        d for d in oci.top.json["manifests"] if d["platform"]["architecture"] == "unknown"
    )
    assert att_desc["annotations"] == {
        ATTESTATION_REF_TYPE: "attestation-manifest",
        ATTESTATION_REF_DIGEST: app.digest,
    }
    attestation = oci.manifest(att_desc["digest"])
    (statement_blob,) = oci.layers_of(attestation)
    assert statement_blob.media_type == IN_TOTO
    statement = json.loads(statement_blob.data)
    assert statement["subject"][0]["digest"]["sha256"] == app.digest.removeprefix("sha256:")

    (big_layer,) = images[BIG].layers_of(images[BIG].top)
    assert big_layer.size > BIG_LAYER_SIZE  # random data does not compress


@pytest.mark.parametrize("ref", [ALPINE, HELLO, OCIAPP, BIG])
def test_manifest_by_tag_with_anonymous_token(upstream: Registry, ref: str) -> None:
    image = upstream.images[ref]
    token = pull_token(upstream, image.name)
    resp = get_manifest(upstream, image.name, image.tag, token)
    assert resp.status == 200, resp.body
    assert resp.body == image.top.data
    assert resp.header("Docker-Content-Digest") == image.digest
    assert resp.header("Content-Type") == image.top.media_type
    for child in image.children:
        by_digest = get_manifest(upstream, image.name, child.digest, token)
        assert by_digest.status == 200
        assert by_digest.body == child.data


def test_blobs_are_real_layers(upstream: Registry) -> None:
    hello = upstream.images[HELLO]
    token = pull_token(upstream, hello.name)
    config = json.loads(hello.blob(hello.top.config_digest or "").data)
    for blob, diff_id in zip(hello.layers_of(hello.top), config["rootfs"]["diff_ids"], strict=True):
        resp = request(
            "GET",
            f"{upstream.url}/v2/{hello.name}/blobs/{blob.digest}",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert resp.status == 200
        assert sha256_digest(resp.body) == blob.digest
        assert sha256_digest(gzip.decompress(resp.body)) == diff_id


def test_private_repository_needs_alice(upstream: Registry) -> None:
    secret = upstream.images[SECRET]

    anonymous = pull_token(upstream, secret.name)
    assert upstream.tokens.decode(anonymous)["access"] == []
    denied = get_manifest(upstream, secret.name, secret.tag, anonymous)
    assert denied.status == 401
    assert 'error="insufficient_scope"' in denied.header("WWW-Authenticate")

    alices = pull_token(upstream, secret.name, ALICE)
    allowed = get_manifest(upstream, secret.name, secret.tag, alices)
    assert allowed.status == 200
    assert allowed.body == secret.top.data

    rejected_before = upstream.tokens.rejected
    with pytest.raises(PermissionError, match="401"):
        pull_token(upstream, secret.name, ("alice", "not-her-password"))
    assert upstream.tokens.rejected == rejected_before + 1


def test_token_server_counts_requests(upstream: Registry) -> None:
    tokens = upstream.tokens
    mark = tokens.mark()
    pull_token(upstream, "library/hello")
    pull_token(upstream, SECRET.split(":")[0], ALICE)
    assert tokens.requests_since(mark) == [
        TokenRequest("repository:library/hello:pull", None),
        TokenRequest("repository:private/secret:pull", "alice"),
    ]
    assert tokens.count == mark + 2


def test_access_log_records_requests(upstream: Registry) -> None:
    hello = upstream.images[HELLO]
    token = pull_token(upstream, hello.name)
    missing = "sha256:" + "0" * 64
    mark = upstream.mark()
    request("GET", f"{upstream.url}/v2/")
    get_manifest(upstream, hello.name, hello.tag, token)
    get_manifest(upstream, hello.name, hello.digest, token, method="HEAD")
    request(
        "HEAD",
        f"{upstream.url}/v2/{hello.name}/blobs/{missing}",
        headers={"Authorization": f"Bearer {token}"},
    )
    seen = [(e.method, e.path, e.status) for e in upstream.requests_since(mark)]
    assert seen == [
        ("GET", "/v2/", 401),
        ("GET", f"/v2/{hello.name}/manifests/{hello.tag}", 200),
        ("HEAD", f"/v2/{hello.name}/manifests/{hello.digest}", 200),
        ("HEAD", f"/v2/{hello.name}/blobs/{missing}", 404),
    ]


async def test_usable_from_a_per_test_event_loop(upstream: Registry) -> None:
    hello = upstream.images[HELLO]
    async with aiohttp.ClientSession() as session:
        params = {"service": SERVICE, "scope": f"repository:{hello.name}:pull"}
        async with session.get(upstream.tokens.realm, params=params) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["expires_in"] == 300
        assert body["token"] == body["access_token"]
        headers = {"Authorization": f"Bearer {body['token']}", "Accept": DOCKER_MANIFEST}
        url = f"{upstream.url}/v2/{hello.name}/manifests/{hello.tag}"
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 200
            assert await resp.read() == hello.top.data


def test_skopeo_copies_one_platform(upstream: Registry, skopeo_cli: Skopeo, tmp_path: Path) -> None:
    alpine = upstream.images[ALPINE]
    amd64 = alpine.for_platform("linux/amd64")
    dest = tmp_path / "alpine"
    skopeo_cli.copy(f"docker://{upstream.host}/{alpine.ref}", f"dir:{dest}")
    assert sha256_digest(dir_manifest(dest)) == amd64.digest
    assert dir_blob_digests(dest) == set(amd64.references)


@pytest.mark.parametrize("ref", [ALPINE, OCIAPP])
def test_skopeo_copies_all_platforms(
    upstream: Registry, skopeo_cli: Skopeo, tmp_path: Path, ref: str
) -> None:
    image = upstream.images[ref]
    dest = tmp_path / "all"
    skopeo_cli.copy(f"docker://{upstream.host}/{image.ref}", f"dir:{dest}", all_images=True)
    assert sha256_digest(dir_manifest(dest)) == image.digest
    for child in image.children:
        assert sha256_digest(dir_manifest(dest, child.digest)) == child.digest
    assert dir_blob_digests(dest) == {b.digest for b in image.blobs}


def test_skopeo_private_pull_uses_credentials(
    upstream: Registry, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    secret = upstream.images[SECRET]
    src = f"docker://{upstream.host}/{secret.ref}"
    denied = skopeo_cli.copy(src, f"dir:{tmp_path / 'anon'}", check=False)
    assert denied.returncode != 0
    skopeo_cli.copy(src, f"dir:{tmp_path / 'alice'}", src_creds=ALICE)
    assert sha256_digest(dir_manifest(tmp_path / "alice")) == secret.digest


def test_make_image_is_deterministic() -> None:
    a = make_image("test/det", "1", "seed-a", (1000, 2000))
    again = make_image("test/det", "1", "seed-a", (1000, 2000))
    other = make_image("test/det", "1", "seed-b", (1000, 2000))
    assert a == again
    assert a.digest != other.digest
    assert not {b.digest for b in a.blobs} & {b.digest for b in other.blobs}
    config = json.loads(a.blob(a.top.config_digest or "").data)
    diff_ids = [sha256_digest(gzip.decompress(layer.data)) for layer in a.layers_of(a.top)]
    assert config["rootfs"]["diff_ids"] == diff_ids


def test_pushing_a_new_tag_and_moving_it(upstream: Registry) -> None:
    first = make_image("test/moving", "latest", "moving-1")
    second = make_image("test/moving", "latest", "moving-2")
    upstream.push(first)
    token = pull_token(upstream, first.name)
    assert get_manifest(upstream, first.name, "latest", token).body == first.top.data
    upstream.push(second)
    resp = get_manifest(upstream, first.name, "latest", token)
    assert resp.header("Docker-Content-Digest") == second.digest
    assert get_manifest(upstream, first.name, first.digest, token).status == 200


def test_stop_then_start_keeps_port_and_content(make_registry: RegistryFactory) -> None:
    hello = make_image("library/hello", "latest", "restart", (800,))
    registry = make_registry(seed=[hello])
    port, token = registry.port, pull_token(registry, hello.name)

    registry.stop()
    assert not registry.running
    with pytest.raises(ConnectionRefusedError):
        request("GET", f"{registry.url}/v2/", timeout=2)

    registry.start()
    assert registry.port == port
    resp = get_manifest(registry, hello.name, hello.tag, token)
    assert resp.status == 200
    assert resp.body == hello.top.data
    statuses = [
        e.status for e in registry.requests() if e.route == f"/v2/{hello.name}/manifests/latest"
    ]
    assert statuses[-1] == 200  # the access log spans restarts


def test_distribution_as_a_pull_through_peer(
    upstream: Registry, make_registry: RegistryFactory
) -> None:
    peer = make_registry(proxy_remote_url=upstream.url)
    hello: Image = upstream.images[HELLO]
    mark = upstream.mark()
    resp = get_manifest(peer, hello.name, hello.tag, token=None)
    assert resp.status == 200
    assert resp.body == hello.top.data
    assert any(
        e.route == f"/v2/{hello.name}/manifests/{hello.tag}" and e.status == 200
        for e in upstream.requests_since(mark)
    )
    layer = hello.layers_of(hello.top)[0]
    blob = request("GET", f"{peer.url}/v2/{hello.name}/blobs/{layer.digest}")
    assert blob.status == 200
    assert hashlib.sha256(blob.body).hexdigest() == layer.digest.removeprefix("sha256:")


def test_require_binary_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = "pullthrough-no-such-binary"
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=missing):
        require_binary(missing)
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=REQUIRE_ENV):
        require_binary(missing)
    assert Path(require_binary("sh")).is_absolute()

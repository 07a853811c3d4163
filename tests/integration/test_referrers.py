"""Referrers of mirrored images, pulled through and cached: the real upstream
(distribution 2.8, no referrers API: the tag schema) and a fake one with the API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pullthrough.proxy.app import create_app
from tests.support import httpclient
from tests.support.faults import FaultRegistry, digest_of
from tests.support.images import (
    OCI_INDEX,
    OCI_MANIFEST,
    Blob,
    Image,
    Manifest,
    Pusher,
    make_image,
)
from tests.support.mirror import MirrorProcess, settings_for
from tests.support.registry import Registry
from tests.support.tokenserver import PUSHER

Server = Callable[[web.Application], Awaitable[TestServer]]
Client = Callable[..., Awaitable[TestClient[Any, Any]]]

EMPTY = Blob.of(b"{}", "application/vnd.oci.empty.v1+json")
SBOM = "application/spdx+json"
SIGNATURE = "application/vnd.example.signature"


def artifact(subject: Manifest, artifact_type: str, content: bytes) -> tuple[Manifest, Blob]:
    """An OCI 1.1 artifact manifest about ``subject``, as oras and cosign push them."""
    layer = Blob.of(content, artifact_type)
    manifest = Manifest.of(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": EMPTY.descriptor(),
            "layers": [layer.descriptor()],
            "subject": subject.descriptor(),
            "annotations": {"org.example.made-by": "test_referrers"},
        }
    )
    return manifest, layer


def descriptor(manifest: Manifest) -> dict[str, Any]:
    """The entry a referrers index has for an artifact manifest."""
    doc = manifest.json
    # The spec's rule: without an artifactType, the config's media type is it.
    kind = doc.get("artifactType", doc["config"]["mediaType"])
    return manifest.descriptor(artifactType=kind, annotations=doc["annotations"])


def index_of(*manifests: Manifest) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": list(map(descriptor, manifests)),
    }
    return json.dumps(doc).encode()


def schema_tag(digest: str) -> str:
    return digest.replace(":", "-")


# --------------------------------------------------------------------- real upstream


def oras_push(
    upstream: Registry, image: Image, artifact_type: str, content: bytes, tmp_path: Path
) -> Manifest:
    """Push an artifact about ``image`` with oras (the Python client), as it lands."""
    oras_provider = pytest.importorskip("oras.provider")
    oras_oci = pytest.importorskip("oras.oci")
    client = oras_provider.Registry(hostname=upstream.host, insecure=True)
    # oras-py keeps one token for every scope: give it one that may push.
    challenge = httpclient.request("GET", f"{upstream.url}/v2/").header("WWW-Authenticate")
    _, params = httpclient.parse_challenge(challenge)
    token = httpclient.fetch_token(
        params["realm"],
        service=params["service"],
        scopes=[f"repository:{image.name}:pull,push"],
        credentials=PUSHER,
    )
    client.auth.set_token_auth(token)
    name = artifact_type.rsplit("/", 1)[-1]
    (tmp_path / name).write_bytes(content)
    (tmp_path / f"{name}.config").write_bytes(b"{}")
    subject = oras_oci.Subject(image.top.media_type, image.digest, image.top.size)
    pushed = client.push(
        target=f"{upstream.host}/{image.name}:{name.replace('+', '-')}",
        files=[f"{tmp_path / name}:{artifact_type}"],
        manifest_config=f"{tmp_path / name}.config:{artifact_type}",
        manifest_annotations={"org.example.made-by": "test_referrers"},
        subject=subject,
        disable_path_validation=True,
        quiet=True,
    )
    assert pushed.status_code == 201
    digest = pushed.headers["Docker-Content-Digest"]
    url = f"{upstream.url}/v2/{image.name}/manifests/{digest}"
    data: bytes = client.do_request(url, headers={"Accept": OCI_MANIFEST}).content
    assert digest_of(data) == digest
    assert json.loads(data)["subject"]["digest"] == image.digest
    return Manifest(digest, data, OCI_MANIFEST)


def test_referrers_of_a_mirrored_image_come_from_the_upstreams_tag_schema(
    upstream: Registry, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    image = make_image("referred/app", "v1", "referred", (1200,), oci=True)
    upstream.push(image)
    # What oras and cosign do on a registry without the referrers API: push the
    # artifacts (with their subject), then their index under the subject's tag.
    sbom = oras_push(upstream, image, SBOM, b'{"spdxVersion": "SPDX-2.3"}', tmp_path)
    signature = oras_push(upstream, image, SIGNATURE, b"signed\n", tmp_path)
    listing = Manifest.of(json.loads(index_of(sbom, signature)))
    Pusher(upstream.url).push_manifest(image.name, schema_tag(image.digest), listing)

    mirror = MirrorProcess(tmp_path / "cache", upstream.url)
    stop_later.append(mirror)
    mirror.start()
    base = f"{mirror.url}/v2/referred/app/referrers/{image.digest}"
    mark = upstream.mark()
    resp = httpclient.request("GET", base)
    assert resp.status == 200
    assert resp.header("Content-Type") == OCI_INDEX
    assert resp.json()["manifests"] == [descriptor(sbom), descriptor(signature)]
    asked = [(e.method, e.path.rsplit("/", 2)[-2], e.status) for e in upstream.requests_since(mark)]
    assert ("GET", "referrers", 404) in asked  # it has no referrers API
    assert asked[-1] == ("GET", "manifests", 200)  # the tag schema's index

    mark = upstream.mark()
    again = httpclient.request("GET", base)
    assert upstream.requests_since(mark) == []  # within the TTL
    filtered = httpclient.request("GET", f"{base}?artifactType={SBOM}")
    none = httpclient.request("GET", f"{base}?artifactType=application/x-none")
    assert again.body == resp.body
    assert filtered.json()["manifests"] == [descriptor(sbom)]
    assert filtered.header("OCI-Filters-Applied") == "artifactType"
    assert none.json()["manifests"] == []
    # The index came through the tag path: a new filter asks the referrers
    # API again (404), and the tag's index comes from the cache.
    assert [e for e in upstream.requests_since(mark) if "manifests" in e.path] == []

    # The referrers themselves: ordinary manifests, pulled through by digest.
    pulled = httpclient.request(
        "GET",
        f"{mirror.url}/v2/referred/app/manifests/{signature.digest}",
        headers={"Accept": OCI_MANIFEST},
    )
    assert pulled.status == 200
    assert pulled.body == signature.data

    nothing = httpclient.request(
        "GET", f"{mirror.url}/v2/referred/app/referrers/{digest_of(b'no such image')}"
    )
    assert nothing.status == 200
    assert nothing.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


# --------------------------------------------------------------------- fake upstream

SUBJECT = {
    "schemaVersion": 2,
    "mediaType": OCI_MANIFEST,
    "config": EMPTY.descriptor(),
    "layers": [],
}


@pytest.fixture
def fault() -> FaultRegistry:
    registry = FaultRegistry(referrers={})
    registry.add_manifest("1.0", SUBJECT, OCI_MANIFEST)
    return registry


def _subject() -> Manifest:
    data = json.dumps(SUBJECT).encode()
    return Manifest(digest_of(data), data, OCI_MANIFEST)


async def mirror_of(
    fault: FaultRegistry, server: Server, client: Client, cache: Path, **settings: object
) -> TestClient[Any, Any]:
    upstream = await server(fault.app())
    url = str(upstream.make_url("/")).rstrip("/")
    return await client(create_app(settings_for(cache, url, **settings)))


def referrer_requests(fault: FaultRegistry) -> list[str]:
    return [s.path for s in fault.seen if "/referrers/" in s.path]


@pytest.mark.parametrize("filters_applied", [True, False])
async def test_the_upstreams_referrers_api_is_asked_filtered_and_cached(
    filters_applied: bool,
    fault: FaultRegistry,
    aiohttp_server: Server,
    aiohttp_client: Client,
    tmp_path: Path,
) -> None:
    subject = _subject()
    sbom, _ = artifact(subject, SBOM, b"sbom")
    signature, _ = artifact(subject, SIGNATURE, b"sig")
    assert fault.referrers is not None
    fault.referrers[subject.digest] = [index_of(sbom, signature)]
    fault.filters_applied = filters_applied
    mirror = await mirror_of(fault, aiohttp_server, aiohttp_client, tmp_path / "cache")
    base = f"/v2/library/app/referrers/{subject.digest}"

    resp = await mirror.get(f"{base}?artifactType=application/spdx%2Bjson")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == OCI_INDEX
    assert resp.headers["OCI-Filters-Applied"] == "artifactType"
    assert (await resp.json())["manifests"] == [descriptor(sbom)]
    # Passed through: the upstream was asked for the filter.
    assert fault.seen[-1].path.endswith("?artifactType=application/spdx%2Bjson")
    everything = await mirror.get(base)
    assert (await everything.json())["manifests"] == [descriptor(sbom), descriptor(signature)]
    assert "OCI-Filters-Applied" not in everything.headers
    asked = len(referrer_requests(fault))
    assert asked == 2

    # Within the TTL: nothing upstream, also for the filtered answer.
    again = await mirror.get(f"{base}?artifactType={SBOM}")
    assert (await again.json())["manifests"] == [descriptor(sbom)]
    await mirror.get(base)
    assert len(referrer_requests(fault)) == asked
    assert not any("/manifests/" in s.path for s in fault.seen)  # no tag schema needed
    metrics = await (await mirror.get("/metrics")).text()
    assert 'pullthrough_requests_total{kind="referrers",result="miss"} 2.0' in metrics
    assert 'pullthrough_requests_total{kind="referrers",result="hit"} 2.0' in metrics


async def test_concurrent_requests_for_one_subject_share_one_upstream_request(
    fault: FaultRegistry, aiohttp_server: Server, aiohttp_client: Client, tmp_path: Path
) -> None:
    subject = _subject()
    sbom, _ = artifact(subject, SBOM, b"sbom")
    assert fault.referrers is not None
    fault.referrers[subject.digest] = [index_of(sbom)]
    fault.referrers_gate = asyncio.Event()
    mirror = await mirror_of(fault, aiohttp_server, aiohttp_client, tmp_path / "cache")

    async def ask() -> bytes:
        resp = await mirror.get(f"/v2/library/app/referrers/{subject.digest}")
        assert resp.status == 200
        return await resp.read()

    requests = [asyncio.create_task(ask()) for _ in range(20)]
    await fault.referrers_asked.wait()
    await asyncio.sleep(0.3)  # the others reach the mirror meanwhile
    fault.referrers_gate.set()
    bodies = await asyncio.gather(*requests)
    assert {json.loads(b)["manifests"][0]["digest"] for b in bodies} == {sbom.digest}
    # Those that came after the answer found it cached: one request either way.
    assert len(referrer_requests(fault)) == 1
    metrics = await (await mirror.get("/metrics")).text()
    assert 'pullthrough_coalesced_requests_total{kind="referrers"}' in metrics


async def test_pages_of_referrers_are_followed_and_joined(
    fault: FaultRegistry, aiohttp_server: Server, aiohttp_client: Client, tmp_path: Path
) -> None:
    subject = _subject()
    sbom, _ = artifact(subject, SBOM, b"sbom")
    signature, _ = artifact(subject, SIGNATURE, b"sig")
    assert fault.referrers is not None
    fault.referrers[subject.digest] = [index_of(sbom), index_of(signature)]
    mirror = await mirror_of(fault, aiohttp_server, aiohttp_client, tmp_path / "cache")
    resp = await mirror.get(f"/v2/library/app/referrers/{subject.digest}")
    assert (await resp.json())["manifests"] == [descriptor(sbom), descriptor(signature)]
    assert "Link" not in resp.headers
    assert len(referrer_requests(fault)) == 2


async def test_cached_referrers_are_served_offline_and_stale(
    fault: FaultRegistry, aiohttp_server: Server, aiohttp_client: Client, tmp_path: Path
) -> None:
    subject = _subject()
    sbom, _ = artifact(subject, SBOM, b"sbom")
    assert fault.referrers is not None
    fault.referrers[subject.digest] = [index_of(sbom)]
    cache = tmp_path / "cache"
    # tag_ttl=0: every request asks the upstream first.
    mirror = await mirror_of(fault, aiohttp_server, aiohttp_client, cache, tag_ttl=0.0)
    path = f"/v2/library/app/referrers/{subject.digest}"
    first = await mirror.get(path)
    body = await first.read()
    assert json.loads(body)["manifests"] == [descriptor(sbom)]

    fault.mode, fault.status = "status", 503
    stale = await mirror.get(path)
    assert stale.status == 200
    assert await stale.read() == body
    metrics = await (await mirror.get("/metrics")).text()
    assert 'pullthrough_stale_served_total{reason="unavailable"} 1.0' in metrics

    asked = len(fault.seen)
    offline = await mirror_of(fault, aiohttp_server, aiohttp_client, cache, offline=True)
    served = await offline.get(path)
    assert served.status == 200
    assert await served.read() == body
    # Never cached: offline knows of none.
    unknown = await offline.get(f"/v2/library/app/referrers/{digest_of(b'other')}")
    assert (await unknown.json())["manifests"] == []
    assert len(fault.seen) == asked


async def test_without_a_referrers_api_the_tag_schema_then_nothing(
    aiohttp_server: Server, aiohttp_client: Client, tmp_path: Path
) -> None:
    fault = FaultRegistry()  # no referrers API: 404
    subject = _subject()
    sbom, _ = artifact(subject, SBOM, b"sbom")
    fault.add_manifest(schema_tag(subject.digest), json.loads(index_of(sbom)), OCI_INDEX)
    mirror = await mirror_of(fault, aiohttp_server, aiohttp_client, tmp_path / "cache")
    resp = await mirror.get(f"/v2/library/app/referrers/{subject.digest}?artifactType={SBOM}")
    assert (await resp.json())["manifests"] == [descriptor(sbom)]
    asked = [s.path.split("?")[0].rsplit("/", 2)[-2] for s in fault.seen if s.path != "/v2/"]
    assert asked == ["referrers", "manifests"]
    other = digest_of(b"unknown")
    resp = await mirror.get(f"/v2/library/app/referrers/{other}")
    assert resp.status == 200
    assert await resp.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


def _huge() -> bytes:
    entry = {"mediaType": OCI_MANIFEST, "digest": digest_of(b"x"), "size": 1}
    return json.dumps({"manifests": [entry] * 60_000}).encode()  # about 5 MiB


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_huge(), id="over-the-manifest-limit"),
        pytest.param(b"\xff{not json", id="not-json"),
        pytest.param(b'{"manifests": {"a": 1}}', id="not-an-index"),
        pytest.param(b'{"manifests": [{"mediaType": "x", "digest": "y"}]}', id="bad-descriptor"),
        pytest.param(
            json.dumps(
                {"manifests": [{"mediaType": OCI_MANIFEST, "digest": "sha256:../x", "size": 1}]}
            ).encode(),
            id="bad-digest",
        ),
        pytest.param(b"[]", id="a-list"),
        pytest.param(b'{"manifests": ' + b"[" * 100_000, id="nested-too-deeply"),
    ],
)
async def test_a_hostile_referrers_answer_is_a_502_with_an_oci_error(
    body: bytes,
    fault: FaultRegistry,
    aiohttp_server: Server,
    aiohttp_client: Client,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    subject = _subject()
    assert fault.referrers is not None
    fault.referrers[subject.digest] = [body]
    mirror = await mirror_of(fault, aiohttp_server, aiohttp_client, tmp_path / "cache")
    resp = await mirror.get(f"/v2/library/app/referrers/{subject.digest}")
    assert resp.status == 502
    errors = (await resp.json())["errors"]
    assert errors[0]["code"] in ("UNAVAILABLE", "MANIFEST_INVALID")
    assert "Traceback" not in caplog.text


async def test_a_bad_subject_digest_is_a_400(
    fault: FaultRegistry, aiohttp_server: Server, aiohttp_client: Client, tmp_path: Path
) -> None:
    mirror = await mirror_of(fault, aiohttp_server, aiohttp_client, tmp_path / "cache")
    resp = await mirror.get("/v2/library/app/referrers/sha256:nothex")
    assert resp.status == 400
    assert (await resp.json())["errors"][0]["code"] == "DIGEST_INVALID"
    assert referrer_requests(fault) == []

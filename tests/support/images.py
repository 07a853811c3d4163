"""Deterministic, real container images built in Python, and a pusher.

Layers are genuine gzip-compressed tar files whose content comes from
``random.Random(seed)``; configs carry real ``rootfs.diff_ids`` (sha256 of the
uncompressed tar); manifests and indexes reference them by digest. The same
seed always gives the same bytes (and digests) on a given machine.

:func:`seed_images` builds the images the integration tests rely on, and
:func:`push_image` uploads any :class:`Image` to a registry using a push token
obtained from the registry's own ``WWW-Authenticate`` challenge.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tests.support import httpclient
from tests.support.tokenserver import PUSHER

# --------------------------------------------------------------------- media types

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
IN_TOTO = "application/vnd.in-toto+json"

INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
IMAGE_MANIFEST_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
#: An ``Accept`` header value that admits every manifest type used here.
ACCEPT_ALL_MANIFESTS = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST])

ATTESTATION_REF_TYPE = "vnd.docker.reference.type"
ATTESTATION_REF_DIGEST = "vnd.docker.reference.digest"

_EPOCH = 1_704_067_200  # 2024-01-01T00:00:00Z: every mtime in every layer
_CREATED = "2024-01-01T00:00:00Z"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2).encode() + b"\n"


# --------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob (layer or config)."""

    digest: str
    data: bytes
    media_type: str

    @classmethod
    def of(cls, data: bytes, media_type: str) -> Blob:
        return cls(sha256_digest(data), data, media_type)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "size": self.size, "digest": self.digest, **extra}

    def __repr__(self) -> str:  # keep 48 MiB out of assertion messages
        return f"Blob({self.digest[:19]}..., {self.size} bytes, {self.media_type})"


@dataclass(frozen=True)
class Manifest:
    """A manifest or index exactly as pushed (``data`` are the bytes that are hashed)."""

    digest: str
    data: bytes
    media_type: str
    #: ``"os/arch"`` for an image manifest that belongs to an index, else ``None``.
    platform: str | None = None

    @classmethod
    def of(cls, obj: Mapping[str, Any], platform: str | None = None) -> Manifest:
        data = _json_bytes(obj)
        return cls(sha256_digest(data), data, str(obj["mediaType"]), platform)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.data)
        return parsed

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def references(self) -> list[str]:
        """Digests this manifest points at: children for an index, else config + layers."""
        doc = self.json
        if self.is_index:
            return [d["digest"] for d in doc["manifests"]]
        return [doc["config"]["digest"], *(d["digest"] for d in doc["layers"])]

    @property
    def layer_digests(self) -> list[str]:
        return [] if self.is_index else [d["digest"] for d in self.json["layers"]]

    @property
    def config_digest(self) -> str | None:
        return None if self.is_index else str(self.json["config"]["digest"])

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "size": self.size, "digest": self.digest, **extra}


@dataclass(frozen=True)
class Layer:
    """A layer blob and the digest of its uncompressed content (its diff_id)."""

    blob: Blob
    diff_id: str


@dataclass(frozen=True)
class Image:
    """A tagged image: for an index, ``manifests`` lists the children first and the
    top (the index, pushed by tag) last; ``blobs`` holds every blob once."""

    name: str
    tag: str
    manifests: tuple[Manifest, ...]
    blobs: tuple[Blob, ...]
    top: Manifest

    @property
    def ref(self) -> str:
        """``name:tag``."""
        return f"{self.name}:{self.tag}"

    @property
    def digest(self) -> str:
        return self.top.digest

    @property
    def is_index(self) -> bool:
        return self.top.is_index

    @property
    def children(self) -> tuple[Manifest, ...]:
        return tuple(m for m in self.manifests if m.digest != self.top.digest)

    def manifest(self, digest: str) -> Manifest:
        for m in self.manifests:
            if m.digest == digest:
                return m
        raise KeyError(digest)

    def blob(self, digest: str) -> Blob:
        for b in self.blobs:
            if b.digest == digest:
                return b
        raise KeyError(digest)

    def for_platform(self, platform: str = "linux/amd64") -> Manifest:
        """The image manifest for ``os/arch`` (the top itself for a single image)."""
        if not self.is_index:
            return self.top
        for m in self.children:
            if m.platform == platform:
                return m
        raise KeyError(platform)

    def blobs_of(self, manifest: Manifest) -> list[Blob]:
        """Config and layer blobs of an image manifest, in manifest order."""
        return [self.blob(d) for d in manifest.references]

    def layers_of(self, manifest: Manifest) -> list[Blob]:
        return [self.blob(d) for d in manifest.layer_digests]

    def retagged(self, name: str | None = None, tag: str | None = None) -> Image:
        """The same content under another repository name and/or tag."""
        return replace(self, name=name or self.name, tag=tag or self.tag)

    @property
    def total_size(self) -> int:
        return sum(b.size for b in self.blobs) + sum(m.size for m in self.manifests)

    def __repr__(self) -> str:
        return f"Image({self.ref}@{self.digest[:19]}...)"


# --------------------------------------------------------------------- builders


def make_layer(
    seed: int | str,
    size: int = 4096,
    *,
    media_type: str = DOCKER_LAYER,
    compresslevel: int = 6,
) -> Layer:
    """A gzip'ed tar holding a text file and ``size`` random bytes from ``seed``."""
    rng = random.Random(seed)
    payload = rng.randbytes(size)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        _add_dir(tar, "pullthrough")
        _add_file(
            tar, f"pullthrough/{seed}.txt", f"pullthrough test layer, seed {seed!r}\n".encode()
        )
        _add_file(tar, f"pullthrough/{seed}.bin", payload)
    tar_bytes = raw.getvalue()
    compressed = gzip.compress(tar_bytes, compresslevel=compresslevel, mtime=0)
    return Layer(Blob.of(compressed, media_type), sha256_digest(tar_bytes))


def _tarinfo(name: str, kind: bytes, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = mode
    info.mtime = _EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    tar.addfile(_tarinfo(name, tarfile.DIRTYPE, 0, 0o755))


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tarinfo(name, tarfile.REGTYPE, len(data), 0o644), io.BytesIO(data))


def _split_platform(platform: str) -> tuple[str, str]:
    os_, _, arch = platform.partition("/")
    if not os_ or not arch:
        raise ValueError(f"platform must look like 'linux/amd64', got {platform!r}")
    return os_, arch


def build_image_manifest(
    layers: Sequence[Layer],
    *,
    platform: str = "linux/amd64",
    oci: bool = False,
    label: str = "",
    layer_annotations: Sequence[Mapping[str, str]] | None = None,
) -> tuple[Manifest, Blob]:
    """An image manifest for ``layers`` and its config blob."""
    os_, arch = _split_platform(platform)
    config_doc: dict[str, Any] = {
        "architecture": arch,
        "os": os_,
        "created": _CREATED,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"org.pullthrough.test": label} if label else {},
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [
            {"created": _CREATED, "created_by": f"pullthrough test layer {i}"}
            for i in range(len(layers))
        ],
    }
    config = Blob.of(_json_bytes(config_doc), OCI_CONFIG if oci else DOCKER_CONFIG)
    layer_descs = []
    for i, layer in enumerate(layers):
        extra = {}
        if layer_annotations is not None and layer_annotations[i]:
            extra["annotations"] = dict(layer_annotations[i])
        layer_descs.append(layer.blob.descriptor(**extra))
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST if oci else DOCKER_MANIFEST,
        "config": config.descriptor(),
        "layers": layer_descs,
    }
    return Manifest.of(doc, platform=platform), config


def build_index(
    children: Sequence[Manifest],
    *,
    oci: bool = False,
    annotations: Mapping[str, Mapping[str, str]] | None = None,
) -> Manifest:
    """A manifest list (Docker) or image index (OCI) over ``children``, each
    described with its platform; ``annotations`` are keyed by child digest."""
    descs = []
    for child in children:
        if child.platform is None:
            raise ValueError(f"child {child.digest} has no platform")
        os_, arch = _split_platform(child.platform)
        extra: dict[str, Any] = {"platform": {"architecture": arch, "os": os_}}
        if annotations and child.digest in annotations:
            extra["annotations"] = dict(annotations[child.digest])
        descs.append(child.descriptor(**extra))
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX if oci else DOCKER_MANIFEST_LIST,
        "manifests": descs,
    }
    return Manifest.of(doc)


def _unique(blobs: Iterable[Blob]) -> tuple[Blob, ...]:
    seen: dict[str, Blob] = {}
    for blob in blobs:
        seen.setdefault(blob.digest, blob)
    return tuple(seen.values())


def make_image(
    name: str,
    tag: str,
    seed: int | str,
    layer_sizes: Sequence[int] = (4096,),
    *,
    oci: bool = False,
    platform: str = "linux/amd64",
    compresslevel: int = 6,
) -> Image:
    """A single-platform image whose layers are derived from ``seed``.

    Same arguments, same digests; change ``seed`` to get new content (e.g. to
    move a tag).
    """
    layers = [
        make_layer(
            f"{seed}/{i}",
            size,
            media_type=OCI_LAYER if oci else DOCKER_LAYER,
            compresslevel=compresslevel,
        )
        for i, size in enumerate(layer_sizes)
    ]
    manifest, config = build_image_manifest(
        layers, platform=platform, oci=oci, label=f"{name}:{tag} seed={seed}"
    )
    return Image(
        name=name,
        tag=tag,
        manifests=(manifest,),
        blobs=_unique([config, *(layer.blob for layer in layers)]),
        top=manifest,
    )


def make_index_image(
    name: str,
    tag: str,
    images: Sequence[Image],
    *,
    oci: bool = False,
    annotations: Mapping[str, Mapping[str, str]] | None = None,
) -> Image:
    """An index image over the (single-platform) ``images``."""
    children = [img.top for img in images]
    top = build_index(children, oci=oci, annotations=annotations)
    return Image(
        name=name,
        tag=tag,
        manifests=(*children, top),
        blobs=_unique(b for img in images for b in img.blobs),
        top=top,
    )


def make_attestation(name: str, subject: Manifest, *, seed: int | str = 0) -> Image:
    """A buildkit-style attestation manifest (platform unknown/unknown) for ``subject``."""
    purl = f"pkg:docker/{name}?platform={(subject.platform or '').replace('/', '%2F')}"
    statement = {
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://spdx.dev/Document",
        "subject": [
            {
                "name": purl,
                "digest": {"sha256": subject.digest.removeprefix("sha256:")},
            }
        ],
        "predicate": {
            "spdxVersion": "SPDX-2.3",
            "SPDXID": "SPDXRef-DOCUMENT",
            "name": f"sbom-{seed}",
            "packages": [],
        },
    }
    data = _json_bytes(statement)
    layer = Layer(Blob.of(data, IN_TOTO), sha256_digest(data))
    manifest, config = build_image_manifest(
        [layer],
        platform="unknown/unknown",
        oci=True,
        layer_annotations=[{"in-toto.io/predicate-type": "https://spdx.dev/Document"}],
    )
    return Image(name, "", (manifest,), (config, layer.blob), manifest)


# --------------------------------------------------------------------- seeded images

ALPINE = "library/alpine:3.19"
HELLO = "library/hello:latest"
OCIAPP = "library/ociapp:v1"
BIG = "library/big:latest"
SECRET = "private/secret:1"
BIG_LAYER_SIZE = 48 * 1024 * 1024


def _alpine() -> Image:
    base = make_layer("alpine-base", 3000)
    platforms = []
    for arch in ("amd64", "arm64"):
        own = make_layer(f"alpine-{arch}", 2000)
        manifest, config = build_image_manifest(
            [base, own], platform=f"linux/{arch}", label=f"alpine {arch}"
        )
        platforms.append(
            Image("library/alpine", "3.19", (manifest,), (config, base.blob, own.blob), manifest)
        )
    return make_index_image("library/alpine", "3.19", platforms)


def _ociapp() -> Image:
    app = make_image("library/ociapp", "v1", "ociapp", (5000, 1500), oci=True)
    attestation = make_attestation("library/ociapp", app.top, seed="ociapp")
    annotations = {
        attestation.digest: {
            ATTESTATION_REF_TYPE: "attestation-manifest",
            ATTESTATION_REF_DIGEST: app.digest,
        }
    }
    return make_index_image(
        "library/ociapp", "v1", [app, attestation], oci=True, annotations=annotations
    )


@functools.cache
def _seed_images() -> tuple[Image, ...]:
    return (
        _alpine(),
        make_image("library/hello", "latest", "hello", (1500,)),
        _ociapp(),
        make_image("library/big", "latest", "big", (BIG_LAYER_SIZE,), compresslevel=1),
        make_image("private/secret", "1", "secret", (1200,)),
    )


def seed_images() -> dict[str, Image]:
    """The images every upstream is seeded with, by ``"name:tag"`` (built once)."""
    return {img.ref: img for img in _seed_images()}


# --------------------------------------------------------------------- pushing


class PushError(RuntimeError):
    pass


class Pusher:
    """Uploads images to one registry: blobs monolithically (POST then PUT
    ``?digest=``), manifests by digest (children) and by tag (top)."""

    def __init__(self, registry_url: str, *, credentials: tuple[str, str] = PUSHER) -> None:
        self.registry_url = registry_url.rstrip("/")
        self.credentials = credentials
        self._tokens: dict[str, str | None] = {}
        self._challenge: tuple[str, str] | None = None

    def _auth_headers(self, name: str) -> dict[str, str]:
        if name not in self._tokens:
            self._tokens[name] = self._token(name)
        token = self._tokens[name]
        return {} if token is None else {"Authorization": f"Bearer {token}"}

    def _token(self, name: str) -> str | None:
        if self._challenge is None:
            resp = httpclient.request("GET", f"{self.registry_url}/v2/")
            if resp.status == 200:
                return None
            scheme, params = httpclient.parse_challenge(resp.header("WWW-Authenticate"))
            if resp.status != 401 or scheme != "bearer" or "realm" not in params:
                raise PushError(f"unexpected /v2/ answer {resp.status}: {resp.headers}")
            self._challenge = (params["realm"], params.get("service", ""))
        realm, service = self._challenge
        return httpclient.fetch_token(
            realm,
            service=service,
            scopes=[f"repository:{name}:pull,push"],
            credentials=self.credentials,
        )

    def has_blob(self, name: str, digest: str) -> bool:
        resp = httpclient.request(
            "HEAD",
            f"{self.registry_url}/v2/{name}/blobs/{digest}",
            headers=self._auth_headers(name),
        )
        return resp.status == 200

    def push_blob(self, name: str, blob: Blob) -> None:
        if self.has_blob(name, blob.digest):
            return
        auth = self._auth_headers(name)
        start = httpclient.request(
            "POST",
            f"{self.registry_url}/v2/{name}/blobs/uploads/",
            headers={**auth, "Content-Length": "0"},
        )
        if start.status != 202:
            raise PushError(f"starting upload to {name}: {start.status} {start.body!r}")
        location = httpclient.resolve(self.registry_url + "/", start.header("Location"))
        parts = urlsplit(location)
        query = urlencode([*parse_qsl(parts.query), ("digest", blob.digest)])
        done = httpclient.request(
            "PUT",
            urlunsplit(parts._replace(query=query)),
            headers={
                **auth,
                "Content-Type": "application/octet-stream",
                "Content-Length": str(blob.size),
            },
            body=blob.data,
        )
        if done.status != 201:
            raise PushError(f"uploading {blob.digest} to {name}: {done.status} {done.body!r}")

    def push_manifest(self, name: str, reference: str, manifest: Manifest) -> None:
        resp = httpclient.request(
            "PUT",
            f"{self.registry_url}/v2/{name}/manifests/{reference}",
            headers={**self._auth_headers(name), "Content-Type": manifest.media_type},
            body=manifest.data,
        )
        if resp.status != 201:
            raise PushError(f"pushing manifest {name}:{reference}: {resp.status} {resp.body!r}")
        got = resp.header("Docker-Content-Digest")
        if got and got != manifest.digest:
            raise PushError(
                f"registry computed {got} for {name}:{reference}, expected {manifest.digest}"
            )

    def push(self, image: Image) -> None:
        for blob in image.blobs:
            self.push_blob(image.name, blob)
        for child in image.children:
            self.push_manifest(image.name, child.digest, child)
        self.push_manifest(image.name, image.tag, image.top)


def push_image(registry_url: str, image: Image, *, credentials: tuple[str, str] = PUSHER) -> None:
    """Push ``image`` to the registry at ``registry_url`` (blocking)."""
    Pusher(registry_url, credentials=credentials).push(image)


def push_images(
    registry_url: str, images: Iterable[Image], *, credentials: tuple[str, str] = PUSHER
) -> None:
    pusher = Pusher(registry_url, credentials=credentials)
    for image in images:
        pusher.push(image)


async def push_image_async(
    registry_url: str, image: Image, *, credentials: tuple[str, str] = PUSHER
) -> None:
    """:func:`push_image` in a worker thread, for async tests."""
    await asyncio.to_thread(push_image, registry_url, image, credentials=credentials)

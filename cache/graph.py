"""What a manifest points to: child manifests, the config, layers.

Indexes (OCI image index, Docker manifest list) point to manifests; image
manifests point to a config and layers (and, in OCI, maybe a subject). Only
digests that parse are followed, so a hostile manifest cannot name a path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import InvalidDigest
from pullthrough.cache.manifests import StoredManifest


@dataclass(frozen=True, slots=True)
class Descriptor:
    digest: Digest
    media_type: str
    size: int | None
    platform: str | None = None  # "os/arch[/variant]" for children of an index


def _descriptor(raw: object) -> Descriptor | None:
    if not isinstance(raw, dict):
        return None
    try:
        digest = Digest.parse(str(raw.get("digest", "")))
    except InvalidDigest:
        return None
    size = raw.get("size")
    platform = raw.get("platform")
    name = None
    if isinstance(platform, dict):
        parts = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
        name = "/".join(str(p) for p in parts if p)
    return Descriptor(
        digest, str(raw.get("mediaType", "")), size if isinstance(size, int) else None, name
    )


def children(manifest: StoredManifest) -> list[Descriptor]:
    """The manifests an index lists (empty for an image manifest)."""
    doc = _load(manifest.data)
    found = doc.get("manifests") if doc else None
    if not isinstance(found, list):
        return []
    return [d for d in map(_descriptor, found) if d is not None]


def blobs(manifest: StoredManifest) -> list[Descriptor]:
    """The config and layers of an image manifest (empty for an index)."""
    doc = _load(manifest.data)
    if not doc:
        return []
    out = []
    if (config := _descriptor(doc.get("config"))) is not None:
        out.append(config)
    layers = doc.get("layers")
    if isinstance(layers, list):
        out.extend(d for d in map(_descriptor, layers) if d is not None)
    fs_layers = doc.get("fsLayers")  # Docker schema 1
    if isinstance(fs_layers, list):
        for layer in fs_layers:
            if isinstance(layer, dict):
                out.extend(
                    d for d in [_descriptor({"digest": layer.get("blobSum")})] if d is not None
                )
    return out


@dataclass
class Closure:
    """Everything an image needs, as far as the cache can tell."""

    manifests: list[StoredManifest]
    blobs: dict[Digest, int | None]  # digest -> size the manifest declares
    missing_manifests: list[Digest]


def closure(
    top: StoredManifest,
    load: Callable[[Digest], StoredManifest | None],
    *,
    platforms: frozenset[str] | None = None,
) -> Closure:
    """Walk ``top`` down through an index's children to configs and layers.

    ``platforms`` keeps only those children of an index (plus attestations and
    other children without a platform of their own); None keeps all.
    """
    result = Closure([], {}, [])
    seen: set[Digest] = set()

    def visit(manifest: StoredManifest) -> None:
        if manifest.digest in seen:
            return
        seen.add(manifest.digest)
        result.manifests.append(manifest)
        for blob in blobs(manifest):
            result.blobs.setdefault(blob.digest, blob.size)
        for child in children(manifest):
            if platforms is not None and not platform_wanted(child, platforms):
                continue
            loaded = load(child.digest)
            if loaded is None:
                result.missing_manifests.append(child.digest)
            else:
                visit(loaded)

    visit(top)
    return result


def platform_wanted(child: Descriptor, platforms: frozenset[str]) -> bool:
    """Is this child of an index one of ``platforms`` (or platform-less, as
    attestations are)?"""
    if child.platform is None or child.platform.startswith("unknown/"):
        return True  # attestations and the like ride along
    return any(child.platform == p or child.platform.startswith(p + "/") for p in platforms)


def _load(data: bytes) -> dict[str, object] | None:
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None

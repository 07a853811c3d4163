"""Manifest media types: the names registries use, and what a document's shape implies."""

from __future__ import annotations

import re
from typing import Any

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+json"
# Every manifest type above: what the mirror tells apart in Accept.
MANIFESTS = frozenset(
    {OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, DOCKER_V1_SIGNED, DOCKER_V1}
)

# RFC 6838 type/subtype, as registries send them (parameters are never stored).
MEDIA_TYPE = re.compile(
    rb"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)


def is_media_type(value: str) -> bool:
    """True for an RFC 6838 ``type/subtype`` that a manifest record can hold."""
    return value.isascii() and MEDIA_TYPE.fullmatch(value.encode()) is not None


def implied(doc: dict[str, Any]) -> str | None:
    """The media type a manifest without a ``mediaType`` field has, by its shape:
    schema 1 (signed or not), an index, or an image manifest; None when neither."""
    if doc.get("schemaVersion") == 1:
        return DOCKER_V1_SIGNED if "signatures" in doc else DOCKER_V1
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc:
        return OCI_MANIFEST
    return None

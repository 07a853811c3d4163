"""What media type a fetched manifest is stored under, whatever the upstream says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pullthrough.cache.digests import Digest
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore, StoredManifest
from pullthrough.cache.mediatypes import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, is_media_type
from pullthrough.proxy.mirror import manifest_media_type

OCI_DOC = json.dumps({"schemaVersion": 2, "config": {}, "layers": []}).encode()


@pytest.mark.parametrize(
    ("content_type", "data", "expected"),
    [
        (DOCKER_MANIFEST, b"{}", DOCKER_MANIFEST),
        (f"{DOCKER_MANIFEST}; charset=utf-8", b"{}", DOCKER_MANIFEST),
        ("application/json", OCI_DOC, OCI_MANIFEST),
        # Hostile or broken headers fall back to what the document says.
        ("no slash at all", OCI_DOC, OCI_MANIFEST),
        ("a/b/c", OCI_DOC, OCI_MANIFEST),
        ("t\u00e9xt/plain", OCI_DOC, OCI_MANIFEST),
        ("", json.dumps({"mediaType": "bad type", "manifests": []}).encode(), OCI_INDEX),
        ("", json.dumps({"mediaType": OCI_INDEX, "manifests": []}).encode(), OCI_INDEX),
        ("x" * 200 + "/y", b"not json", "application/octet-stream"),
    ],
)
def test_media_type_is_well_formed(content_type: str, data: bytes, expected: str) -> None:
    media_type = manifest_media_type(content_type, data)
    assert media_type == expected
    assert is_media_type(media_type)


def test_what_is_stored_reads_back_intact(tmp_path: Path) -> None:
    """Whatever the upstream declared, the stored record passes the read check."""
    layout = Layout(tmp_path)
    layout.create()
    store = ManifestStore(layout)
    media_type = manifest_media_type("garbage\u2028", OCI_DOC)
    stored = StoredManifest(Digest.of(OCI_DOC), media_type, OCI_DOC)
    store.write(stored)
    assert ManifestStore(layout).read(stored.digest) == stored

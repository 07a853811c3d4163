"""Manifest storage contract: stored only when the bytes hash right, verified on read."""

from __future__ import annotations

import json

import pytest

from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import DigestMismatch
from pullthrough.cache.manifests import StoredManifest
from pullthrough.cache.mediatypes import OCI_MANIFEST
from pullthrough.cache.quarantine import Corrupt
from tests.contract.conftest import Backend

DATA = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
MANIFEST = StoredManifest(Digest.of(DATA, "sha256"), OCI_MANIFEST, DATA)


async def test_a_manifest_comes_back_as_it_was_put(backend: Backend) -> None:
    store = backend.manifests()
    assert await store.get(MANIFEST.digest) is None
    await store.put(MANIFEST)
    assert await store.get(MANIFEST.digest) == MANIFEST
    # Another handle (another worker) reads it from storage, verified.
    other = backend.manifests()
    assert other.read(MANIFEST.digest) == MANIFEST
    assert other.check(MANIFEST.digest) == MANIFEST


async def test_bytes_that_do_not_hash_to_the_digest_are_refused(backend: Backend) -> None:
    store = backend.manifests()
    wrong = StoredManifest(MANIFEST.digest, OCI_MANIFEST, DATA + b" ")
    with pytest.raises(DigestMismatch):
        await store.put(wrong)
    assert await store.get(MANIFEST.digest) is None
    assert backend.manifests().read(MANIFEST.digest) is None


async def test_a_rotten_manifest_is_reported_set_aside_and_can_be_stored_again(
    backend: Backend,
) -> None:
    await backend.manifests().put(MANIFEST)
    backend.rot_manifest(MANIFEST.digest)
    store = backend.manifests()
    found = store.check(MANIFEST.digest, log=False)
    assert isinstance(found, Corrupt)
    assert (found.kind, found.digest) == ("manifest", MANIFEST.digest)
    # Set aside: absent from now on, never served.
    assert store.check(MANIFEST.digest) is None
    assert await backend.manifests().get(MANIFEST.digest) is None
    await store.put(MANIFEST)
    assert backend.manifests().read(MANIFEST.digest) == MANIFEST


async def test_a_rotten_manifest_is_absent_to_get(backend: Backend) -> None:
    await backend.manifests().put(MANIFEST)
    backend.rot_manifest(MANIFEST.digest)
    assert await backend.manifests().get(MANIFEST.digest) is None

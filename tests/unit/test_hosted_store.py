"""The hosted repositories' store without HTTP: upload sessions, manifest checks, GC."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import DigestMismatch
from pullthrough.cache.hosted import HostedRepositories, ManifestInvalid, check_manifest
from pullthrough.cache.layout import Layout
from pullthrough.cache.uploads import OffsetMismatch, UploadStore, UploadUnknown


def layout_at(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path)
    layout.create()
    return layout


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_an_upload_is_committed_once_and_only_with_its_digest(tmp_path: Path) -> None:
    layout = layout_at(tmp_path)
    store = UploadStore(layout, max_size=1 << 20, expiry=60)
    upload = store.start("myorg/a")
    assert await store.append(upload, "myorg/a", chunks(b"hello ", b"world"), 0) == 11
    with pytest.raises(UploadUnknown):
        store.offset(upload, "myorg/b")  # another repository's session
    with pytest.raises(OffsetMismatch):
        await store.append(upload, "myorg/a", chunks(b"!"), 3)
    digest = Digest.of(b"hello world")
    assert store.commit(upload, "myorg/a", digest) == 11
    assert layout.blob(digest).read_bytes() == b"hello world"
    with pytest.raises(UploadUnknown):
        store.offset(upload, "myorg/a")
    other = store.start("myorg/a")
    await store.append(other, "myorg/a", chunks(b"nope"), None)
    with pytest.raises(DigestMismatch):
        store.commit(other, "myorg/a", digest)
    assert list(store.folder.iterdir()) == []  # a mismatch ends the session


async def test_a_session_hashed_elsewhere_is_hashed_from_the_file(tmp_path: Path) -> None:
    layout = layout_at(tmp_path)
    first = UploadStore(layout, max_size=1 << 20, expiry=60)
    second = UploadStore(layout, max_size=1 << 20, expiry=60)  # another worker
    upload = first.start("myorg/a")
    await first.append(upload, "myorg/a", chunks(b"abc"), 0)
    await second.append(upload, "myorg/a", chunks(b"def"), 3)
    digest = Digest.of(b"abcdef")
    assert first.commit(upload, "myorg/a", digest) == 6


def test_idle_sessions_expire(tmp_path: Path) -> None:
    store = UploadStore(layout_at(tmp_path), max_size=100, expiry=60)
    old, fresh = store.start("myorg/a"), store.start("myorg/a")
    past = time.time() - 120
    for path in store.folder.glob(f"{old}*"):
        os.utime(path, (past, past))
    assert store.expire() == 1
    with pytest.raises(UploadUnknown):
        store.offset(old, "myorg/a")
    assert store.offset(fresh, "myorg/a") == 0


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"[]", "application/vnd.oci.image.manifest.v1+json"),
        (b'{"schemaVersion": 2, "config": {"digest": "sha256:zz", "size": 1}, "layers": []}', ""),
        (b'{"schemaVersion": 1}', "application/vnd.oci.image.manifest.v1+json"),
        (
            json.dumps(
                {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}
            ).encode(),
            "application/vnd.oci.image.manifest.v1+json",
        ),
        (b'{"schemaVersion": 2, "layers": []}', "application/json"),
    ],
)
def test_manifests_that_are_refused(body: bytes, content_type: str) -> None:
    with pytest.raises(ManifestInvalid):
        check_manifest(body, content_type)


def test_gc_leaves_a_protected_file_but_drops_the_link(tmp_path: Path) -> None:
    layout = layout_at(tmp_path)
    repos = HostedRepositories(layout)
    digest = Digest.of(b"pinned layer")
    layout.blob(digest).parent.mkdir(parents=True)
    layout.blob(digest).write_bytes(b"pinned layer")
    repos.link("myorg/a", "blobs", digest)
    result = repos.collect(0.0, protected=frozenset({digest}), now=time.time() + 1)
    assert result.unlinked == 1
    assert result.removed == []
    assert layout.blob(digest).exists()
    assert not repos.has("myorg/a", "blobs", digest)

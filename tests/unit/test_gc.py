"""What gc collects: blobs no cached manifest names, unless pinned, recently
written, or in a store with a manifest gc cannot read; temp files only with
--delete."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pullthrough.cache.blobs import STALE_TMP_SECONDS
from pullthrough.cache.digests import Digest
from pullthrough.cache.gc import collect
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore, StoredManifest
from pullthrough.cache.mediatypes import OCI_MANIFEST

OLD = time.time() - STALE_TMP_SECONDS - 60


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path)
    layout.create()
    return layout


def blob(layout: Layout, data: bytes, *, mtime: float = OLD) -> Digest:
    digest = Digest.of(data)
    path = layout.blob(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return digest


def manifest(layout: Layout, layers: list[Digest], media_type: str = OCI_MANIFEST) -> Digest:
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "layers": [{"mediaType": "x", "digest": str(d), "size": 1} for d in layers],
    }
    data = json.dumps(doc).encode()
    ManifestStore(layout).write(StoredManifest(Digest.of(data), media_type, data))
    return Digest.of(data)


def test_only_old_unreferenced_unpinned_blobs_are_collected(layout: Layout) -> None:
    used = blob(layout, b"used")
    manifest(layout, [used])
    orphan = blob(layout, b"orphan")
    pinned = blob(layout, b"pinned")
    recent = blob(layout, b"recent", mtime=time.time())

    report = collect([layout], protected={pinned}, delete=False)
    assert report.unreferenced == [layout.blob(orphan)]
    assert report.unreferenced_bytes == len(b"orphan")
    assert report.skipped == []
    assert layout.blob(orphan).exists()  # only counted

    collect([layout], protected={pinned}, delete=True)
    assert not layout.blob(orphan).exists()
    for kept in (used, pinned, recent):
        assert layout.blob(kept).exists()


def test_a_store_with_a_manifest_gc_cannot_read_keeps_every_blob(layout: Layout) -> None:
    orphan = blob(layout, b"orphan")
    odd = manifest(layout, [], media_type="application/vnd.example.unknown+json")
    report = collect([layout], protected=set(), delete=True)
    assert report.unreferenced == []
    assert len(report.skipped) == 1
    assert str(odd) in report.skipped[0]
    assert layout.blob(orphan).exists()


def test_temp_files_are_counted_and_only_stale_ones_removed_on_delete(layout: Layout) -> None:
    stale = layout.tmp / "x.tmp"
    stale.write_bytes(b"left by a crash")
    os.utime(stale, (OLD, OLD))
    report = collect([layout], protected=set(), delete=False)
    assert report.temp == 1
    assert stale.exists()
    report = collect([layout], protected=set(), delete=True)
    assert report.temp == 1
    assert not stale.exists()

"""Garbage in the stores: blobs no cached manifest names, and temp files no live
download or import holds. The size and age limits are eviction's (evict.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pullthrough.cache import graph
from pullthrough.cache.archive import remove_abandoned_imports
from pullthrough.cache.blobs import STALE_TMP_SECONDS, BlobStore
from pullthrough.cache.digests import Digest
from pullthrough.cache.evict import entries
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore, StoredManifest
from pullthrough.cache.mediatypes import MANIFESTS


@dataclass
class Garbage:
    unreferenced: list[Path] = field(default_factory=list)
    unreferenced_bytes: int = 0
    temp: int = 0
    # Stores whose unreferenced blobs were left alone, and why.
    skipped: list[str] = field(default_factory=list)


def collect(
    layouts: Sequence[Layout],
    *,
    protected: Collection[Digest],
    delete: bool,
) -> Garbage:
    """Blobs no cached manifest names and temp files no live download holds; only
    counts unless ``delete``.

    Never removes a ``protected`` digest (a pinned image's content). A store with
    a manifest of a type graph.py cannot read (not in ``mediatypes.MANIFESTS``) or
    whose JSON is damaged keeps all its blobs: which ones that manifest needs
    cannot be told.
    """
    result = Garbage()
    for layout in layouts:
        store = ManifestStore(layout)
        found = list(entries([layout]))
        manifests = (store.read(e.digest, touch=False) for e in found if e.kind == "manifest")
        referenced, unreadable = references(manifests)
        if unreadable:
            result.skipped.append(left_alone(str(layout.root), unreadable))
        else:
            cutoff = time.time() - STALE_TMP_SECONDS
            for entry in found:
                # Recent blobs may belong to a pull whose manifest is on its way.
                if (
                    entry.kind == "blob"
                    and entry.digest not in referenced
                    and entry.digest not in protected
                    and entry.last_used < cutoff
                ):
                    result.unreferenced.append(entry.path)
                    result.unreferenced_bytes += entry.size
                    if delete:
                        entry.path.unlink(missing_ok=True)
        if delete:
            result.temp += BlobStore(layout).remove_stale() + remove_abandoned_imports(layout)
        else:
            result.temp += sum(1 for _ in layout.tmp.iterdir()) if layout.tmp.is_dir() else 0
    return result


def references(manifests: Iterable[StoredManifest | None]) -> tuple[set[Digest], list[str]]:
    """The blobs ``manifests`` name (None: removed meanwhile), and the digests of
    those of a type gc cannot read: their store's blobs must all stay."""
    referenced: set[Digest] = set()
    unreadable = []
    for manifest in manifests:
        if manifest is None:
            continue
        if manifest.media_type not in MANIFESTS or not _is_json(manifest.data):
            unreadable.append(str(manifest.digest))
        referenced.update(d.digest for d in graph.blobs(manifest))
    return referenced, unreadable


def left_alone(store: str, unreadable: list[str]) -> str:
    """Why a store's unreferenced blobs were kept."""
    return (
        f"{store}: manifest(s) {', '.join(unreadable[:3])} of a type gc "
        "cannot read; its blobs were left alone"
    )


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True

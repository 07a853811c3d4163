"""What the cache holds, counted for a person: cached images by tag, and disk use."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pullthrough.cache import graph
from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import InvalidDigest
from pullthrough.cache.evict import entries
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore, StoredManifest
from pullthrough.cache.storage import ManifestStorage, TagStorage

# The size and last use of a store's blob or manifest, None when it is not there.
Stat = Callable[[Layout, str, Digest], "tuple[int, float] | None"]
# The bytes of a small blob (an image config), None when absent or over the limit.
SmallBlob = Callable[[Layout, Digest, int], "bytes | None"]


def file_stat(layout: Layout, kind: str, digest: Digest) -> tuple[int, float] | None:
    path = layout.manifest(digest) if kind == "manifest" else layout.blob(digest)
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime


def file_small_blob(layout: Layout, digest: Digest, limit: int) -> bytes | None:
    path = layout.blob(digest)
    try:
        if path.stat().st_size > limit:
            return None
        return path.read_bytes()
    except OSError:
        return None


@dataclass
class ImageRow:
    image: str
    digest: str
    media_type: str
    size: int
    complete: bool
    last_used: float
    pinned: bool
    # "os/arch[/variant]" of each image an index lists, or of the one image.
    platforms: tuple[str, ...] = ()


def list_images(
    tags: TagStorage,
    layouts: Mapping[str, Layout],
    shared: Layout,
    pins: Collection[str],
    *,
    manifests: Callable[[Layout], ManifestStorage] = ManifestStore,
    stat: Stat = file_stat,
    small_blob: SmallBlob = file_small_blob,
) -> list[ImageRow]:
    """Every tag recorded for an upstream in ``layouts`` whose manifest is still
    cached, with what its content weighs and when it was last used. A manifest is
    looked for in the upstream's own store, then in the shared one. ``manifests``
    and ``stat`` reach a store's content (the files of the folder by default)."""
    seen: dict[tuple[str, str], ImageRow] = {}
    for name, repository, tag, _, entry in tags.tags():
        own = layouts.get(name)
        if own is None:
            continue  # not attributable to a store
        image = f"{name}/{repository}:{tag}"
        if (image, entry.digest) in seen:
            continue
        top, layout = None, own
        for layout in dict.fromkeys((own, shared)):
            with contextlib.suppress(InvalidDigest):
                top = manifests(layout).read(Digest.parse(entry.digest), touch=False)
            if top is not None:
                break
        if top is None:
            continue  # evicted since
        walked = graph.closure(top, partial(manifests(layout).read, touch=False))
        size, last_used, complete = 0, 0.0, not walked.missing_manifests
        for kind, digest in [("manifest", m.digest) for m in walked.manifests] + [
            ("blob", d) for d in walked.blobs
        ]:
            found = stat(layout, kind, digest)
            if found is None:
                complete = False
                continue
            size += found[0]
            last_used = max(last_used, found[1])
        seen[(image, entry.digest)] = ImageRow(
            image,
            entry.digest,
            top.media_type,
            size,
            complete,
            last_used,
            image in pins,
            platforms(top, partial(small_blob, layout)),
        )
    return sorted(seen.values(), key=lambda r: (r.image, -r.last_used))


# An image config larger than this is not read for its platform.
MAX_CONFIG_BYTES = 1 << 20


def platforms(
    top: StoredManifest, small_blob: Callable[[Digest, int], bytes | None]
) -> tuple[str, ...]:
    """The platforms of an index's images (attestations, "unknown/unknown", left
    out), or of an image as its cached config names it."""
    listed = graph.children(top)
    if listed:
        named = (c.platform for c in listed if c.platform and "unknown" not in c.platform)
        return tuple(dict.fromkeys(named))
    config = next(iter(graph.blobs(top)), None)
    # Schema 1 names no config: its first blob is a layer.
    if config is None or not config.media_type.endswith(("config.v1+json", "image.v1+json")):
        return ()
    raw = small_blob(config.digest, MAX_CONFIG_BYTES)
    if raw is None:
        return ()
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return ()
    if not isinstance(doc, dict):
        return ()
    parts = (doc.get("os"), doc.get("architecture"), doc.get("variant"))
    name = "/".join(str(p) for p in parts if p and isinstance(p, str))
    return (name,) if name else ()


@dataclass
class Usage:
    blobs: int = 0
    blob_bytes: int = 0
    manifests: int = 0
    manifest_bytes: int = 0
    temp_files: int = 0
    temp_bytes: int = 0
    quarantined: int = 0
    quarantined_bytes: int = 0


def disk_usage(layouts: Sequence[Layout]) -> Usage:
    usage = Usage()
    for entry in entries(layouts):
        if entry.kind == "blob":
            usage.blobs += 1
            usage.blob_bytes += entry.size
        else:
            usage.manifests += 1
            usage.manifest_bytes += entry.size
    for layout in layouts:
        # Recursively: an import's staging folder holds whole layers.
        for dirpath, _, files in os.walk(layout.tmp):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    usage.temp_bytes += (Path(dirpath) / name).stat().st_size
                    usage.temp_files += 1
        for path in layout.quarantine.iterdir() if layout.quarantine.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):
                usage.quarantined_bytes += path.stat().st_size
                usage.quarantined += 1
    return usage

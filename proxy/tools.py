"""Cache operations for the command line: warm, ls, du, gc, pin, export, import.

They open the cache the way the server does, so they work beside a running mirror
(downloads are coordinated by lock files, the index is SQLite) or without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from cache import graph, stores
from cache.archive import remove_abandoned_imports
from cache.blobs import STALE_TMP_SECONDS, BlobStore
from cache.digests import Digest
from cache.errors import InvalidDigest
from cache.evict import entries
from cache.index import TagIndex
from cache.layout import Layout
from cache.manifests import ManifestStore, StoredManifest
from cache.mediatypes import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    DOCKER_V1,
    DOCKER_V1_SIGNED,
    OCI_INDEX,
    OCI_MANIFEST,
)
from metrics import Metrics
from proxy.app import Resources, index_dir, known_upstreams, open_mirrors, rekey_tags
from proxy.config import Settings
from proxy.errors import RegistryError
from proxy.housekeeping import Housekeeper, pin_all
from proxy.mirror import ACCEPT_ALL, Mirror
from proxy.names import ImageRef, Reference
from proxy.stats import human

PARALLEL_DOWNLOADS = 4


# -- warm ---------------------------------------------------------------------------


@dataclass
class WarmSummary:
    images: int = 0
    failed: list[str] = field(default_factory=list)
    manifests: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    cached: int = 0
    cached_bytes: int = 0


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


async def warm(
    settings: Settings,
    refs: Sequence[str],
    *,
    platforms: frozenset[str] | None,
    console: Console,
) -> WarmSummary:
    """Fetch images into the cache; what is already there is not fetched again,
    so running it again after an interruption carries on where it stopped."""
    summary = WarmSummary()
    async with open_mirrors(settings, Metrics()) as resources:
        with _progress(console) as progress:
            total = progress.add_task("[bold]total", total=0)
            for raw in refs:
                try:
                    image = ImageRef.parse(raw)
                    await _warm_one(resources, image, platforms, progress, total, summary)
                    summary.images += 1
                except RegistryError as exc:
                    summary.failed.append(raw)
                    progress.console.print(f"[red]{raw}: {exc.code}: {exc.message} ({exc.detail})")
    return summary


async def _warm_one(
    resources: Resources,
    image: ImageRef,
    platforms: frozenset[str] | None,
    progress: Progress,
    total: TaskID,
    summary: WarmSummary,
) -> None:
    mirror = resources.mirrors.find(image.upstream)
    if mirror is None:
        raise RegistryError(f"registry {image.upstream} is not configured")
    repo = image.repository
    top = await _manifest(mirror, repo, image.reference)
    if image.reference.tag is not None:
        await mirror.remember_for_everyone(repo, image.reference.tag, top)
    blobs: dict[Digest, int | None] = {}
    queue = [top]
    while queue:
        manifest = queue.pop()
        summary.manifests += 1
        for blob in graph.blobs(manifest):
            blobs.setdefault(blob.digest, blob.size)
        for child in graph.children(manifest):
            if platforms is None or graph.platform_wanted(child, platforms):
                queue.append(await _manifest(mirror, repo, Reference(digest=child.digest)))
    missing = {d: s for d, s in blobs.items() if mirror.blob_hit(d) is None}
    for digest, size in blobs.items():
        if digest not in missing:
            summary.cached += 1
            summary.cached_bytes += size or 0
    progress.update(
        total, total=(progress.tasks[total].total or 0) + sum(s or 0 for s in missing.values())
    )
    gate = asyncio.Semaphore(PARALLEL_DOWNLOADS)

    async def fetch(digest: Digest, size: int | None) -> None:
        async with gate:
            task = progress.add_task(f"{image.repository} {digest.hex[:12]}", total=size)
            tracker = mirror.blob_download(repo, digest)
            got = 0
            if tracker is not None:
                await tracker.size()
                async for chunk in tracker.read(0, None):
                    got += len(chunk)
                    progress.advance(task, len(chunk))
                    progress.advance(total, len(chunk))
            progress.update(task, completed=size or got)
            summary.fetched += 1
            summary.fetched_bytes += got or size or 0

    await asyncio.gather(*(fetch(d, s) for d, s in missing.items()))
    await mirror.settle()  # what was fetched is durable before we say so


async def _manifest(mirror: Mirror, repository: str, reference: Reference) -> StoredManifest:
    answer = await mirror.manifest(repository, reference, ACCEPT_ALL, head=False)
    assert answer.data is not None  # a GET always carries the bytes
    return StoredManifest(Digest.parse(answer.digest), answer.media_type, answer.data)


# -- looking at the cache -------------------------------------------------------------


@dataclass
class ImageRow:
    image: str
    digest: str
    media_type: str
    size: int
    complete: bool
    last_used: float
    pinned: bool


def list_images(keeper: Housekeeper) -> list[ImageRow]:
    pins = keeper.pins()
    seen: dict[tuple[str, str], ImageRow] = {}
    shared = Layout(keeper.settings.cache_dir.resolve())
    for name, repository, tag, _, entry in keeper.tags.tags():
        own = keeper.layouts.get(name)
        if own is None:
            continue  # not attributable to a store: see unattributed()
        image = f"{name}/{repository}:{tag}"
        if (image, entry.digest) in seen:
            continue
        top, layout = None, own
        for layout in dict.fromkeys((own, shared)):
            with contextlib.suppress(InvalidDigest):
                top = ManifestStore(layout).read(Digest.parse(entry.digest), touch=False)
            if top is not None:
                break
        if top is None:
            continue  # evicted since
        walked = graph.closure(top, partial(ManifestStore(layout).read, touch=False))
        size, last_used, complete = 0, 0.0, not walked.missing_manifests
        for path in [layout.manifest(m.digest) for m in walked.manifests] + [
            layout.blob(d) for d in walked.blobs
        ]:
            try:
                st = path.stat()
            except FileNotFoundError:
                complete = False
                continue
            size += st.st_size
            last_used = max(last_used, st.st_mtime)
        seen[(image, entry.digest)] = ImageRow(
            image, entry.digest, top.media_type, size, complete, last_used, image in pins
        )
    return sorted(seen.values(), key=lambda r: (r.image, -r.last_used))


def unattributed(keeper: Housekeeper) -> set[str]:
    """Upstream keys in the tag index that name no upstream this cache knows:
    a URL from before tags were keyed by name, or a server's upstream that was
    never recorded here."""
    return {name for name, *_ in keeper.tags.tags() if name not in keeper.layouts}


def print_images(rows: Sequence[ImageRow], console: Console) -> None:
    """A table on a terminal; tab-separated columns for a pipe or a file."""
    header = ("IMAGE", "DIGEST", "SIZE", "LAST USED", "NOTES")
    lines = []
    for row in rows:
        notes = ", ".join(
            n for n, on in (("pinned", row.pinned), ("partial", not row.complete)) if on
        )
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.last_used))
        lines.append((row.image, row.digest[:19], human(row.size), used, notes or "-"))
    if not console.is_terminal:
        for line in (header, *lines):
            console.print("\t".join(line), soft_wrap=True)
        return
    table = Table(*header)
    for line in lines:
        table.add_row(*line)
    console.print(table)


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


# -- gc -------------------------------------------------------------------------------


@dataclass
class Collection:
    unreferenced: list[Path] = field(default_factory=list)
    unreferenced_bytes: int = 0
    temp: int = 0
    evicted: int = 0
    evicted_bytes: int = 0
    # Stores whose unreferenced blobs were left alone, and why.
    skipped: list[str] = field(default_factory=list)


# Manifest types whose references graph.blobs and graph.children know; for any
# other, gc cannot tell which blobs it needs.
KNOWN_MANIFESTS = frozenset(
    {OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, DOCKER_V1, DOCKER_V1_SIGNED}
)


def collect_garbage(keeper: Housekeeper, *, delete: bool) -> Collection:
    """Blobs no cached manifest names, temp files no live download holds, and what
    the size and age limits would evict. Only counts unless ``delete``.

    Never removes a pinned image's content. A store with a manifest gc cannot
    read (an unknown type, damaged JSON) keeps all its blobs: which ones that
    manifest needs cannot be told.
    """
    result = Collection()
    protected = keeper.protected()
    for layout in keeper.distinct_layouts():
        store = ManifestStore(layout)
        referenced: set[Digest] = set()
        found = list(entries([layout]))
        unreadable = []
        for entry in found:
            if entry.kind == "manifest":
                manifest = store.read(entry.digest, touch=False)
                if manifest is None:
                    continue  # removed meanwhile
                if manifest.media_type not in KNOWN_MANIFESTS or not _is_json(manifest.data):
                    unreadable.append(str(entry.digest))
                referenced.update(d.digest for d in graph.blobs(manifest))
        if unreadable:
            result.skipped.append(
                f"{layout.root}: manifest(s) {', '.join(unreadable[:3])} of a type gc "
                "cannot read; its blobs were left alone"
            )
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
    if keeper.limited:
        evicted = keeper.run_once(dry_run=not delete)
        if evicted is not None:
            result.evicted = len(evicted.removed)
            result.evicted_bytes = evicted.freed
    return result


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def pin(keeper: Housekeeper, images: Sequence[str], *, remove: bool) -> set[str]:
    return pin_all(keeper.tags, images, remove=remove)


class NoCache(Exception):
    """A command that only reads the cache was pointed where there is none."""


def has_cache(root: Path) -> bool:
    return (root / "index").is_dir() or (root / "blobs").is_dir()


@contextlib.contextmanager
def housekeeper(settings: Settings, *, create: bool = True) -> Iterator[Housekeeper]:
    """A Housekeeper over the cache, for commands that need no network.

    It sees every upstream a server recorded in the cache as well as those in
    ``settings``, so it finds what the server pulled without its flags; an
    upstream with credentials in either has its own store. ``create=False``
    (commands that only read) raises NoCache rather than making one.
    """
    root = settings.cache_dir.resolve()
    if not create and not has_cache(root):
        raise NoCache(f"no cache at {root}")
    known = stores.read_record(root)
    creds = {name: k.has_credentials for name, k in known.items()}
    for up in settings.all_upstreams():
        creds[up.name] = creds.get(up.name, False) or up.has_credentials
    by_upstream = stores.layouts(root, creds.items())
    if create:
        for layout in by_upstream.values():
            layout.create()
    tags = TagIndex(index_dir(settings))
    try:
        rekey_tags(tags, known_upstreams(settings))
        yield Housekeeper(settings, by_upstream, tags, more_layouts=stores.private_stores(root))
    finally:
        tags.close()

"""Cache operations for the command line: warm, ls, du, gc, pin, export, import.

They open the cache the way the server does, so they work beside a running mirror
(downloads are coordinated by lock files, the index is SQLite) or without one.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from cache import graph
from cache.archive import remove_abandoned_imports
from cache.blobs import STALE_TMP_SECONDS, BlobStore
from cache.digests import Digest
from cache.evict import entries
from cache.index import TagIndex
from cache.layout import Layout
from cache.manifests import ManifestStore, StoredManifest
from metrics import Metrics
from proxy.app import Resources, index_dir, layouts, open_mirrors
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
    await mirror.blobs.settle()  # what was fetched is durable before we say so


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
    names = {str(u.url): u.name for u in keeper.settings.all_upstreams()}
    pins = keeper.pins()
    seen: dict[tuple[str, str], ImageRow] = {}
    for upstream, repository, tag, _, entry in keeper.tags.tags():
        name = names.get(upstream)
        if name is None:
            continue  # an upstream no longer configured
        image = f"{name}/{repository}:{tag}"
        if (image, entry.digest) in seen:
            continue
        layout = keeper.layouts[name]
        store = ManifestStore(layout)
        top = store.read(Digest.parse(entry.digest), touch=False)
        if top is None:
            continue  # evicted since
        walked = graph.closure(top, partial(store.read, touch=False))
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
        for path in layout.tmp.iterdir() if layout.tmp.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):
                usage.temp_files += 1
                usage.temp_bytes += path.stat().st_size
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


def collect_garbage(keeper: Housekeeper, *, delete: bool) -> Collection:
    """Blobs no cached manifest names, temp files no live download holds, and what
    the size and age limits would evict. Only counts unless ``delete``."""
    result = Collection()
    for layout in keeper.distinct_layouts():
        store = ManifestStore(layout)
        referenced: set[Digest] = set()
        found = list(entries([layout]))
        for entry in found:
            if entry.kind == "manifest":
                manifest = store.read(entry.digest, touch=False)
                if manifest is not None:
                    referenced.update(d.digest for d in graph.blobs(manifest))
        cutoff = time.time() - STALE_TMP_SECONDS
        for entry in found:
            # Recent blobs may belong to a pull whose manifest is on its way.
            if entry.kind == "blob" and entry.digest not in referenced and entry.last_used < cutoff:
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


def pin(keeper: Housekeeper, images: Sequence[str], *, remove: bool) -> set[str]:
    return pin_all(keeper.tags, images, remove=remove)


@contextlib.contextmanager
def housekeeper(settings: Settings) -> Iterator[Housekeeper]:
    """A Housekeeper over the cache, for commands that need no network."""
    by_upstream = layouts(settings)
    for layout in by_upstream.values():
        layout.create()
    tags = TagIndex(index_dir(settings))
    try:
        yield Housekeeper(settings, by_upstream, tags)
    finally:
        tags.close()

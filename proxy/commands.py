"""The cache commands: what ``pullthrough warm|export|import|cache|gc`` do and print."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)

from cache import stores
from cache.archive import ExportImage, export_archive, import_archive, read_ref_names
from cache.digests import Digest
from cache.errors import CacheError, InvalidDigest
from cache.index import TagEntry
from cache.layout import Layout
from cache.mediatypes import DOCKER_LIST, OCI_INDEX
from cache.quarantine import Corrupt
from cache.scrub import total_bytes, verify_all
from proxy import tools
from proxy.config import Settings
from proxy.errors import RegistryError
from proxy.housekeeping import Housekeeper
from proxy.mirror import ANY_CLIENT
from proxy.names import ImageRef
from proxy.stats import human

INDEXES = (OCI_INDEX, DOCKER_LIST)


class CommandError(Exception):
    """Something the operator must fix; printed without a traceback."""


def run_tool(args: argparse.Namespace, settings: Settings) -> int:
    """Run a cache command: 0 done, 1 failed (one line on stderr)."""
    console = Console(highlight=False, soft_wrap=True)
    errors = Console(stderr=True, highlight=False, soft_wrap=True)

    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))

    def fail(text: object) -> int:
        errors.print(f"pullthrough {command}: {text}", style="red", markup=False)
        return 1

    try:
        if args.command == "warm":
            return _warm(args, settings, console)
        if args.command == "export":
            return _export(args, settings, console)
        if args.command == "import":
            return _import(args, settings, console)
        if args.command == "gc":
            return _gc(args, settings, console)
        return _cache(args, settings, console)
    except tools.NoCache as exc:
        # Only reading, and nothing to read: a mistyped --cache-dir must not
        # leave a new empty cache behind.
        return fail(f"{exc} (check --cache-dir)")
    except (CommandError, CacheError, RegistryError) as exc:
        text = (
            f"{exc.code}: {exc.message} ({exc.detail})" if isinstance(exc, RegistryError) else exc
        )
        return fail(text)
    except OSError as exc:  # an unreadable cache, a full disk: one line, no traceback
        return fail(exc)


def _images(args: argparse.Namespace) -> list[str]:
    images = list(args.images)
    if getattr(args, "file", None) is not None:
        try:
            lines = args.file.read_text().splitlines()
        except OSError as exc:
            raise CommandError(f"cannot read {args.file}: {exc}") from None
        images += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not images:
        raise CommandError("name at least one image (or --file)")
    return images


def _platforms(args: argparse.Namespace) -> frozenset[str] | None:
    return frozenset(args.platform) if args.platform else None


def _warm(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    recorded = stores.read_record(settings.cache_dir.resolve())
    for up in settings.all_upstreams():
        known = recorded.get(up.name)
        if known is not None and known.url != str(up.url):
            # Not an error (a warm may use another route), but rarely meant.
            print(
                f"pullthrough warm: note: the server on this cache fetches {up.name} from "
                f"{known.url}; this warm fetches it from {up.url} (--upstream or --config "
                "to match)",
                file=sys.stderr,
            )
    started = time.monotonic()
    summary = asyncio.run(
        tools.warm(settings, _images(args), platforms=_platforms(args), console=console)
    )
    console.print(
        f"warmed {summary.images} image(s) in {time.monotonic() - started:.1f}s: "
        f"fetched {summary.fetched} blob(s) ({human(summary.fetched_bytes)}), "
        f"{summary.cached} already cached ({human(summary.cached_bytes)}), "
        f"{summary.manifests} manifest(s)"
    )
    if summary.failed:
        console.print(f"[red]failed: {', '.join(summary.failed)}")
        return 1
    return 0


def _export(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    platforms = _platforms(args)
    with tools.housekeeper(settings, create=False) as keeper:
        items, layout = [], None
        for raw in _images(args):
            image = ImageRef.parse(raw)
            tops = keeper.resolve(image)
            if not tops:
                raise CommandError(_not_cached(keeper, image, raw))
            # Of the answers cached for different clients, the index is the whole image.
            top, where = next(((t, w) for t, w in tops if t.media_type in INDEXES), tops[0])
            if layout is not None and where != layout:
                raise CommandError("export images of upstreams with credentials separately")
            layout = where
            items.append(ExportImage(str(image), top, platforms))
        assert layout is not None
        with _bar(console, "export") as (progress, task):
            summary = export_archive(
                args.output, items, layout, progress=lambda n: progress.advance(task, n)
            )
    console.print(
        f"wrote {args.output}: {summary.images} image(s), {summary.manifests} manifest(s), "
        f"{summary.blobs} blob(s), {human(summary.bytes)}"
    )
    return 0


def _not_cached(keeper: Housekeeper, image: ImageRef, raw: str) -> str:
    if image.upstream not in keeper.layouts:
        return (
            f"{image} is not cached: no server on this cache was configured with "
            f"{image.upstream} (known: {', '.join(sorted(keeper.layouts))})"
        )
    return f"{image} is not cached; `pullthrough warm {raw}` first"


def _import(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    archive: Path = args.archive
    if not archive.is_file():
        raise CommandError(f"no such file: {archive}")
    with tools.housekeeper(settings) as keeper:
        layout = _import_store(keeper, read_ref_names(archive))
        with _bar(console, "import", total=archive.stat().st_size) as (progress, task):
            summary = import_archive(archive, layout, progress=lambda n: progress.advance(task, n))
        for image in summary.images:
            tagged = _tag(keeper, image.ref_name, image.digest, image.media_type)
            console.print(f"  {image.digest}  {tagged}")
    console.print(
        f"imported {len(summary.images)} image(s) from {archive} into {layout.root}: "
        f"{summary.manifests_added} manifest(s), {summary.blobs_added} blob(s) added "
        f"({human(summary.bytes_added)}), {summary.blobs_present} already cached; "
        "every digest verified"
    )
    return 0


def _import_store(keeper: Housekeeper, ref_names: list[str | None]) -> Layout:
    """The store an archive goes into: that of the upstream its images name (an
    upstream with credentials has its own); the shared one for images that name
    no known upstream. One store per import, as one archive is one transaction."""
    chosen: dict[Layout, list[str]] = {}
    for ref_name in ref_names:
        with contextlib.suppress(RegistryError, InvalidDigest):
            upstream = ImageRef.parse(ref_name or "").upstream
            if ref_name and upstream in keeper.layouts:
                chosen.setdefault(keeper.layouts[upstream], []).append(ref_name)
    if len(chosen) > 1:
        parts = "; ".join(f"{', '.join(names)} -> {lay.root}" for lay, names in chosen.items())
        raise CommandError(
            f"the archive holds images of upstreams with separate stores ({parts}): "
            "export and import them separately"
        )
    if chosen:
        return next(iter(chosen))
    return Layout(keeper.settings.cache_dir.resolve())


def _tag(keeper: Housekeeper, ref_name: str | None, digest: Digest, media_type: str) -> str:
    """Record an imported image's tag, when its ref name has one; say what happened."""
    last = (ref_name or "").rsplit("/", 1)[-1]
    if not ref_name or ":" not in last or "@" in ref_name:
        return f"(no tag in ref name {ref_name!r}: pull it by digest)"
    try:
        image = ImageRef.parse(ref_name)
    except RegistryError:
        return f"(ref name {ref_name!r} is not an image reference: pull it by digest)"
    if image.upstream not in keeper.layouts or image.reference.tag is None:
        return f"(registry {image.upstream} is not configured: pull it by digest)"
    entry = TagEntry(str(digest), media_type, time.time())
    keeper.tags.put_sync(image.upstream, image.repository, image.reference.tag, ANY_CLIENT, entry)
    return str(image)


def _cache(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    if args.action == "verify":
        return _verify(settings, console)
    pinning = args.action in ("pin", "unpin")
    with tools.housekeeper(settings, create=pinning) as keeper:
        if args.action == "ls":
            tools.print_images(tools.list_images(keeper), console)
            _warn_unattributed(keeper)
        elif args.action == "du":
            usage = tools.disk_usage(keeper.distinct_layouts())
            total = usage.blob_bytes + usage.manifest_bytes
            limit = settings.max_size
            console.print(
                f"{human(total)} in {usage.blobs} blob(s) "
                f"({human(usage.blob_bytes)}) and {usage.manifests} manifest(s) "
                f"({human(usage.manifest_bytes)}); {usage.temp_files} temp file(s) "
                f"({human(usage.temp_bytes)})"
                + (
                    f"; {usage.quarantined} quarantined file(s) "
                    f"({human(usage.quarantined_bytes)}) in quarantine/"
                    if usage.quarantined
                    else ""
                )
                + (f"; limit {human(limit)} ({100 * total / limit:.0f}% used)" if limit else "")
            )
        else:
            pins = tools.pin(keeper, args.images, remove=args.action == "unpin")
            console.print("pinned: " + (", ".join(sorted(pins)) or "nothing"))
    return 0


def _verify(settings: Settings, console: Console) -> int:
    with tools.housekeeper(settings, create=False) as keeper:
        layouts = keeper.distinct_layouts()
        with _bar(console, "verify", total=total_bytes(layouts)) as (progress, task):

            def found(corrupt: Corrupt) -> None:
                where = f"moved to {corrupt.moved_to}" if corrupt.moved_to else "gone meanwhile"
                progress.console.print(
                    f"[red]corrupt {corrupt.kind} {corrupt.digest}: {corrupt.detail}; {where}"
                )

            report = verify_all(layouts, progress=lambda n: progress.advance(task, n), found=found)
    summary = (
        f"verified {report.blobs} blob(s) and {report.manifests} manifest(s), "
        f"{human(report.bytes)} in {report.seconds:.1f}s: "
    )
    if not report.corrupt:
        console.print(summary + "all intact")
        return 0
    console.print(
        summary + f"[red]{len(report.corrupt)} corrupt[/red], moved to quarantine/ "
        "(the mirror fetches them again from the upstream when next asked for)"
    )
    return 1


def _warn_unattributed(keeper: Housekeeper) -> None:
    unknown = tools.unattributed(keeper)
    if unknown:
        print(
            f"pullthrough: tags recorded under {', '.join(sorted(unknown))} are not listed: "
            "no upstream of that name or URL is known to this cache (start the server "
            "that pulled them once, or pass its --config)",
            file=sys.stderr,
        )


def _gc(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    with tools.housekeeper(settings, create=False) as keeper:
        result = tools.collect_garbage(keeper, delete=args.delete)
    verb = "removed" if args.delete else "would remove"
    console.print(
        f"{verb} {len(result.unreferenced)} unreferenced blob(s) "
        f"({human(result.unreferenced_bytes)}), {result.temp} temp file(s), "
        f"{result.evicted} object(s) over the size/age limits "
        f"({human(result.evicted_bytes)})"
    )
    for reason in result.skipped:
        console.print(f"[yellow]kept: {reason}")
    if not args.delete:
        console.print("nothing was deleted: run `pullthrough gc --delete` to do it")
    return 0


@contextlib.contextmanager
def _bar(
    console: Console, label: str, total: int | None = None
) -> Iterator[tuple[Progress, TaskID]]:
    """A byte progress bar: yields (progress, task) to advance."""
    progress = Progress(
        TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console
    )
    with progress:
        yield progress, progress.add_task("", total=total)

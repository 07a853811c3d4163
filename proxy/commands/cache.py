"""``pullthrough cache ls|du|pin|unpin|verify``: look at and manage the cache."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from rich.console import Console

from pullthrough.cache.listing import Usage, disk_usage
from pullthrough.cache.quarantine import Corrupt
from pullthrough.cache.scrub import VerifyReport, total_bytes, verify_all
from pullthrough.proxy.config import Settings
from pullthrough.proxy.console import byte_progress, human, image_table
from pullthrough.proxy.images import CachedImages, open_images, set_pins

if TYPE_CHECKING:
    from pullthrough.cache.s3_admin import S3Admin


def run(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    actions = {"ls": _ls, "du": _du, "pin": _pin, "unpin": _pin, "verify": _verify}
    return actions[args.action](args, settings, console)


def _ls(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    with open_images(settings, create=False) as images:
        image_table(images.rows(), console)
        _warn_unattributed(images)
    return 0


def _warn_unattributed(images: CachedImages) -> None:
    unknown = images.unattributed()
    if unknown:
        print(
            f"pullthrough: tags recorded under {', '.join(sorted(unknown))} are not listed: "
            "no upstream of that name or URL is known to this cache (start the server "
            "that pulled them once, or pass its --config)",
            file=sys.stderr,
        )


def _s3_usage(stores: Iterable[S3Admin]) -> Usage:
    usage = Usage()
    for store in stores:
        for obj in store.every():
            if obj.kind == "blob":
                usage.blobs += 1
                usage.blob_bytes += obj.size
            else:
                usage.manifests += 1
                usage.manifest_bytes += obj.size
        count, size = store.quarantined()
        usage.quarantined += count
        usage.quarantined_bytes += size
    return usage


def _du(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    with open_images(settings, create=False) as images:
        if images.s3 is None:
            usage = disk_usage(images.distinct_layouts())
        else:
            usage = _s3_usage(images.s3.values())
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
    return 0


def _pin(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    with open_images(settings) as images:
        pins = set_pins(images.tags, args.images, remove=args.action == "unpin")
    console.print("pinned: " + (", ".join(sorted(pins)) or "nothing"))
    return 0


def _verify(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    with open_images(settings, create=False) as images:
        layouts = images.distinct_layouts()
        if images.s3 is not None:
            from pullthrough.cache import s3_admin  # the s3 extra

            s3 = list(images.s3.values())
            total = s3_admin.total_bytes(s3)
        else:
            total = total_bytes(layouts)
        with byte_progress(console) as progress:
            task = progress.add_task("verify", total=total)

            def found(corrupt: Corrupt) -> None:
                where = f"moved to {corrupt.moved_to}" if corrupt.moved_to else "gone meanwhile"
                progress.console.print(
                    f"[red]corrupt {corrupt.kind} {corrupt.digest}: {corrupt.detail}; {where}"
                )

            def advance(n: int) -> None:
                progress.advance(task, n)

            report: VerifyReport
            if images.s3 is not None:
                report = s3_admin.verify_all(s3, progress=advance, found=found)
            else:
                report = verify_all(layouts, progress=advance, found=found)
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

"""``pullthrough gc``: report (or, with --delete, remove) garbage and what the
size and age limits evict."""

from __future__ import annotations

import argparse

from rich.console import Console

from pullthrough.cache import gc
from pullthrough.proxy.config import Settings
from pullthrough.proxy.console import human
from pullthrough.proxy.housekeeping import Housekeeper
from pullthrough.proxy.images import CachedImages, open_images


def run(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    evicted = evicted_bytes = 0
    with open_images(settings, create=False) as images:
        if images.s3 is not None:
            return _on_s3(args, settings, images, console)
        garbage = gc.collect(
            images.distinct_layouts(),
            protected=images.protected(),
            delete=args.delete,
        )
        keeper = Housekeeper(settings, images)
        if keeper.limited:
            eviction = keeper.run_once(dry_run=not args.delete)
            if eviction is not None:
                evicted, evicted_bytes = len(eviction.removed), eviction.freed
    verb = "removed" if args.delete else "would remove"
    console.print(
        f"{verb} {len(garbage.unreferenced)} unreferenced blob(s) "
        f"({human(garbage.unreferenced_bytes)}), {garbage.temp} temp file(s), "
        f"{evicted} object(s) over the size/age limits ({human(evicted_bytes)})"
    )
    for reason in garbage.skipped:
        console.print(f"[yellow]kept: {reason}")
    if not args.delete:
        console.print("nothing was deleted: run `pullthrough gc --delete` to do it")
    return 0


def _on_s3(
    args: argparse.Namespace, settings: Settings, images: CachedImages, console: Console
) -> int:
    from pullthrough.cache import s3_admin  # the s3 extra

    assert images.s3 is not None
    garbage = s3_admin.collect(
        list(images.s3.values()), protected=images.protected(), delete=args.delete
    )
    evicted = evicted_bytes = 0
    keeper = Housekeeper(settings, images)
    if keeper.limited:
        eviction = keeper.run_once(dry_run=not args.delete)
        if eviction is not None:
            evicted, evicted_bytes = len(eviction.removed), eviction.freed
    verb = "removed" if args.delete else "would remove"
    console.print(
        f"{verb} {len(garbage.unreferenced)} unreferenced blob(s) "
        f"({human(garbage.unreferenced_bytes)}), {garbage.uploads} multipart upload(s) "
        f"of dead downloads, {evicted} blob(s) over the size/age limits "
        f"({human(evicted_bytes)}) from S3"
    )
    for reason in garbage.skipped:
        console.print(f"[yellow]kept: {reason}")
    if not args.delete:
        console.print("nothing was deleted: run `pullthrough gc --delete` to do it")
    return 0

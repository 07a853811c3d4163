"""``pullthrough gc``: report (or, with --delete, remove) garbage and what the
size and age limits evict."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rich.console import Console

from pullthrough.cache import gc
from pullthrough.proxy.config import Settings
from pullthrough.proxy.console import human
from pullthrough.proxy.housekeeping import Housekeeper
from pullthrough.proxy.images import open_images

if TYPE_CHECKING:
    from pullthrough.cache.s3_admin import S3Garbage


def run(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    with open_images(settings, create=False) as images:
        garbage: gc.Garbage | S3Garbage
        if images.s3 is None:
            garbage = gc.collect(
                images.distinct_layouts(), protected=images.protected(), delete=args.delete
            )
            found = f"{garbage.temp} temp file(s), "
            evictable, where = "object(s)", ""
        else:
            from pullthrough.cache import s3_admin  # the s3 extra

            garbage = on_s3 = s3_admin.collect(
                list(images.s3.values()), protected=images.protected(), delete=args.delete
            )
            found = f"{on_s3.uploads} multipart upload(s) of dead downloads, "
            evictable, where = "blob(s)", " from S3"  # manifests are not evicted there
        evicted = evicted_bytes = 0
        keeper = Housekeeper(settings, images)
        if keeper.limited:
            eviction = keeper.run_once(dry_run=not args.delete)
            if eviction is not None:
                evicted, evicted_bytes = len(eviction.removed), eviction.freed
    verb = "removed" if args.delete else "would remove"
    console.print(
        f"{verb} {len(garbage.unreferenced)} unreferenced blob(s) "
        f"({human(garbage.unreferenced_bytes)}), {found}"
        f"{evicted} {evictable} over the size/age limits ({human(evicted_bytes)}){where}"
    )
    for reason in garbage.skipped:
        console.print(f"[yellow]kept: {reason}")
    if not args.delete:
        console.print("nothing was deleted: run `pullthrough gc --delete` to do it")
    return 0

"""``pullthrough export`` and ``import``: cached images to and from OCI layout archives."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from pullthrough.cache.archive import export_archive, import_archive, read_ref_names
from pullthrough.proxy.commands import CommandError, image_args, platform_args
from pullthrough.proxy.config import Settings
from pullthrough.proxy.console import byte_progress, human
from pullthrough.proxy.images import (
    CachedImages,
    import_store,
    open_images,
    plan_export,
    tag_import,
)


def export(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    with open_images(settings, create=False) as images:
        items, layout = plan_export(images, image_args(args), platform_args(args))
        with byte_progress(console) as progress:
            task = progress.add_task("export")

            def advance(n: int) -> None:
                progress.advance(task, n)

            if images.s3 is not None:
                from pullthrough.cache.s3_archive import export_from_s3  # the s3 extra

                summary = export_from_s3(
                    args.output, items, images.s3[layout.root], _scratch(images), progress=advance
                )
            else:
                summary = export_archive(args.output, items, layout, progress=advance)
    console.print(
        f"wrote {args.output}: {summary.images} image(s), {summary.manifests} manifest(s), "
        f"{summary.blobs} blob(s), {human(summary.bytes)}"
    )
    return 0


def load(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    archive: Path = args.archive
    if not archive.is_file():
        raise CommandError(f"no such file: {archive}")
    with open_images(settings) as images:
        layout = import_store(images, read_ref_names(archive))
        size = archive.stat().st_size
        with byte_progress(console) as progress:
            task = progress.add_task("import", total=size)

            def advance(n: int) -> None:
                progress.advance(task, n)

            if images.s3 is not None:
                from pullthrough.cache.s3_archive import import_to_s3  # the s3 extra

                store = images.s3[layout.root]
                where = str(store.location)
                summary = import_to_s3(archive, store, _scratch(images), progress=advance)
            else:
                where = str(layout.root)
                summary = import_archive(archive, layout, progress=advance)
        for image in summary.images:
            tagged = tag_import(images, image.ref_name, image.digest, image.media_type)
            console.print(f"  {image.digest}  {tagged}")
    console.print(
        f"imported {len(summary.images)} image(s) from {archive} into {where}: "
        f"{summary.manifests_added} manifest(s), {summary.blobs_added} blob(s) added "
        f"({human(summary.bytes_added)}), {summary.blobs_present} already cached; "
        "every digest verified"
    )
    return 0


def _scratch(images: CachedImages) -> Path:
    """Where an export or import on S3 copies content through: this machine's
    cache folder, as a node stages its downloads there."""
    return images.root / "tmp"

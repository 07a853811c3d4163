"""Export and import with the store on S3: through a scratch copy on local disk.

An OCI archive is a local file either way, so the archive code (archive.py) runs
unchanged on a scratch store in a local folder: an export first copies what the
images need from S3 into it (hashing every blob, as the export does on disk: a
corrupt one is quarantined on S3 and the export refused), an import verifies
the whole archive into it, then sends its blobs and manifests to S3 (blobs
first, and image manifests before the indexes that list them, so no object on
S3 ever names one that is not there yet). The scratch folder goes in any case.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from pullthrough.cache import graph
from pullthrough.cache.archive import (
    ArchiveError,
    ExportImage,
    ExportSummary,
    ImportSummary,
    export_archive,
    import_archive,
)
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore
from pullthrough.cache.s3_admin import S3Admin, report

Progress = Callable[[int], None]


def export_from_s3(
    out: Path,
    images: Sequence[ExportImage],
    store: S3Admin,
    scratch: Path,
    *,
    progress: Progress | None = None,
) -> ExportSummary:
    """``export_archive`` of ``images`` whose content is in ``store``."""
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export-", dir=scratch) as folder:
        local = Layout(Path(folder))
        local.create()
        for image in images:
            _copy_image(image, store, local)
        # What is not on S3 is not copied: export_archive says what lacks.
        return export_archive(out, images, local, progress=progress)


def _copy_image(image: ExportImage, store: S3Admin, local: Layout) -> None:
    walked = graph.closure(image.top, store.read, platforms=image.platforms)
    manifests = ManifestStore(local)
    for manifest in walked.manifests:
        manifests.write(manifest)
    for digest in walked.blobs:
        target = local.blob(digest)
        if target.exists():
            continue
        obj = store.blob(digest)
        if obj is None:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        corrupt = store.download(obj, target)
        if corrupt is not None:
            report(corrupt)
            raise ArchiveError(
                f"blob {digest} of {image.ref_name} is corrupt on S3 ({corrupt.detail}); it "
                f"was moved to quarantine: `pullthrough warm {image.ref_name}` fetches it again"
            )


def import_to_s3(
    src: Path, store: S3Admin, scratch: Path, *, progress: Progress | None = None
) -> ImportSummary:
    """``import_archive`` into ``store``. The archive must carry every blob its
    manifests name (``pullthrough export`` writes them all)."""
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="import-", dir=scratch) as folder:
        local = Layout(Path(folder))
        verified = import_archive(src, local, progress=progress)
        summary = ImportSummary(images=verified.images)
        blobs, manifests = [], []
        for kind, digest, path, st in local.walk():
            if kind == "blob":
                blobs.append((digest, path, st.st_size))
            else:
                manifest = ManifestStore(local).read(digest, touch=False)
                assert manifest is not None  # verified and stored by import_archive
                manifests.append(manifest)
        # Image manifests before the indexes that list them.
        manifests.sort(key=lambda m: bool(graph.children(m)))
        sent = 0
        try:
            for digest, path, size in blobs:
                if store.upload(digest, path):
                    sent += 1
                    summary.blobs_added += 1
                    summary.bytes_added += size
                else:
                    summary.blobs_present += 1
            for manifest in manifests:
                if store.read(manifest.digest) is None:
                    store.manifests.write(manifest)
                    summary.manifests_added += 1
                    summary.bytes_added += len(manifest.data)
        except (OSError, ClientError, BotoCoreError) as exc:
            # Blobs sent before the failure are named by no manifest: gc collects them.
            raise ArchiveError(
                f"cannot import {src} into {store.location}: {exc}; {sent} blob(s) were "
                "sent before it failed (`pullthrough gc --delete` removes them)"
            ) from exc
        return summary

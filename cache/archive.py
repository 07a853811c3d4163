"""OCI image layout archives: export what the cache holds, import with verification.

An archive is a tar of an OCI image layout (image-spec ``image-layout.md``):
``oci-layout``, ``index.json`` naming each image (annotation
``org.opencontainers.image.ref.name``), and ``blobs/<alg>/<hex>`` for every
manifest and blob. ``skopeo copy oci-archive:FILE:REF ...`` reads ours, and we
read what ``skopeo copy ... oci-archive:FILE:REF`` writes.

Import trusts nothing: every member is hashed as it is copied into a staging
folder, every manifest's references must be present, and only then does
anything enter the cache; on any failure the staging folder goes and the cache
is as it was.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from cache.digests import Digest
from cache.errors import CacheError, InvalidDigest
from cache.graph import blobs, children, closure
from cache.layout import Layout, fsync_dir
from cache.manifests import ManifestStore, StoredManifest

REF_NAME = "org.opencontainers.image.ref.name"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYOUT_FILE = {"imageLayoutVersion": "1.0.0"}
MAX_DOCUMENT = 4 << 20  # index.json, oci-layout and manifests are read whole
CHUNK = 1 << 20

Progress = Callable[[int], None]


class ArchiveError(CacheError):
    """An archive we will not write or load; the message is for an operator."""


@dataclass(frozen=True)
class ExportImage:
    ref_name: str
    top: StoredManifest
    # None: every child of an index. Otherwise only those platforms (and
    # platform-less children such as attestations); the index itself is
    # exported unchanged, so its digest holds, and other platforms are absent.
    platforms: frozenset[str] | None = None


@dataclass
class ExportSummary:
    images: int
    manifests: int
    blobs: int
    bytes: int


@dataclass
class ImportedImage:
    ref_name: str | None
    digest: Digest
    media_type: str


@dataclass
class ImportSummary:
    images: list[ImportedImage] = field(default_factory=list)
    manifests_added: int = 0
    blobs_added: int = 0
    blobs_present: int = 0
    bytes_added: int = 0


# -- export ---------------------------------------------------------------------------


class _Counting:
    """A file that reports how much was read from it (tarfile only calls read)."""

    def __init__(self, f: IO[bytes], progress: Progress | None) -> None:
        self._f = f
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        if self._progress is not None and data:
            self._progress(len(data))
        return data


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0  # the same content makes the same archive
    return info


def export_archive(
    out: Path, images: Sequence[ExportImage], layout: Layout, *, progress: Progress | None = None
) -> ExportSummary:
    store = ManifestStore(layout)
    manifests: dict[Digest, StoredManifest] = {}
    blob_paths: dict[Digest, Path] = {}
    missing: list[str] = []
    index: list[dict[str, Any]] = []
    for image in images:
        walked = closure(image.top, partial(store.read, touch=False), platforms=image.platforms)
        absent = [str(d) for d in walked.missing_manifests]
        for manifest in walked.manifests:
            manifests[manifest.digest] = manifest
        for digest in walked.blobs:
            path = layout.blob(digest)
            if path.exists():
                blob_paths[digest] = path
            else:
                absent.append(str(digest))
        if absent:
            missing.append(f"{image.ref_name} ({len(absent)} missing: {', '.join(absent[:3])}...)")
        index.append(
            {
                "mediaType": image.top.media_type,
                "digest": str(image.top.digest),
                "size": len(image.top.data),
                "annotations": {REF_NAME: image.ref_name},
            }
        )
    if missing:
        raise ArchiveError(
            "not all of it is cached: " + "; ".join(missing) + " (`pullthrough warm` fetches it)"
        )
    partial_out = out.with_name(out.name + ".partial")
    written = 0
    try:
        with tarfile.open(partial_out, "w", format=tarfile.PAX_FORMAT) as tar:

            def add(name: str, data: bytes) -> None:
                tar.addfile(_info(name, len(data)), io.BytesIO(data))

            add("oci-layout", json.dumps(LAYOUT_FILE).encode())
            for manifest in manifests.values():
                add(f"blobs/{manifest.digest.algorithm}/{manifest.digest.hex}", manifest.data)
                written += len(manifest.data)
            for digest, path in blob_paths.items():
                with path.open("rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    name = f"blobs/{digest.algorithm}/{digest.hex}"
                    tar.addfile(_info(name, size), _Counting(f, progress))
                    written += size
            doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index}
            add("index.json", json.dumps(doc, indent=1).encode())
        partial_out.replace(out)
    except OSError as exc:
        raise ArchiveError(f"cannot write {out}: {exc}") from exc
    finally:
        partial_out.unlink(missing_ok=True)
    return ExportSummary(len(images), len(manifests), len(blob_paths), written)


# -- import ---------------------------------------------------------------------------


def _member_name(raw: str) -> str:
    name = raw.removeprefix("./")
    parts = name.rstrip("/").split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts if name):
        raise ArchiveError(f"refusing archive member {raw!r}: not a plain relative path")
    return name.rstrip("/")


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > MAX_DOCUMENT:
        raise ArchiveError(f"{member.name} is {member.size} bytes; at most {MAX_DOCUMENT}")
    f = tar.extractfile(member)
    assert f is not None  # a regular file
    return f.read()


def _stage(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    digest: Digest,
    staging: Path,
    progress: Progress | None,
) -> Path:
    """Copy a blob out of the archive, hashing it; refuse it if it is not what it claims."""
    source = tar.extractfile(member)
    assert source is not None
    hasher = hashlib.new(digest.algorithm)
    target = staging / f"{digest.algorithm}-{digest.hex}"
    with target.open("wb") as out:
        while chunk := source.read(CHUNK):
            hasher.update(chunk)
            out.write(chunk)
            if progress is not None:
                progress(len(chunk))
    if hasher.hexdigest() != digest.hex:
        raise ArchiveError(
            f"blob {digest} in the archive has content "
            f"{digest.algorithm}:{hasher.hexdigest()}: the archive was altered or damaged"
        )
    return target


def import_archive(src: Path, layout: Layout, *, progress: Progress | None = None) -> ImportSummary:
    layout.create()
    staging = layout.tmp / f"import-{os.urandom(6).hex()}"
    staging.mkdir()
    added: list[Path] = []
    try:
        staged, index_raw = _unpack(src, staging, progress)
        plan = _verify(index_raw, staged, layout)
        summary = ImportSummary(images=plan.images)
        store = ManifestStore(layout)
        for digest, path in staged.items():
            if digest in plan.manifests or digest not in plan.blobs:
                continue  # manifests go to their own store; unreferenced blobs stay out
            target = layout.blob(digest)
            if target.exists():
                summary.blobs_present += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            size = path.stat().st_size
            path.replace(target)
            added.append(target)
            fsync_dir(target.parent)
            summary.blobs_added += 1
            summary.bytes_added += size
        for manifest in plan.manifests.values():
            target = layout.manifest(manifest.digest)
            if not target.exists():
                store.write(manifest)
                added.append(target)
                summary.manifests_added += 1
        return summary
    except BaseException as exc:
        # Nothing of a failed import stays: not even verified content, so
        # "the cache is as it was" holds whatever the failure.
        for path in added:
            path.unlink(missing_ok=True)
        if isinstance(exc, ArchiveError):
            raise
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise ArchiveError(f"disk full while importing {src}; nothing was kept") from exc
        if isinstance(exc, tarfile.TarError | EOFError | OSError):
            raise ArchiveError(f"{src} is damaged or truncated ({exc}); nothing was kept") from exc
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unpack(
    src: Path, staging: Path, progress: Progress | None
) -> tuple[dict[Digest, Path], bytes]:
    staged: dict[Digest, Path] = {}
    index_raw: bytes | None = None
    layout_seen = False
    try:
        tar = tarfile.open(src, "r:")  # noqa: SIM115 - closed below, errors mapped
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"{src} is not a tar archive: {exc}") from exc
    with tar:
        for member in tar:
            name = _member_name(member.name)
            if member.isdir():
                if name not in ("", "blobs") and not (
                    name.startswith("blobs/") and name.count("/") == 1
                ):
                    raise ArchiveError(f"unexpected folder {member.name!r} in the archive")
                continue
            if not member.isfile():
                raise ArchiveError(f"refusing {member.name!r}: not a regular file")
            if name == "oci-layout":
                layout_seen = True
                try:
                    version = json.loads(_read_small(tar, member)).get("imageLayoutVersion")
                except (ValueError, AttributeError):
                    version = None
                if not isinstance(version, str) or not version.startswith("1."):
                    raise ArchiveError("oci-layout is not an OCI image layout 1.x")
            elif name == "index.json":
                index_raw = _read_small(tar, member)
            elif name.startswith("blobs/") and name.count("/") == 2:
                _, algorithm, encoded = name.split("/")
                try:
                    digest = Digest.parse(f"{algorithm}:{encoded}")
                except InvalidDigest as exc:
                    raise ArchiveError(f"{member.name!r} is not named by a digest: {exc}") from None
                if digest in staged:
                    raise ArchiveError(f"{member.name!r} appears twice in the archive")
                staged[digest] = _stage(tar, member, digest, staging, progress)
            else:
                raise ArchiveError(f"unexpected {member.name!r} in the archive")
    if not layout_seen or index_raw is None:
        raise ArchiveError(f"{src} is not an OCI image layout (no oci-layout or index.json)")
    return staged, index_raw


@dataclass
class _Plan:
    images: list[ImportedImage]
    manifests: dict[Digest, StoredManifest]
    blobs: set[Digest]


def _verify(index_raw: bytes, staged: dict[Digest, Path], layout: Layout) -> _Plan:
    """Every manifest reachable from index.json, and everything it needs, is there."""
    try:
        index = json.loads(index_raw)
    except ValueError as exc:
        raise ArchiveError(f"index.json is not JSON: {exc}") from None
    tops = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(tops, list):
        raise ArchiveError("index.json is not an OCI index: it lists no manifests")
    plan = _Plan([], {}, set())
    missing: list[str] = []
    queue: list[tuple[Digest, str]] = []
    for raw in tops:
        try:
            digest = Digest.parse(str(raw["digest"]))
        except (KeyError, TypeError, InvalidDigest) as exc:
            raise ArchiveError(f"index.json lists a bad descriptor: {exc!r}") from None
        annotations = raw.get("annotations") or {}
        ref_name = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
        media_type = str(raw.get("mediaType", ""))
        plan.images.append(ImportedImage(ref_name, digest, media_type))
        queue.append((digest, media_type))
    existing = ManifestStore(layout)
    while queue:
        digest, media_type = queue.pop()
        if digest in plan.manifests:
            continue
        if digest in staged:
            data = staged[digest].read_bytes()
            if len(data) > MAX_DOCUMENT:
                raise ArchiveError(f"manifest {digest} is larger than {MAX_DOCUMENT} bytes")
            manifest = StoredManifest(digest, media_type or _declared(data), data)
        else:
            found = existing.read(digest, touch=False)
            if found is None:
                missing.append(f"manifest {digest}")
                continue
            manifest = found
        plan.manifests[digest] = manifest
        for child in children(manifest):
            queue.append((child.digest, child.media_type))
        for blob in blobs(manifest):
            plan.blobs.add(blob.digest)
            if blob.digest not in staged and not layout.blob(blob.digest).exists():
                missing.append(f"blob {blob.digest}")
    for image in plan.images:
        if not image.media_type and image.digest in plan.manifests:
            image.media_type = plan.manifests[image.digest].media_type
    if missing:
        raise ArchiveError(
            f"the archive is incomplete: {len(missing)} missing ({', '.join(missing[:3])}...)"
        )
    return plan


def _declared(data: bytes) -> str:
    try:
        doc = json.loads(data)
    except ValueError:
        return "application/octet-stream"
    media_type = doc.get("mediaType") if isinstance(doc, dict) else None
    return (
        media_type if isinstance(media_type, str) else "application/vnd.oci.image.manifest.v1+json"
    )

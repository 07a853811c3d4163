"""OCI image layout archives: export what the cache holds, import with verification.

An archive is a plain (uncompressed) tar of an OCI image layout (image-spec
``image-layout.md``)::

    oci-layout          {"imageLayoutVersion": "1.0.0"}
    index.json          an OCI index: one descriptor (mediaType, digest, size) per
                        image, annotated with org.opencontainers.image.ref.name
    blobs/<alg>/<hex>   every manifest's bytes and every config and layer, once

Export with a platform filter keeps an index's bytes unchanged (its digest is
what clients pin) but includes only the children of those platforms, plus
platform-less ones such as attestations, and their blobs. The descriptor in
``index.json`` says so in ``org.pullthrough.platforms``, so that import accepts
the other children being absent. A mirror loaded from such an archive serves
the index whole, but a client asking it for another platform misses: the
mirror fetches that from upstream if it can, and offline the pull fails.

skopeo 1.9 (checked against 1.9.3):

- It reads our archives. In ``oci-archive:FILE:NAME`` the path ends at the
  first ``:``, so NAME may hold ``:`` and ``/``
  (``oci-archive:/x.tar:docker.io/library/ociapp:v1``). But it looks NAME up
  only among descriptors typed as OCI manifest or OCI index: an image whose
  manifest is Docker-typed (schema 2 manifest or manifest list) cannot be
  picked by name, only as ``oci-archive:FILE`` from an archive holding that
  one image. Changing the type would change the digest, so we do not.
- What it writes: directory entries ``blobs/`` and ``blobs/sha256/``, member
  names with no ``./`` prefix, the blobs first and ``index.json`` and
  ``oci-layout`` last. ``index.json`` has no mediaType of its own. Each
  descriptor has mediaType, digest, size and the ref name annotation (the NAME
  given, e.g. ``alpine``). It converts Docker manifests and configs to OCI
  ones, so their digests are not the registry's.

Import trusts nothing in the archive. Each member is checked by name and type,
and each blob is hashed as it is copied into a staging folder
(``tmp/import-<random>/``, locked by its import: the next server start or
import removes it when no live import holds the lock). Every manifest reachable
from ``index.json``, and every blob such a manifest references, must be there. Nothing enters
``blobs/`` or ``manifests/`` until all of it has verified. Any failure removes
the staging folder and whatever had been committed, so the cache is left as it
was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import re
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import CacheError, InvalidDigest
from pullthrough.cache.graph import blobs, children, closure, platform_wanted
from pullthrough.cache.layout import Layout, fsync_dir
from pullthrough.cache.manifests import ManifestStore, StoredManifest
from pullthrough.cache.mediatypes import OCI_INDEX, OCI_MANIFEST, implied, is_media_type
from pullthrough.cache.quarantine import Corrupt, quarantine, report

REF_NAME = "org.opencontainers.image.ref.name"
#: On an index.json descriptor: the image was exported for these platforms only
#: (comma-separated), so children of other platforms are absent on purpose.
PLATFORMS = "org.pullthrough.platforms"
LAYOUT_VERSION = "1.0.0"
MAX_DOCUMENT = 4 << 20  # index.json, oci-layout and manifests are read whole
CHUNK = 1 << 20
STAGING_PREFIX = "import-"
STARTING_PREFIX = "starting-import-"
LOCK_NAME = ".lock"
#: A staging folder still named ``starting-import-*`` this long after it was made
#: was left by an import killed before it could lock it.
ABANDONED_SECONDS = 60.0

Progress = Callable[[int], None]

_ALGORITHM = r"[a-z0-9]+(?:[+._-][a-z0-9]+)*"
_BLOB_DIR = re.compile(rf"^blobs/{_ALGORITHM}$")
_BLOB_FILE = re.compile(rf"^blobs/({_ALGORITHM})/([^/]+)$")
_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
}


class ArchiveError(CacheError):
    """An archive we will not write or load; the message is for an operator."""


@dataclass(frozen=True)
class ExportImage:
    ref_name: str  # goes into org.opencontainers.image.ref.name
    top: StoredManifest  # the tag's manifest: an index or an image manifest
    # None: every child of an index. Otherwise only those platforms (and
    # platform-less children such as attestations); the index itself is
    # exported unchanged, so its digest holds, and other platforms are absent.
    platforms: frozenset[str] | None = None


@dataclass
class ExportSummary:
    images: int
    manifests: int
    blobs: int
    bytes: int  # of manifests and blobs, without the tar's own headers


@dataclass
class ImportedImage:
    ref_name: str | None  # None when index.json gave the image no name
    digest: Digest
    media_type: str


@dataclass
class ImportSummary:
    images: list[ImportedImage] = field(default_factory=list)
    manifests_added: int = 0
    blobs_added: int = 0
    blobs_present: int = 0  # referenced, and already in the cache
    bytes_added: int = 0  # of the manifests and blobs added


class _Meter:
    """Passes byte counts on to a progress callback and keeps their sum."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self.done = 0

    def add(self, n: int) -> None:
        if n > 0:
            self.done += n
            if self._progress is not None:
                self._progress(n)

    def reach(self, position: int) -> None:
        self.add(position - self.done)


def _blob_name(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


def _listing(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _reason(exc: BaseException) -> str:
    """What went wrong, for an operator."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return f"disk full ({exc})"
    if isinstance(exc, tarfile.TarError | EOFError):
        return f"the archive is damaged or truncated ({exc})"
    return str(exc)


# -- export ---------------------------------------------------------------------------


class _Counting:
    """A readable file that reports what is read from it, a MiB at a time
    (tarfile reads 16 KiB at a time and only ever calls read)."""

    def __init__(self, f: IO[bytes], meter: _Meter, digest: Digest) -> None:
        self._f = f
        self._meter = meter
        self._pending = 0
        self.hasher = digest.hasher()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.hasher.update(data)
        self._pending += len(data)
        if self._pending >= CHUNK:
            self.flush()
        return data

    def flush(self) -> None:
        self._meter.add(self._pending)
        self._pending = 0


@dataclass
class _ExportPlan:
    index: list[dict[str, Any]] = field(default_factory=list)
    manifests: dict[Digest, StoredManifest] = field(default_factory=dict)
    blobs: dict[Digest, int] = field(default_factory=dict)  # digest -> size on disk
    owner: dict[Digest, str] = field(default_factory=dict)  # digest -> a ref name needing it


def export_archive(
    out: Path, images: Sequence[ExportImage], layout: Layout, *, progress: Progress | None = None
) -> ExportSummary:
    """Write ``images`` with all they need from ``layout`` to the tar ``out``.

    Everything is checked to be in the cache before a byte is written; the tar
    is written to ``<out>.partial`` and renamed to ``out`` once complete.
    """
    try:
        plan = _plan_export(images, layout)
    except ArchiveError as exc:
        raise ArchiveError(f"cannot export to {out}: {exc}") from None
    partial_out = out.with_name(out.name + ".partial")
    meter = _Meter(progress)
    written = 0
    try:
        with partial_out.open("wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:

                def add(name: str, data: bytes, counted: bool = True) -> None:
                    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
                    if counted:
                        meter.add(len(data))

                # index.json first: a reader streaming the tar learns what to expect.
                layout_doc = {"imageLayoutVersion": LAYOUT_VERSION}
                add("oci-layout", json.dumps(layout_doc).encode(), counted=False)
                index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": plan.index}
                add("index.json", json.dumps(index, indent=2).encode() + b"\n", counted=False)
                for manifest in plan.manifests.values():
                    add(_blob_name(manifest.digest), manifest.data)
                    written += len(manifest.data)
                for digest, size in plan.blobs.items():
                    written += _add_blob(tar, layout, digest, size, plan.owner[digest], meter)
            f.flush()
            os.fsync(f.fileno())
        partial_out.replace(out)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            partial_out.unlink(missing_ok=True)
        if not isinstance(exc, OSError | CacheError):
            raise
        raise ArchiveError(f"cannot write {out}: {_reason(exc)}") from exc
    with contextlib.suppress(OSError):
        fsync_dir(out.parent)
    return ExportSummary(len(plan.index), len(plan.manifests), len(plan.blobs), written)


def _plan_export(images: Sequence[ExportImage], layout: Layout) -> _ExportPlan:
    if not images:
        raise ArchiveError("no images to export")
    load = partial(ManifestStore(layout).read, touch=False)
    plan = _ExportPlan()
    named: dict[str, Digest] = {}
    incomplete: list[str] = []
    to_warm: list[ExportImage] = []
    for image in images:
        top = image.top
        if Digest.of(top.data, top.digest.algorithm) != top.digest:
            raise ArchiveError(f"{image.ref_name}: the manifest given is not {top.digest}")
        if image.ref_name in named:
            if named[image.ref_name] != top.digest:
                raise ArchiveError(f"{image.ref_name} is given twice, as different images")
            continue
        named[image.ref_name] = top.digest
        _check_platforms(image)
        walked = closure(top, load, platforms=image.platforms)
        missing = [f"manifest {d}" for d in walked.missing_manifests]
        for manifest in walked.manifests:
            plan.manifests.setdefault(manifest.digest, manifest)
        for digest, declared in walked.blobs.items():
            if digest in plan.blobs:
                continue
            try:
                size = layout.blob(digest).stat().st_size
            except FileNotFoundError:
                missing.append(f"blob {digest}")
                continue
            if declared is not None and declared != size:
                raise ArchiveError(
                    f"cannot export {image.ref_name}: the cached blob {digest} is {size} bytes "
                    f"but its manifest says {declared}; remove it and `pullthrough warm` again"
                )
            plan.blobs[digest] = size
            plan.owner[digest] = image.ref_name
        if missing:
            incomplete.append(f"{image.ref_name} lacks {len(missing)}: {_listing(missing)}")
            to_warm.append(image)
            continue
        annotations = {REF_NAME: image.ref_name}
        if image.platforms is not None and children(top):
            annotations[PLATFORMS] = ",".join(sorted(image.platforms))
        plan.index.append(
            {
                "mediaType": top.media_type,
                "digest": str(top.digest),
                "size": len(top.data),
                "annotations": annotations,
            }
        )
    if incomplete:
        raise ArchiveError(
            "not all of it is in the cache: "
            + "; ".join(incomplete)
            + f". `{_warm_command(to_warm)}` fetches it"
        )
    for digest in plan.manifests:  # the same bytes under one name, once
        plan.blobs.pop(digest, None)
    return plan


def _check_platforms(image: ExportImage) -> None:
    if image.platforms is None:
        return
    platformed = [
        c
        for c in children(image.top)
        if c.platform is not None and not c.platform.startswith("unknown/")
    ]
    if platformed and not any(platform_wanted(c, image.platforms) for c in platformed):
        offered = sorted({c.platform for c in platformed if c.platform})
        raise ArchiveError(
            f"{image.ref_name} has no image for {', '.join(sorted(image.platforms))}; "
            f"it has {', '.join(offered)}"
        )


def _warm_command(images: Sequence[ExportImage]) -> str:
    words = ["pullthrough", "warm"]
    if all(i.platforms is not None for i in images):
        for platform in sorted({p for i in images for p in i.platforms or ()}):
            words += ["--platform", platform]
    return " ".join([*words, *(i.ref_name for i in images)])


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0  # the same images make the same archive
    return info


def _add_blob(
    tar: tarfile.TarFile, layout: Layout, digest: Digest, size: int, owner: str, meter: _Meter
) -> int:
    """Stream one blob from the cache into the tar, hashing it; returns its size.

    Blobs were verified when downloaded, but a disk can rot since: an archive
    must never carry bytes that fail their digest (the importer would refuse the
    whole archive, maybe far away and much later).
    """
    path = layout.blob(digest)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise ArchiveError(
            f"blob {digest} of {owner} left the cache while it was being exported "
            "(evicted?); pin the image or retry"
        ) from None
    with f:
        st = os.fstat(f.fileno())
        if st.st_size != size:
            raise ArchiveError(f"blob {digest} of {owner} changed while it was being exported")
        counting = _Counting(f, meter, digest)
        tar.addfile(_tarinfo(_blob_name(digest), size), counting)
        counting.flush()
    actual = f"{digest.algorithm}:{counting.hasher.hexdigest()}"
    if actual != str(digest):
        moved = quarantine(layout, "blob", digest, path, st.st_ino)
        found = Corrupt("blob", digest, f"content hashes to {actual}", moved)
        report(found)
        raise ArchiveError(
            f"blob {digest} of {owner} is corrupt in the cache ({found.detail}); it was "
            f"moved to quarantine: `pullthrough warm {owner}` fetches it again"
        )
    return size


# -- import ---------------------------------------------------------------------------


@dataclass
class _Ref:
    """A manifest as something names it: index.json or a parent index."""

    digest: Digest
    media_type: str
    size: int | None
    named_by: str
    platforms: frozenset[str] | None  # children wanted, for an image exported filtered


@dataclass
class _Top:
    ref: _Ref
    ref_name: str | None


@dataclass
class _Staged:
    index: bytes
    blobs: dict[Digest, Path]  # every blobs/ member, hashed and verified


@dataclass
class _ImportPlan:
    images: list[ImportedImage]
    manifests: list[StoredManifest]  # children before the indexes naming them
    blobs: list[Digest]  # configs and layers, each once


def import_archive(src: Path, layout: Layout, *, progress: Progress | None = None) -> ImportSummary:
    """Verify the OCI layout tar ``src`` and add what it holds to ``layout``.

    All or nothing: on any failure an ArchiveError is raised and the cache is as
    it was. The images named in ``index.json`` are returned for tagging.
    """
    try:
        layout.create()
        remove_abandoned_imports(layout)
        with _staging(layout) as staging:
            staged = _unpack(src, staging, _Meter(progress))
            plan = _verify(staged, layout)
            return _commit(plan, staged, layout)
    except (OSError, tarfile.TarError, EOFError, CacheError) as exc:
        raise ArchiveError(f"cannot import {src}: {_reason(exc)}; nothing was kept") from exc


@contextlib.contextmanager
def _staging(layout: Layout) -> Iterator[Path]:
    """A fresh folder under tmp/, locked while this import runs, removed after.

    It is made as ``starting-import-*``, locked, and only then renamed to
    ``import-*``: so an ``import-*`` folder whose lock is free is dead, at once,
    with no guess at how long an import takes to lock its folder.
    """
    name = os.urandom(8).hex()
    starting = layout.tmp / f"{STARTING_PREFIX}{name}"
    path = layout.tmp / f"{STAGING_PREFIX}{name}"
    starting.mkdir()
    try:
        fd = os.open(starting / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except BaseException:
        shutil.rmtree(starting, ignore_errors=True)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held by the open file, across the rename
        starting.rename(path)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(starting, ignore_errors=True)
        os.close(fd)


def remove_abandoned_imports(layout: Layout) -> int:
    """Remove the staging folders of imports that were killed; returns how many.

    An ``import-*`` folder goes when no import holds its lock (a live import
    holds it from before the folder has that name until it is removed). A
    ``starting-import-*`` folder is one an import was killed in the instant
    between making and locking it: it goes once it is ``ABANDONED_SECONDS`` old.
    Server start-up, every import and ``gc --delete`` call this.
    """
    removed = 0
    now = time.time()
    for path in layout.tmp.glob(f"{STARTING_PREFIX}*"):
        with contextlib.suppress(OSError):
            old = now - path.stat().st_mtime > ABANDONED_SECONDS
            if old and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
    for path in layout.tmp.glob(f"{STAGING_PREFIX}*"):
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if not path.exists():
                continue  # finished meanwhile
            shutil.rmtree(path, ignore_errors=True)  # never locked: not one of ours alive
            removed += 1
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live import, in this or another process
        finally:
            os.close(fd)  # closing drops the lock if we got it; the folder is dead
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def read_ref_names(src: Path) -> list[str | None]:
    """The image names in an archive's index.json, without staging anything (to
    choose the store to import into). Empty when it cannot be read: the import
    itself then says why."""
    try:
        with src.open("rb") as f, _open_tar(f) as tar:
            for member in tar:
                if member.isreg() and _member_name(member) == "index.json":
                    data = _read_document(tar, member, _Meter(None))
                    return [top.ref_name for top in _parse_index(data)]
    except (OSError, tarfile.TarError, EOFError, CacheError):
        pass
    return []


def _member_name(member: tarfile.TarInfo) -> str:
    """The member's path relative to the layout root, or ArchiveError."""
    raw = member.name
    name = raw.rstrip("/")
    if name == ".":
        return ""
    name = name.removeprefix("./")
    parts = name.split("/") if name else []
    if raw.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ArchiveError(f"refusing archive member {raw!r}: not a plain relative path")
    if "\\" in name or any(ord(c) < 0x20 for c in name):
        raise ArchiveError(f"refusing archive member {raw!r}: not a plain relative path")
    return name


def _read_document(tar: tarfile.TarFile, member: tarfile.TarInfo, meter: _Meter) -> bytes:
    if member.size > MAX_DOCUMENT:
        raise ArchiveError(f"{member.name} is {member.size} bytes; at most {MAX_DOCUMENT} allowed")
    f = tar.extractfile(member)
    assert f is not None  # a regular file
    data = f.read()
    meter.add(len(data))
    return data


def _stage_blob(
    tar: tarfile.TarFile, member: tarfile.TarInfo, digest: Digest, target: Path, meter: _Meter
) -> None:
    """Copy a blob out of the archive, hashing it; refuse it if it is not what it claims."""
    source = tar.extractfile(member)
    assert source is not None
    hasher = digest.hasher()
    with target.open("xb") as out:
        while chunk := source.read(CHUNK):
            hasher.update(chunk)
            out.write(chunk)
            meter.add(len(chunk))
    actual = hasher.hexdigest()
    if actual != digest.hex:
        raise ArchiveError(
            f"blob {digest} in the archive has content {digest.algorithm}:{actual}: "
            "the archive was altered or damaged"
        )


def _unpack(src: Path, staging: Path, meter: _Meter) -> _Staged:
    """Check every member and stage every blob; returns index.json's bytes too."""
    try:
        f = src.open("rb")
    except OSError as exc:
        raise ArchiveError(f"cannot read it: {exc.strerror or exc}") from exc
    with f:
        head = f.read(8)
        for magic, kind in _COMPRESSED.items():
            if head.startswith(magic):
                raise ArchiveError(
                    f"it is {kind}-compressed; import takes a plain tar (decompress it first)"
                )
        f.seek(0)
        tar = _open_tar(f)
        staged: dict[Digest, Path] = {}
        documents: dict[str, bytes] = {}
        seen: set[str] = set()
        with tar:
            for member in tar:
                _unpack_member(tar, member, staging, staged, documents, seen, meter)
                meter.reach(tar.offset)
            # tarfile takes a missing end-of-archive marker, or a header it
            # cannot parse, for the end: a tar cut at a member boundary or
            # damaged in a header would otherwise look whole.
            f.seek(tar.offset)
            end = f.read(tarfile.BLOCKSIZE)
            if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                raise ArchiveError(
                    "the archive is damaged or truncated: no end-of-archive marker at byte "
                    f"{tar.offset}"
                )
            meter.reach(os.fstat(f.fileno()).st_size)
    if "oci-layout" not in documents or "index.json" not in documents:
        raise ArchiveError("not an OCI image layout: it has no oci-layout or index.json")
    try:
        version = json.loads(documents["oci-layout"]).get("imageLayoutVersion")
    except (ValueError, AttributeError):
        version = None
    if not isinstance(version, str) or not version.startswith("1."):
        raise ArchiveError("oci-layout does not declare an OCI image layout 1.x")
    return _Staged(documents["index.json"], staged)


def _open_tar(f: IO[bytes]) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=f, mode="r:")
    except tarfile.ReadError as exc:
        raise ArchiveError(f"not a tar archive ({exc})") from exc


def _unpack_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    staging: Path,
    staged: dict[Digest, Path],
    documents: dict[str, bytes],
    seen: set[str],
    meter: _Meter,
) -> None:
    name = _member_name(member)
    if member.isdir():
        if name not in ("", "blobs") and not _BLOB_DIR.match(name):
            raise ArchiveError(f"unexpected folder {member.name!r} in the archive")
        return
    if not member.isreg():
        kind = _KINDS.get(member.type, f"of tar type {member.type!r}")
        raise ArchiveError(f"refusing archive member {member.name!r}: {kind}, not a regular file")
    if name in seen:
        raise ArchiveError(f"archive member {member.name!r} appears twice")
    seen.add(name)
    if name in ("oci-layout", "index.json"):
        documents[name] = _read_document(tar, member, meter)
        return
    match = _BLOB_FILE.match(name)
    if match is None:
        raise ArchiveError(f"unexpected archive member {member.name!r}: not part of an OCI layout")
    try:
        digest = Digest.parse(f"{match[1]}:{match[2]}")
    except InvalidDigest as exc:
        raise ArchiveError(
            f"archive member {member.name!r} is not named by a digest: {exc}"
        ) from None
    target = staging / f"{digest.algorithm}-{digest.hex}"
    _stage_blob(tar, member, digest, target, meter)
    staged[digest] = target


def _verify(staged: _Staged, layout: Layout) -> _ImportPlan:
    """Every manifest reachable from index.json, and everything it needs, is there."""
    tops = _parse_index(staged.index)
    found: dict[Digest, StoredManifest] = {}
    order: list[StoredManifest] = []
    needed: dict[Digest, None] = {}
    missing: list[str] = []
    stack = [top.ref for top in reversed(tops)]
    while stack:
        ref = stack.pop()
        if ref.digest in found:
            continue
        path = staged.blobs.get(ref.digest)
        if path is None:
            missing.append(f"manifest {ref.digest} ({ref.named_by})")
            continue
        manifest = _load_manifest(ref, path)
        found[ref.digest] = manifest
        order.append(manifest)
        for blob in blobs(manifest):
            if blob.digest in staged.blobs:
                _check_size(blob.digest, blob.size, staged.blobs[blob.digest])
            elif not layout.blob(blob.digest).exists():
                missing.append(f"blob {blob.digest} (of manifest {ref.digest})")
                continue
            needed[blob.digest] = None
        for child in reversed(children(manifest)):
            if (
                ref.platforms is not None
                and not platform_wanted(child, ref.platforms)
                and child.digest not in staged.blobs
            ):
                continue  # exported for other platforms only; absent on purpose
            stack.append(
                _Ref(
                    child.digest,
                    child.media_type,
                    child.size,
                    f"listed by {ref.digest}",
                    ref.platforms,
                )
            )
    if missing:
        raise ArchiveError(
            f"the archive is incomplete, {len(missing)} missing: {_listing(missing)}"
        )
    images = [
        ImportedImage(top.ref_name, top.ref.digest, found[top.ref.digest].media_type)
        for top in tops
    ]
    # Children first, so no index is ever stored before what it lists.
    return _ImportPlan(images, order[::-1], list(needed))


def _parse_index(raw: bytes) -> list[_Top]:
    try:
        index = json.loads(raw)
    except ValueError as exc:
        raise ArchiveError(f"index.json is not JSON: {exc}") from None
    listed = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(listed, list):
        raise ArchiveError("index.json is not an OCI index: it has no list of manifests")
    tops = []
    for i, entry in enumerate(listed):
        where = f"index.json manifests[{i}]"
        if not isinstance(entry, dict):
            raise ArchiveError(f"{where} is not a descriptor")
        try:
            digest = Digest.parse(str(entry.get("digest", "")))
        except InvalidDigest as exc:
            raise ArchiveError(f"{where}: {exc}") from None
        media_type = entry.get("mediaType", "")
        size = entry.get("size")
        annotations = entry.get("annotations", {})
        if not isinstance(media_type, str):
            raise ArchiveError(f"{where}: mediaType is not a string")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
            raise ArchiveError(f"{where}: size is not a number")
        if not isinstance(annotations, dict):
            raise ArchiveError(f"{where}: annotations is not an object")
        ref_name = annotations.get(REF_NAME)
        if ref_name is not None and (not isinstance(ref_name, str) or not ref_name):
            raise ArchiveError(f"{where}: {REF_NAME} is not a name")
        platforms = annotations.get(PLATFORMS)
        wanted = None
        if isinstance(platforms, str) and platforms:
            wanted = frozenset(p.strip() for p in platforms.split(",") if p.strip())
        named_by = f"named {ref_name!r} in index.json" if ref_name else where
        tops.append(_Top(_Ref(digest, media_type, size, named_by, wanted), ref_name))
    return tops


def _load_manifest(ref: _Ref, path: Path) -> StoredManifest:
    size = _check_size(ref.digest, ref.size, path)
    if size > MAX_DOCUMENT:
        raise ArchiveError(f"manifest {ref.digest} is {size} bytes; at most {MAX_DOCUMENT} allowed")
    data = path.read_bytes()
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise ArchiveError(f"{ref.digest} ({ref.named_by}) is not a manifest: not a JSON object")
    media_type = ref.media_type or _declared_type(doc)
    if not is_media_type(media_type):
        raise ArchiveError(f"manifest {ref.digest} has an invalid media type {media_type!r}")
    return StoredManifest(ref.digest, media_type, data)


def _check_size(digest: Digest, declared: int | None, path: Path) -> int:
    size = path.stat().st_size
    if declared is not None and declared != size:
        raise ArchiveError(
            f"{digest} in the archive is {size} bytes but is described as {declared}; "
            "the archive was altered or damaged"
        )
    return size


def _declared_type(doc: dict[str, Any]) -> str:
    """A manifest's media type when no descriptor gave one."""
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    return implied(doc) or OCI_MANIFEST


def _commit(plan: _ImportPlan, staged: _Staged, layout: Layout) -> ImportSummary:
    """Move verified blobs into place, then store the manifests; undo all on failure."""
    summary = ImportSummary(images=plan.images)
    added: list[Path] = []
    made: list[Path] = []  # folders created, to remove again if we fail
    synced: set[Path] = set()
    now = time.time()
    try:
        for digest in plan.blobs:
            target = layout.blob(digest)
            if target.exists():
                summary.blobs_present += 1
                with contextlib.suppress(FileNotFoundError):
                    os.utime(target, (now, now))  # a use, for eviction
                continue
            source = _staged_blob(staged, digest)
            with source.open("rb") as f:
                os.fsync(f.fileno())
                size = os.fstat(f.fileno()).st_size
            for folder in (target.parent.parent, target.parent):
                if not folder.is_dir():
                    folder.mkdir()
                    made.append(folder)
                    synced.add(folder.parent)
            source.replace(target)
            added.append(target)
            synced.add(target.parent)
            # Staged maybe long ago: committed now is the last use eviction sees.
            os.utime(target, (now, now))
            summary.blobs_added += 1
            summary.bytes_added += size
        for folder in sorted(synced, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(folder)
        store = ManifestStore(layout)
        for manifest in plan.manifests:
            target = layout.manifest(manifest.digest)
            if target.exists():
                continue
            for folder in (target.parent.parent, target.parent):
                if not folder.is_dir():
                    folder.mkdir()
                    made.append(folder)
            store.write(manifest)
            added.append(target)
            summary.manifests_added += 1
            summary.bytes_added += len(manifest.data)
    except BaseException:
        for path in reversed(added):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: someone else may have used it meanwhile
        raise
    return summary


def _staged_blob(staged: _Staged, digest: Digest) -> Path:
    source = staged.blobs.get(digest)
    if source is None:  # it was in the cache when verified, and was evicted since
        raise ArchiveError(f"blob {digest} left the cache during the import; retry")
    return source

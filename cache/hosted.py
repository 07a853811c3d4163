"""Hosted repositories: which blobs, manifests and tags each one holds.

Content lives in the shared content-addressed store (``blobs/``, ``manifests/``);
a repository only records links to it, so a layer pushed to two repositories,
or also pulled from the upstream, is stored once::

    <root>/hosted/<repository>/_blobs/<algorithm>/<hex>      pushed or mounted here
    <root>/hosted/<repository>/_manifests/<algorithm>/<hex>  pushed here
    <root>/hosted/<repository>/_tags/<tag>                   the digest the tag names
    <root>/hosted/gc.lock                                    flock: pushes share it, a
                                                             garbage collection holds it
                                                             alone

Repository names are checked against the distribution-spec grammar before they
get here: their components start with a letter or digit, so they cannot climb
out of the folder nor meet the ``_`` folders.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import CacheError, InvalidDigest
from pullthrough.cache.layout import Layout, write_atomic
from pullthrough.cache.manifests import StoredManifest
from pullthrough.cache.mediatypes import MANIFESTS, implied, is_media_type

# distribution's limit for a manifest PUT.
MAX_MANIFEST_BYTES = 4 << 20


class ManifestInvalid(CacheError):
    """A manifest that is not JSON, or whose media type is missing or contradicts it."""


class ManifestBlobUnknown(CacheError):
    def __init__(self, digest: str) -> None:
        super().__init__(f"manifest references {digest}, which is not in the repository")
        self.digest = digest


@dataclass(frozen=True, slots=True)
class Checked:
    """A manifest accepted for a PUT, and what it refers to."""

    manifest: StoredManifest
    blobs: tuple[Digest, ...]
    manifests: tuple[Digest, ...]
    subject: Digest | None
    artifact_type: str | None


def check_manifest(data: bytes, content_type: str) -> Checked:
    """Parse a pushed manifest: JSON, a media type that agrees with the body, and
    well-formed descriptors. Whether what it references exists is the caller's."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(f"manifests are limited to {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ManifestInvalid("not JSON") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid("not a JSON object")
    declared = doc.get("mediaType")
    media_type = content_type.split(";")[0].strip() or (
        declared if isinstance(declared, str) else implied(doc) or ""
    )
    if declared is not None and declared != media_type:
        raise ManifestInvalid(f"mediaType {declared!r} but sent as {media_type!r}")
    if not is_media_type(media_type) or media_type not in MANIFESTS:
        raise ManifestInvalid(f"unsupported manifest media type {media_type!r}")
    if doc.get("schemaVersion") != 2:
        raise ManifestInvalid("schemaVersion must be 2")
    blobs: list[Digest] = []
    children: list[Digest] = []
    if "manifests" in doc:
        children = [_descriptor(d) for d in _list(doc, "manifests")]
    else:
        blobs = [_descriptor(doc.get("config")), *(_descriptor(d) for d in _list(doc, "layers"))]
    subject = _descriptor(doc["subject"]) if "subject" in doc else None
    artifact = doc.get("artifactType")
    if artifact is None and isinstance(doc.get("config"), dict):
        artifact = doc["config"].get("mediaType")
    return Checked(
        StoredManifest(Digest.of(data), media_type, data),
        tuple(blobs),
        tuple(children),
        subject,
        artifact if isinstance(artifact, str) else None,
    )


def _list(doc: dict[str, object], key: str) -> list[object]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise ManifestInvalid(f"{key} must be a list")
    return value


def _descriptor(raw: object) -> Digest:
    if not isinstance(raw, dict) or not isinstance(raw.get("digest"), str):
        raise ManifestInvalid("a descriptor without a digest")
    if not isinstance(raw.get("size"), int) or raw["size"] < 0:
        raise ManifestInvalid("a descriptor without a valid size")
    try:
        return Digest.parse(raw["digest"])
    except InvalidDigest as exc:
        raise ManifestInvalid(str(exc)) from None


@dataclass
class Collection:
    """What one garbage collection did."""

    unlinked: int = 0  # blob links no manifest of their repository references
    removed: list[Digest] = field(default_factory=list)  # blob files deleted
    kept: int = 0  # blobs still linked somewhere


class HostedRepositories:
    """The links of every hosted repository (blocking calls: run them off the loop)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.root = layout.root / "hosted"
        self.root.mkdir(parents=True, exist_ok=True)

    def _repo(self, repository: str) -> Path:
        return self.root / repository

    def _link(self, repository: str, kind: str, digest: Digest) -> Path:
        return self._repo(repository) / f"_{kind}" / digest.algorithm / digest.hex

    def link(self, repository: str, kind: str, digest: Digest) -> None:
        path = self._link(repository, kind, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def has(self, repository: str, kind: str, digest: Digest) -> bool:
        """Linked here and still in the store."""
        if not self._link(repository, kind, digest).exists():
            return False
        store = self.layout.blob if kind == "blobs" else self.layout.manifest
        return store(digest).exists()

    def unlink(self, repository: str, kind: str, digest: Digest) -> bool:
        try:
            self._link(repository, kind, digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def tag(self, repository: str, tag: str, digest: Digest) -> None:
        write_atomic(self._repo(repository) / "_tags" / tag, self.layout.tmp, str(digest).encode())

    def resolve(self, repository: str, tag: str) -> Digest | None:
        try:
            text = (self._repo(repository) / "_tags" / tag).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return Digest.parse(text)

    def untag(self, repository: str, tag: str) -> bool:
        try:
            (self._repo(repository) / "_tags" / tag).unlink()
        except FileNotFoundError:
            return False
        return True

    def tags(self, repository: str) -> list[str] | None:
        """Sorted tags; None for a repository nobody pushed to."""
        if not self._repo(repository).is_dir():
            return None
        folder = self._repo(repository) / "_tags"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def untag_digest(self, repository: str, digest: Digest) -> None:
        """Remove every tag naming ``digest`` (its manifest is being deleted)."""
        for tag in self.tags(repository) or []:
            if self.resolve(repository, tag) == digest:
                self.untag(repository, tag)

    def repositories(self) -> list[str]:
        """Every hosted repository, sorted."""
        found = []
        for folder, dirs, _ in os.walk(self.root):
            if any(d.startswith("_") for d in dirs):
                found.append(Path(folder).relative_to(self.root).as_posix())
            dirs[:] = [d for d in dirs if not d.startswith("_")]
        return sorted(found)

    def manifests(self, repository: str) -> Iterator[Digest]:
        folder = self._repo(repository) / "_manifests"
        for algorithm in folder.iterdir() if folder.is_dir() else ():
            for path in algorithm.iterdir():
                yield Digest(algorithm.name, path.name)

    def referenced(self) -> set[Digest]:
        """Every blob and manifest some hosted repository links: never evicted."""
        keep: set[Digest] = set()
        for folder, dirs, _ in os.walk(self.root):
            base = Path(folder)
            if base.parent.name in ("_blobs", "_manifests"):
                keep.update(Digest(base.name, p.name) for p in base.iterdir())
            dirs[:] = [d for d in dirs if d != "_tags"]
        return keep

    def usage(self) -> tuple[int, int, int, int]:
        """(bytes, blobs, manifests, repositories) the hosted repositories hold, each
        blob and manifest counted once however many link it; walks the links, so
        not for hot paths."""
        repositories = 0
        linked: dict[str, set[Digest]] = {"_blobs": set(), "_manifests": set()}
        for folder, dirs, _ in os.walk(self.root):
            base = Path(folder)
            if not base.name.startswith("_") and any(d.startswith("_") for d in dirs):
                repositories += 1
            if base.parent.name in linked:
                with contextlib.suppress(FileNotFoundError):  # a repository deleted meanwhile
                    linked[base.parent.name].update(
                        Digest(base.name, p.name) for p in base.iterdir()
                    )
            dirs[:] = [d for d in dirs if d != "_tags"]
        size = 0
        for kind, store in (("_blobs", self.layout.blob), ("_manifests", self.layout.manifest)):
            for digest in linked[kind]:
                with contextlib.suppress(FileNotFoundError):  # collected meanwhile
                    size += store(digest).stat().st_size
        return size, len(linked["_blobs"]), len(linked["_manifests"]), repositories

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        fd = os.open(self.root / "gc.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock

    def pushing(self) -> contextlib.AbstractContextManager[None]:
        """Held (shared, across processes) around each step of a push that
        relies on a blob staying: committing an upload and linking it, checking
        a manifest's references and linking it. A collection waits for them."""
        return self._locked(fcntl.LOCK_SH)

    def collect(
        self, grace: float, *, protected: frozenset[Digest] = frozenset(), now: float | None = None
    ) -> Collection:
        """Unlink every blob no manifest of its repository references, then delete
        the blob files no repository links any more (blocking).

        A blob linked less than ``grace`` seconds ago is kept: it was just pushed
        and the manifest naming it may be on its way. Blobs still uploading live
        under ``uploads/`` and are never seen here. ``protected`` blobs (a pinned
        image's, which may share a pushed layer) lose their links, never their file.
        """
        now = time.time() if now is None else now
        result = Collection()
        with self._locked(fcntl.LOCK_EX):
            candidates: set[Digest] = set()
            for repository in self.repositories():
                referenced: set[Digest] = set()
                for digest in self.manifests(repository):
                    try:
                        data = self.layout.manifest(digest).read_bytes()
                    except FileNotFoundError:
                        continue
                    # The store's record: a line with the media type, then the bytes.
                    media_type, _, body = data.partition(b"\n")
                    with contextlib.suppress(ManifestInvalid):
                        referenced.update(check_manifest(body, media_type.decode()).blobs)
                for digest, path in self._blob_links(repository):
                    if digest in referenced:
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        if now - path.stat().st_mtime < grace:
                            continue
                        path.unlink()
                        result.unlinked += 1
                        candidates.add(digest)
            still = self.referenced()
            for digest in sorted(candidates, key=str):
                if digest in still or digest in protected:
                    result.kept += 1
                    continue
                with contextlib.suppress(FileNotFoundError):
                    self.layout.blob(digest).unlink()
                    result.removed.append(digest)
        return result

    def _blob_links(self, repository: str) -> list[tuple[Digest, Path]]:
        folder = self._repo(repository) / "_blobs"
        return [
            (Digest(algorithm.name, path.name), path)
            for algorithm in (folder.iterdir() if folder.is_dir() else ())
            for path in algorithm.iterdir()
        ]

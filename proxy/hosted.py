"""Hosted repositories: what a push, a pull, a delete and a listing of them mean.

The HTTP handlers (``push_routes.py``) only render what this answers. Content
goes to the shared content-addressed store; ``cache/hosted.py`` records which
repository holds what, ``cache/uploads.py`` the uploads in progress.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import DigestMismatch
from pullthrough.cache.hosted import (
    Checked,
    Collection,
    HostedRepositories,
    ManifestBlobUnknown,
    ManifestInvalid,
    check_manifest,
)
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore, StoredManifest
from pullthrough.cache.mediatypes import OCI_INDEX
from pullthrough.cache.uploads import UploadStore
from pullthrough.proxy.config import Settings
from pullthrough.proxy.errors import BlobUnknown, ManifestUnknown, NameUnknown
from pullthrough.proxy.names import Reference

log = logging.getLogger(__name__)

# The name access rules give hosted repositories in their `upstream` field.
HOSTED = "hosted"


@dataclass(frozen=True, slots=True)
class Page:
    items: list[str]
    more: bool  # entries follow the last one given


def page(items: list[str], n: int | None, last: str | None) -> Page:
    """A sorted list's page after ``last``, at most ``n`` long."""
    if last is not None:
        items = [i for i in items if i > last]
    if n is None or len(items) <= n:
        return Page(items, more=False)
    return Page(items[:n], more=True)


class Hosted:
    def __init__(self, settings: Settings, layout: Layout, manifests: ManifestStore) -> None:
        self.prefixes = settings.hosted
        self.delete_enabled = settings.delete_enabled
        self.open_push = settings.open_push
        self.layout = layout
        self.repos = HostedRepositories(layout)
        self.uploads = UploadStore(
            layout, max_size=settings.max_upload_size, expiry=settings.upload_expiry
        )
        self.manifests = manifests
        # Manifest PUTs in flight, by repository: a GC must not remove what they name.
        self.pushes = 0

    def holds(self, name: str) -> bool:
        return any(name.startswith(p) for p in self.prefixes)

    async def upload(
        self, upload: str, repository: str, chunks: AsyncIterator[bytes], start: int | None
    ) -> int:
        return await self.uploads.append(upload, repository, chunks, start)

    async def finish_upload(self, upload: str, repository: str, digest: Digest) -> int:
        """Commit the upload as ``digest`` and link it here; its size."""

        def commit() -> int:
            with self.repos.pushing():
                size = self.uploads.commit(upload, repository, digest)
                self.repos.link(repository, "blobs", digest)
                return size

        return await asyncio.to_thread(commit)

    async def mount(self, repository: str, source: str, digest: Digest) -> bool:
        """Link a blob another hosted repository holds; False when it does not."""
        if not self.holds(source):
            return False

        def mount() -> bool:
            with self.repos.pushing():
                if not self.repos.has(source, "blobs", digest):
                    return False
                self.repos.link(repository, "blobs", digest)
                return True

        return await asyncio.to_thread(mount)

    async def blob_size(self, repository: str, digest: Digest) -> int:
        def size() -> int | None:
            if not self.repos.has(repository, "blobs", digest):
                return None
            try:
                return self.layout.blob(digest).stat().st_size
            except FileNotFoundError:
                return None

        found = await asyncio.to_thread(size)
        if found is None:
            raise BlobUnknown(str(digest))
        return found

    async def put_manifest(
        self, repository: str, reference: Reference, data: bytes, content_type: str
    ) -> Checked:
        """Validate and store a manifest, then tag it; what it references must be here."""
        checked = check_manifest(data, content_type)
        digest = checked.manifest.digest
        if reference.digest is not None and reference.digest != digest:
            raise DigestMismatch(str(reference.digest), str(digest))

        def store() -> None:
            # Checked and linked under the push lock: a garbage collection
            # cannot take a blob between the check and the link.
            with self.repos.pushing():
                for blob in checked.blobs:
                    if not self.repos.has(repository, "blobs", blob):
                        raise ManifestBlobUnknown(str(blob))
                for child in checked.manifests:
                    if not self.repos.has(repository, "manifests", child):
                        raise ManifestBlobUnknown(str(child))
                # Written, not put: a pushed manifest must be on disk (a full
                # disk fails the push) since it is the only copy.
                self.manifests.write(checked.manifest)
                self.repos.link(repository, "manifests", digest)
                if reference.tag is not None:
                    self.repos.tag(repository, reference.tag, digest)

        await asyncio.to_thread(store)
        return checked

    async def manifest(self, repository: str, reference: Reference) -> StoredManifest:
        digest = reference.digest
        if digest is None:
            assert reference.tag is not None
            digest = await asyncio.to_thread(self.repos.resolve, repository, reference.tag)
        if digest is None or not await asyncio.to_thread(
            self.repos.has, repository, "manifests", digest
        ):
            raise ManifestUnknown(f"{repository}:{reference}")
        found = await self.manifests.get(digest)
        if found is None:
            raise ManifestUnknown(f"{repository}@{digest}")
        return found

    async def collect(self, grace: float, protected: frozenset[Digest] = frozenset()) -> Collection:
        """Remove the blobs no hosted manifest references (see HostedRepositories.collect)."""
        return await asyncio.to_thread(self.repos.collect, grace, protected=protected)

    async def delete_manifest(self, repository: str, reference: Reference) -> None:
        """By digest: the manifest leaves the repository with its tags; by tag: the tag."""
        if reference.tag is not None:
            if not await asyncio.to_thread(self.repos.untag, repository, reference.tag):
                raise ManifestUnknown(f"{repository}:{reference}")
            return
        assert reference.digest is not None
        digest = reference.digest

        def delete() -> bool:
            self.repos.untag_digest(repository, digest)
            return self.repos.unlink(repository, "manifests", digest)

        if not await asyncio.to_thread(delete):
            raise ManifestUnknown(f"{repository}@{digest}")

    async def delete_blob(self, repository: str, digest: Digest) -> None:
        if not await asyncio.to_thread(self.repos.unlink, repository, "blobs", digest):
            raise BlobUnknown(str(digest))

    async def tags(self, repository: str) -> list[str]:
        found = await asyncio.to_thread(self.repos.tags, repository)
        if found is None:
            raise NameUnknown(repository)
        return found

    async def catalog(self) -> list[str]:
        return await asyncio.to_thread(self.repos.repositories)

    async def referrers(self, repository: str, subject: Digest, artifact_type: str | None) -> bytes:
        """The OCI image index of the manifests in ``repository`` whose subject is
        ``subject``, filtered by artifact type when one is asked for."""
        found = []
        for digest in await asyncio.to_thread(lambda: list(self.repos.manifests(repository))):
            stored = await self.manifests.get(digest)
            if stored is None:
                continue
            try:
                checked = check_manifest(stored.data, stored.media_type)
            except ManifestInvalid:  # hosted manifests were checked when pushed
                log.warning("hosted manifest %s no longer parses", digest)
                continue
            if checked.subject != subject:
                continue
            if artifact_type is not None and checked.artifact_type != artifact_type:
                continue
            descriptor: dict[str, object] = {
                "mediaType": stored.media_type,
                "digest": str(digest),
                "size": len(stored.data),
            }
            if checked.artifact_type is not None:
                descriptor["artifactType"] = checked.artifact_type
            annotations = json.loads(stored.data).get("annotations")
            if isinstance(annotations, dict):
                descriptor["annotations"] = annotations
            found.append(descriptor)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
        return json.dumps(index).encode()

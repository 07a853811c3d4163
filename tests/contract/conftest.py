"""The storage backends the contract suite runs against.

A backend is a factory of handles on one fresh storage: ``blobs()`` and
``manifests()`` each return a new handle, as another worker process would open
one, so the suite can check what handles share. A new backend plugs in by adding
a factory to ``BACKENDS``; it gets the fixture request for the servers it needs
(the S3 one runs on SeaweedFS's ``weed mini``, the Redis one on ``redis-server``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from pullthrough.cache.blobs import BlobStore
from pullthrough.cache.coordination import LocalLocks
from pullthrough.cache.digests import Digest
from pullthrough.cache.index import TagIndex
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore
from pullthrough.cache.redis_tags import RedisTags
from pullthrough.cache.s3 import S3BlobStore, S3ManifestStore
from pullthrough.cache.s3_location import S3Location
from pullthrough.cache.storage import BlobStorage, ManifestStorage, TagStorage
from tests.support.redis import RedisServer
from tests.support.seaweed import SeaweedS3


async def _nothing() -> None:
    pass


@dataclass
class Backend:
    blobs: Callable[[], BlobStorage]
    manifests: Callable[[], ManifestStorage]
    tags: Callable[[], TagStorage]
    # Damage a stored manifest's bytes the way a failing disk would.
    rot_manifest: Callable[[Digest], None]
    # A blob held open keeps its bytes after removal (POSIX files do; an object
    # removed from S3 is gone for the reads still to come).
    holds_removed: bool = True
    # Let go of what the handles opened on the test's event loop.
    aclose: Callable[[], Awaitable[None]] = _nothing


@contextmanager
def filesystem(root: Path, request: pytest.FixtureRequest) -> Iterator[Backend]:
    layout = Layout(root)
    layout.create()

    def rot(digest: Digest) -> None:
        path = layout.manifest(digest)
        raw = bytearray(path.read_bytes())
        raw[-2] ^= 0x01
        path.write_bytes(bytes(raw))

    opened: list[TagIndex] = []

    def tags() -> TagStorage:
        index = TagIndex(root / "index")
        opened.append(index)
        return index

    try:
        yield Backend(lambda: BlobStore(layout), lambda: ManifestStore(layout), tags, rot)
    finally:
        for index in opened:
            index.close()


@contextmanager
def s3(root: Path, request: pytest.FixtureRequest) -> Iterator[Backend]:
    """A prefix of its own in SeaweedFS's bucket; handles share one ``LocalLocks``
    as nodes share Redis; the tag index stays local (SQLite)."""
    server: SeaweedS3 = request.getfixturevalue("seaweed")
    location = S3Location(
        server.bucket,
        f"contract-{uuid.uuid4().hex}/",
        endpoint_url=server.direct_endpoint,
        region=server.region,
        access_key=server.access_key,
        secret_key=server.secret_key,
    )
    locks = LocalLocks()
    opened: list[S3ManifestStore] = []
    indexes: list[TagIndex] = []

    def manifests() -> ManifestStorage:
        store = S3ManifestStore(location)
        opened.append(store)
        return store

    def blobs() -> BlobStorage:
        return S3BlobStore(location, locks=locks, staging=root / "tmp")

    def tags() -> TagStorage:
        index = TagIndex(root / "index")
        indexes.append(index)
        return index

    def rot(digest: Digest) -> None:
        raw = bytearray(opened[0].raw(digest))
        raw[-2] ^= 0x01
        opened[0].replace_raw(digest, bytes(raw))

    root.mkdir(parents=True)
    manifests()  # the one rot() uses
    try:
        yield Backend(blobs, manifests, tags, rot, holds_removed=False)
    finally:
        for store in opened:
            store.close()
        for index in indexes:
            index.close()


@contextmanager
def redis(root: Path, request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Blobs and manifests on the filesystem, the tag index on a real Redis."""
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = server.prefix()
    opened: list[RedisTags] = []

    def tags() -> TagStorage:
        index = RedisTags(server.url, prefix=prefix)
        opened.append(index)
        return index

    async def aclose() -> None:
        for index in opened:
            await index.aclose()

    with filesystem(root, request) as files:
        yield Backend(files.blobs, files.manifests, tags, files.rot_manifest, aclose=aclose)


BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], AbstractContextManager[Backend]]] = {
    "filesystem": filesystem,
    "s3": s3,
    "redis": redis,
}


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    with BACKENDS[request.param](tmp_path / "store", request) as made:
        yield made
        await made.aclose()

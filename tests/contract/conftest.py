"""The storage backends the contract suite runs against.

A backend is a factory of handles on one fresh storage: ``blobs()`` and
``manifests()`` each return a new handle, as another worker process would open
one, so the suite can check what handles share. A new backend plugs in by adding
a factory to ``BACKENDS``; it gets the fixture request for the servers it needs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from pullthrough.cache.blobs import BlobStore
from pullthrough.cache.digests import Digest
from pullthrough.cache.index import TagIndex
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore
from pullthrough.cache.redis_tags import RedisTags
from pullthrough.cache.storage import BlobStorage, ManifestStorage, TagStorage
from tests.support.redis import RedisServer


async def _nothing() -> None:
    pass


@dataclass
class Backend:
    blobs: Callable[[], BlobStorage]
    manifests: Callable[[], ManifestStorage]
    tags: Callable[[], TagStorage]
    # Damage a stored manifest's bytes the way a failing disk would.
    rot_manifest: Callable[[Digest], None]
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
        yield Backend(files.blobs, files.manifests, tags, files.rot_manifest, aclose)


BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], AbstractContextManager[Backend]]] = {
    "filesystem": filesystem,
    "redis": redis,
}


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    with BACKENDS[request.param](tmp_path / "store", request) as made:
        yield made
        await made.aclose()

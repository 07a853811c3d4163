"""The storage backends the contract suite runs against.

A backend is a factory of handles on one fresh storage: ``blobs()`` and
``manifests()`` each return a new handle, as another worker process would open
one, so the suite can check what handles share. A new backend (S3, Redis) plugs
in by adding a factory to ``BACKENDS``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from pullthrough.cache.blobs import BlobStore
from pullthrough.cache.digests import Digest
from pullthrough.cache.index import TagIndex
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore
from pullthrough.cache.storage import BlobStorage, ManifestStorage, TagStorage


@dataclass
class Backend:
    blobs: Callable[[], BlobStorage]
    manifests: Callable[[], ManifestStorage]
    tags: Callable[[], TagStorage]
    # Damage a stored manifest's bytes the way a failing disk would.
    rot_manifest: Callable[[Digest], None]


@contextmanager
def filesystem(root: Path) -> Iterator[Backend]:
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


BACKENDS: dict[str, Callable[[Path], AbstractContextManager[Backend]]] = {
    "filesystem": filesystem,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    with BACKENDS[request.param](tmp_path / "store") as made:
        yield made

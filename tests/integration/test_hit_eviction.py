"""A cached blob evicted while a request is being answered from it.

Deterministic: the store's ``open`` is wrapped so the file disappears exactly
where an eviction would strike.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from pullthrough.cache.blobs import BlobStore, OpenBlob
from pullthrough.cache.digests import Digest
from pullthrough.proxy.app import create_app
from pullthrough.proxy.keys import MIRRORS
from tests.support.images import HELLO
from tests.support.mirror import blob_files, settings_for
from tests.support.registry import Registry

Client = TestClient[Any, Any]


async def cached_hello(upstream: Registry, tmp_path: Path, make: Any) -> tuple[Client, str, bytes]:
    client: Client = await make(create_app(settings_for(tmp_path / "cache", upstream.url)))
    image = upstream.images[HELLO]
    blob = image.layers_of(image.top)[0]
    url = f"/v2/{image.name}/blobs/{blob.digest}"
    async with client.get(url) as resp:
        assert resp.status == 200
        assert await resp.read() == blob.data
    await client.app[MIRRORS].default.settle()
    assert len(blob_files(tmp_path / "cache")) == 1
    return client, url, blob.data


async def blob_gets(upstream: Registry, mark: int) -> int:
    entries = await asyncio.to_thread(upstream.requests_since, mark)
    return len([e for e in entries if e.method == "GET" and "/blobs/" in e.route])


async def test_a_blob_evicted_after_the_hit_is_still_sent_whole_from_the_cache(
    upstream: Registry, tmp_path: Path, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, url, data = await cached_hello(upstream, tmp_path, aiohttp_client)
    original = BlobStore.open

    async def open_then_evict(self: BlobStore, digest: Digest) -> OpenBlob | None:
        found = await original(self, digest)
        if found is not None:
            found.path.unlink()  # the evictor strikes between the hit and the answer
        return found

    monkeypatch.setattr(BlobStore, "open", open_then_evict)
    mark = await asyncio.to_thread(upstream.mark)
    async with client.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == f"sha256:{hashlib.sha256(data).hexdigest()}"
        assert await resp.read() == data
    assert await blob_gets(upstream, mark) == 0  # answered from the file held open
    # A range of it, also evicted meanwhile.
    monkeypatch.setattr(BlobStore, "open", original)
    async with client.get(url) as resp:
        assert await resp.read() == data  # fetched again: cached again
    await client.app[MIRRORS].default.settle()
    monkeypatch.setattr(BlobStore, "open", open_then_evict)
    async with client.get(url, headers={"Range": "bytes=10-99"}) as resp:
        assert resp.status == 206
        assert await resp.read() == data[10:100]


async def test_a_blob_evicted_before_the_open_is_fetched_again_not_a_404(
    upstream: Registry, tmp_path: Path, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, url, data = await cached_hello(upstream, tmp_path, aiohttp_client)
    original = BlobStore.open
    checked = BlobStore.stat

    async def evicted_after_check(self: BlobStore, digest: Digest) -> OpenBlob | None:
        assert await checked(self, digest) is not None  # it was there a moment ago...
        self.layout.blob(digest).unlink()  # ...and is evicted before the open
        return await original(self, digest)

    monkeypatch.setattr(BlobStore, "open", evicted_after_check)
    mark = await asyncio.to_thread(upstream.mark)
    async with client.get(url) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/octet-stream"
        assert await resp.read() == data
    assert await blob_gets(upstream, mark) == 1  # from the upstream path, once

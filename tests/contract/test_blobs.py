"""Blob storage contract: one writer per digest, followers, commit only when verified."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import DigestMismatch, SizeMismatch
from pullthrough.cache.storage import BlobStorage, DownloadSink, HeldBlob, Tracker
from tests.contract.conftest import Backend
from tests.support.trackers import read_all, reading

DATA = os.urandom(300_000 + 7)
DIGEST = Digest("sha256", hashlib.sha256(DATA).hexdigest())
CHUNK = 64 * 1024


class Upstream:
    """A fetch function the test lets through one step at a time: each chunk,
    then returning (after which the store verifies)."""

    def __init__(self, data: bytes = DATA, *, fail_at: int | None = None) -> None:
        self.data = data
        self.fail_at = fail_at
        self.calls = 0
        self.sent = 0
        self._allowed = asyncio.Semaphore(0)

    def allow(self, chunks: int = 1) -> None:
        for _ in range(chunks):
            self._allowed.release()

    def allow_all(self) -> None:
        self.allow(len(self.data) // CHUNK + 2)

    async def __call__(self, sink: DownloadSink) -> None:
        self.calls += 1
        await sink.begin(len(DATA))
        for pos in range(0, len(self.data), CHUNK):
            await self._allowed.acquire()
            if self.fail_at is not None and pos >= self.fail_at:
                raise ConnectionResetError("the upstream went away")
            await sink.write(self.data[pos : pos + CHUNK])
            self.sent = min(pos + CHUNK, len(self.data))
        await self._allowed.acquire()  # the fetch returns: the store verifies


async def until(condition: object, what: str) -> None:
    """Let the event loop run until ``condition()`` holds (bounded by steps; after
    the first thousand each step also gives a store's network I/O a moment)."""
    assert callable(condition)
    for step in range(10_000):
        if condition():
            return
        await asyncio.sleep(0 if step < 1000 else 0.005)
    raise AssertionError(f"never happened: {what}")


async def track(store: BlobStorage, fetch: Upstream, *, committed: bool = False) -> Tracker:
    tracker = await store.track(DIGEST, fetch, committed=committed)
    assert tracker is not None
    return tracker


async def digests(store: BlobStorage) -> list[Digest]:
    return [digest async for digest in store.digests()]


async def held_bytes(held: HeldBlob) -> bytes:
    """What a held blob serves: its local file, or the bytes it reads."""
    if held.serve_path is not None:
        with held.serve_path.open("rb") as f:
            return f.read()
    return b"".join([chunk async for chunk in held.read(0, held.size)])


async def test_a_blob_is_visible_only_once_every_byte_is_verified(backend: Backend) -> None:
    store = backend.blobs()
    upstream = Upstream()
    tracker = await track(store, upstream)
    assert await tracker.size() == len(DATA)
    reader, got = reading(tracker)
    upstream.allow(len(DATA) // CHUNK)  # everything but the last chunk
    await until(lambda: upstream.sent >= len(DATA) - CHUNK, "all but the last chunk sent")
    assert await store.stat(DIGEST) is None
    assert await store.open(DIGEST) is None
    assert await digests(store) == []
    upstream.allow(2)  # the last chunk, and the end
    await reader
    await store.settle()
    assert bytes(got) == DATA
    assert await store.stat(DIGEST) == len(DATA)
    assert await digests(store) == [DIGEST]
    held = await store.open(DIGEST)
    assert held is not None
    assert await held_bytes(held) == DATA
    assert held.size == len(DATA)
    held.close()
    assert await store.track(DIGEST, Upstream()) is None  # committed: nothing to download
    await store.close()


async def test_the_last_byte_waits_for_the_verdict(backend: Backend) -> None:
    store = backend.blobs()
    upstream = Upstream()
    tracker = await track(store, upstream)
    reader, got = reading(tracker)
    upstream.allow(len(DATA) // CHUNK + 1)
    await until(lambda: upstream.sent >= len(DATA), "every chunk written")
    # Every byte was written; the writer has not returned, so nothing is verified.
    await until(lambda: len(got) == len(DATA) - 1, "all but the last byte read")
    assert not reader.done()
    upstream.allow()  # the fetch returns: verified
    await reader
    assert bytes(got) == DATA
    await store.close()


@pytest.mark.parametrize("wrong", ["bytes", "length"])
async def test_wrong_content_leaves_nothing(backend: Backend, wrong: str) -> None:
    store = backend.blobs()
    data = DATA[:-1] + bytes([DATA[-1] ^ 1]) if wrong == "bytes" else DATA[:-1]
    upstream = Upstream(data)
    tracker = await track(store, upstream)
    upstream.allow_all()
    with pytest.raises(DigestMismatch if wrong == "bytes" else SizeMismatch):
        await read_all(tracker)
    await store.settle()
    assert await store.stat(DIGEST) is None
    assert await digests(store) == []
    # Nothing is left to follow: the next request starts afresh, and succeeds.
    again = Upstream()
    retry = await track(store, again)
    assert not retry.joined
    again.allow_all()
    assert await read_all(retry) == DATA
    await store.settle()
    assert again.calls == 1
    assert await store.stat(DIGEST) == len(DATA)
    await store.close()


async def test_a_failed_fetch_ends_readers_short_and_leaves_nothing(backend: Backend) -> None:
    store = backend.blobs()
    upstream = Upstream(fail_at=2 * CHUNK)
    tracker = await track(store, upstream)
    reader, got = reading(tracker)
    upstream.allow_all()
    with pytest.raises(ConnectionResetError):
        await reader
    assert len(got) <= 2 * CHUNK
    await store.settle()
    assert await store.stat(DIGEST) is None
    assert not (await track(store, Upstream())).joined
    await store.close()


async def test_closing_the_store_cancels_a_download_and_leaves_nothing(backend: Backend) -> None:
    store = backend.blobs()
    upstream = Upstream()
    tracker = await track(store, upstream)
    upstream.allow(2)
    await until(lambda: upstream.sent >= 2 * CHUNK, "two chunks written")
    tracker.close()
    await store.close()
    other = backend.blobs()
    assert await other.stat(DIGEST) is None
    fresh = Upstream()
    assert not (await track(other, fresh)).joined  # nobody holds the digest any more
    await other.close()


async def test_concurrent_requests_share_one_writer(backend: Backend) -> None:
    store = backend.blobs()
    upstream, unused = Upstream(), Upstream()
    first = await track(store, upstream)
    others = [await track(store, unused) for _ in range(4)]
    assert not first.joined
    assert all(t.joined for t in others)
    readers = [asyncio.create_task(read_all(t)) for t in [first, *others]]
    upstream.allow_all()
    assert [await r for r in readers] == [DATA] * 5
    assert (upstream.calls, unused.calls) == (1, 0)
    await store.close()


async def test_another_handle_follows_instead_of_fetching(backend: Backend) -> None:
    writer_side, reader_side = backend.blobs(), backend.blobs()
    upstream, unused = Upstream(), Upstream()
    leader = await track(writer_side, upstream)
    await leader.size()
    follower = await track(reader_side, unused)
    assert follower.joined
    # A follower elsewhere may be given the bytes as they come (filesystem) or
    # once they are committed (S3): read in a task, let the leader go on.
    whole = asyncio.create_task(read_all(follower))
    upstream.allow_all()
    assert await read_all(leader) == DATA
    assert await whole == DATA
    assert await follower.size() == len(DATA)
    await writer_side.settle()
    assert unused.calls == 0
    assert await reader_side.stat(DIGEST) == len(DATA)
    await writer_side.close()
    await reader_side.close()


async def test_ranges_are_read_while_the_blob_grows(backend: Backend) -> None:
    store = backend.blobs()
    upstream = Upstream()
    tracker = await track(store, upstream)
    await tracker.size()
    early = asyncio.create_task(read_all(tracker, 10, 1000))
    middle = asyncio.create_task(read_all(await track(store, Upstream()), CHUNK - 5, 3 * CHUNK + 5))
    tail = asyncio.create_task(read_all(await track(store, Upstream()), len(DATA) - 3, None))
    upstream.allow(4)
    await until(lambda: upstream.sent >= 4 * CHUNK, "four chunks written")
    assert not early.done()  # a range's last byte also waits for the verdict
    upstream.allow_all()
    assert await early == DATA[10:1000]
    assert await middle == DATA[CHUNK - 5 : 3 * CHUNK + 5]
    assert await tail == DATA[-3:]
    await store.close()


async def test_a_committed_blob_can_be_read_through_a_tracker(backend: Backend) -> None:
    store = backend.blobs()
    upstream = Upstream()
    tracker = await track(store, upstream)
    upstream.allow_all()
    await read_all(tracker)
    await store.settle()
    again = await track(store, Upstream(), committed=True)
    assert await again.size() == len(DATA)
    assert await read_all(again, 100, 200) == DATA[100:200]
    await store.close()


async def test_remove_takes_a_blob_away_but_not_from_its_holder(backend: Backend) -> None:
    store = backend.blobs()
    assert await store.remove(DIGEST) is False
    upstream = Upstream()
    tracker = await track(store, upstream)
    upstream.allow_all()
    await read_all(tracker)
    await store.settle()
    held = await store.open(DIGEST)
    assert held is not None
    assert await store.hit(DIGEST) == len(DATA)
    assert await store.remove(DIGEST) is True
    assert await store.stat(DIGEST) is None
    assert await store.hit(DIGEST) is None
    assert await store.open(DIGEST) is None
    assert await digests(store) == []
    assert await store.remove(DIGEST) is False
    if backend.holds_removed:
        assert await held_bytes(held) == DATA
    held.close()
    await store.close()


async def test_a_writable_store_says_so(backend: Backend) -> None:
    store = backend.blobs()
    assert await store.state() == "writable"
    await store.close()

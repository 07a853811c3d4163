"""The blob store on its own: one writer per digest, followers, commit and discard."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from cache.blobs import BlobSink, BlobStore, Tracker
from cache.digests import Digest
from cache.errors import DigestMismatch, DownloadFailed
from cache.layout import Layout

DATA = os.urandom(2 * 1024 * 1024 + 3)
DIGEST = Digest("sha256", hashlib.sha256(DATA).hexdigest())


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "cache")
    layout.create()
    return layout


class Feed:
    """A fetch function the test drives chunk by chunk."""

    def __init__(self, data: bytes, size: int | None = None) -> None:
        self.data = data
        self.size = len(data) if size is None else size
        self.go = asyncio.Event()
        self.calls = 0

    async def __call__(self, sink: BlobSink) -> None:
        self.calls += 1
        await sink.begin(self.size)
        half = len(self.data) // 2
        await sink.write(self.data[:half])
        await self.go.wait()
        await sink.write(self.data[half:])


async def read_all(tracker: Tracker, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in tracker.read(start, end)])


async def test_followers_share_one_fetch_and_get_identical_bytes(layout: Layout) -> None:
    store = BlobStore(layout)
    feed = Feed(DATA)
    trackers = [store.track(DIGEST, feed) for _ in range(5)]
    assert all(t is not None for t in trackers)
    readers = [asyncio.create_task(read_all(t)) for t in trackers if t is not None]
    await asyncio.sleep(0.05)
    assert not any(r.done() for r in readers)
    feed.go.set()
    assert [await r for r in readers] == [DATA] * 5
    assert feed.calls == 1
    await store.settle()  # readers finish once verified; the commit follows
    assert store.stat(DIGEST) == (layout.blob(DIGEST), len(DATA))
    assert store.track(DIGEST, feed) is None  # committed: serve the file
    assert list(layout.tmp.iterdir()) == []


async def test_wrong_bytes_are_discarded_and_readers_fail(layout: Layout) -> None:
    store = BlobStore(layout)
    feed = Feed(DATA[:-1] + b"\0")
    tracker = store.track(DIGEST, feed)
    assert tracker is not None
    feed.go.set()
    with pytest.raises(DigestMismatch):
        await read_all(tracker)
    assert store.stat(DIGEST) is None
    assert list(layout.tmp.iterdir()) == []


async def test_reader_never_gets_the_last_byte_before_commit(layout: Layout) -> None:
    store = BlobStore(layout)
    gate = asyncio.Event()

    async def fetch(sink: BlobSink) -> None:
        await sink.begin(len(DATA))
        await sink.write(DATA)
        await gate.wait()  # all bytes written, not yet verified

    tracker = store.track(DIGEST, fetch)
    assert tracker is not None
    got = bytearray()

    async def read() -> None:
        async for chunk in tracker.read(0, None):
            got.extend(chunk)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.1)
    assert len(got) == len(DATA) - 1
    gate.set()
    await reader
    assert bytes(got) == DATA


async def test_a_second_process_follows_instead_of_fetching(layout: Layout) -> None:
    # flock locks belong to an open file, so a second store in this process
    # meets the first one's lock exactly as another worker process would.
    first, second = BlobStore(layout), BlobStore(layout)
    feed = Feed(DATA)
    leader = first.track(DIGEST, feed)
    assert leader is not None
    await leader.size()
    other_fetch = Feed(DATA)
    follower = second.track(DIGEST, other_fetch)
    assert follower is not None
    assert await follower.size() == len(DATA)
    reader = asyncio.create_task(read_all(follower, 10, 20_000))
    whole = asyncio.create_task(read_all(follower))
    await asyncio.sleep(0.05)
    feed.go.set()
    assert await reader == DATA[10:20_000]
    assert await whole == DATA
    assert other_fetch.calls == 0


async def test_a_second_process_sees_an_abandoned_download(layout: Layout) -> None:
    first, second = BlobStore(layout), BlobStore(layout)
    feed = Feed(DATA[:-1] + b"\0")
    leader = first.track(DIGEST, feed)
    assert leader is not None
    await leader.size()
    follower = second.track(DIGEST, Feed(DATA))
    assert follower is not None
    await follower.size()
    reader = asyncio.create_task(read_all(follower))
    feed.go.set()
    with pytest.raises(DownloadFailed):
        await reader
    assert first.stat(DIGEST) is None


def test_stale_partials_are_removed_but_live_ones_kept(layout: Layout) -> None:
    stale = layout.partial(DIGEST)
    stale.write_bytes(b"half of something")
    layout.size_file(DIGEST).write_text("100")
    assert BlobStore(layout).remove_stale() == 1
    assert list(layout.tmp.iterdir()) == []


async def test_cancelled_download_leaves_nothing(layout: Layout) -> None:
    store = BlobStore(layout)
    feed = Feed(DATA)
    tracker = store.track(DIGEST, feed)
    assert tracker is not None
    await tracker.size()
    live = Digest("sha256", "0" * 64)
    assert store.track(live, Feed(b"x")) is not None
    # A partial file whose writer is alive survives a clean-up by anyone.
    assert BlobStore(layout).remove_stale() == 0
    await store.close()
    assert store.stat(DIGEST) is None
    assert list(layout.tmp.iterdir()) == []


def test_a_killed_imports_folder_does_not_stop_start_up(layout: Layout) -> None:
    staging = layout.tmp / "import-0123456789ab"
    staging.mkdir()
    (staging / "sha256-x").write_bytes(b"half an import")
    old = 0.0
    os.utime(staging, (old, old))
    assert BlobStore(layout).remove_stale() == 0  # not its business: no crash either
    assert staging.exists()

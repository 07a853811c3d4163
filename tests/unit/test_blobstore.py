"""The blob store on its own: one writer per digest, followers, commit and discard."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from pullthrough.cache import blobs, evict
from pullthrough.cache.blobs import BlobSink, BlobStore, BlobWriter
from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import DigestMismatch, DownloadFailed
from pullthrough.cache.layout import Layout
from pullthrough.cache.space import WriteFailures
from tests.support.trackers import read_all, reading

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


async def test_followers_share_one_fetch_and_get_identical_bytes(layout: Layout) -> None:
    store = BlobStore(layout)
    feed = Feed(DATA)
    trackers = [await store.track(DIGEST, feed) for _ in range(5)]
    assert all(t is not None for t in trackers)
    readers = [asyncio.create_task(read_all(t)) for t in trackers if t is not None]
    await asyncio.sleep(0.05)
    assert not any(r.done() for r in readers)
    feed.go.set()
    assert [await r for r in readers] == [DATA] * 5
    assert feed.calls == 1
    await store.settle()  # readers finish once verified; the commit follows
    assert await store.stat(DIGEST) == len(DATA)
    assert await store.track(DIGEST, feed) is None  # committed: serve the file
    assert list(layout.tmp.iterdir()) == []


async def test_wrong_bytes_are_discarded_and_readers_fail(layout: Layout) -> None:
    store = BlobStore(layout)
    feed = Feed(DATA[:-1] + b"\0")
    tracker = await store.track(DIGEST, feed)
    assert tracker is not None
    feed.go.set()
    with pytest.raises(DigestMismatch):
        await read_all(tracker)
    assert await store.stat(DIGEST) is None
    assert list(layout.tmp.iterdir()) == []


async def test_reader_never_gets_the_last_byte_before_verification(layout: Layout) -> None:
    store = BlobStore(layout)
    gate = asyncio.Event()

    async def fetch(sink: BlobSink) -> None:
        await sink.begin(len(DATA))
        await sink.write(DATA)
        await gate.wait()  # all bytes written, not yet verified

    tracker = await store.track(DIGEST, fetch)
    assert tracker is not None
    reader, got = reading(tracker)
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
    leader = await first.track(DIGEST, feed)
    assert leader is not None
    await leader.size()
    other_fetch = Feed(DATA)
    follower = await second.track(DIGEST, other_fetch)
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
    leader = await first.track(DIGEST, feed)
    assert leader is not None
    await leader.size()
    follower = await second.track(DIGEST, Feed(DATA))
    assert follower is not None
    await follower.size()
    reader = asyncio.create_task(read_all(follower))
    feed.go.set()
    with pytest.raises(DownloadFailed):
        await reader
    assert await first.stat(DIGEST) is None


async def test_stale_partials_are_removed_but_live_ones_kept(layout: Layout) -> None:
    stale = layout.partial(DIGEST)
    stale.write_bytes(b"half of something")
    layout.size_file(DIGEST).write_text("100")
    store = BlobStore(layout)
    live = Digest("sha256", "0" * 64)
    tracker = await store.track(live, Feed(b"x" * 10))
    assert tracker is not None
    await tracker.size()  # its writer holds the lock on tmp/<live>.partial
    assert BlobStore(layout).remove_stale() == 1
    assert sorted(p.name for p in layout.tmp.iterdir()) == sorted(
        [layout.partial(live).name, layout.size_file(live).name]
    )
    tracker.close()
    await store.close()
    assert list(layout.tmp.iterdir()) == []


async def test_cancelled_download_leaves_nothing(layout: Layout) -> None:
    store = BlobStore(layout)
    feed = Feed(DATA)
    tracker = await store.track(DIGEST, feed)
    assert tracker is not None
    await tracker.size()
    live = Digest("sha256", "0" * 64)
    assert await store.track(live, Feed(b"x")) is not None
    # A partial file whose writer is alive survives a clean-up by anyone.
    assert BlobStore(layout).remove_stale() == 0
    await store.close()
    assert await store.stat(DIGEST) is None
    assert list(layout.tmp.iterdir()) == []


def test_a_killed_imports_folder_does_not_stop_start_up(layout: Layout) -> None:
    staging = layout.tmp / "import-0123456789ab"
    staging.mkdir()
    (staging / "sha256-x").write_bytes(b"half an import")
    old = 0.0
    os.utime(staging, (old, old))
    assert BlobStore(layout).remove_stale() == 0  # not its business: no crash either
    assert staging.exists()


# -- a cache that cannot be written: pass-through --------------------------------


def fail_writes_after(
    monkeypatch: pytest.MonkeyPatch, limit: int, error: int = errno.EIO, times: int = -1
) -> list[int]:
    """Make the disk refuse bytes past ``limit`` (``times`` times; -1: always).
    Returns the offsets at which writes were refused."""
    original = BlobWriter.store_rest
    refused: list[int] = []

    def store_rest(self: BlobWriter, chunk: bytes, start: int) -> None:
        if self.stored >= limit and (times < 0 or len(refused) < times):
            refused.append(self.stored)
            raise OSError(error, os.strerror(error))
        original(self, chunk, start)

    monkeypatch.setattr(BlobWriter, "store_rest", store_rest)
    return refused


class Chunks:
    """A fetch that sends ``data`` in ``size`` pieces, pausing at ``gate`` before the last."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data = data
        self.size = size
        self.gate = asyncio.Event()
        self.gate.set()
        self.sent = 0

    async def __call__(self, sink: BlobSink) -> None:
        await sink.begin(len(self.data))
        pieces = [self.data[i : i + self.size] for i in range(0, len(self.data), self.size)]
        for i, piece in enumerate(pieces):
            if i == len(pieces) - 1:
                await self.gate.wait()
            await sink.write(piece)
            self.sent += len(piece)


async def test_a_write_failure_serves_every_reader_whole_and_keeps_nothing(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = fail_writes_after(monkeypatch, 700_000)
    reasons: list[str] = []
    store = BlobStore(layout, failures=WriteFailures(reasons.append))
    fetch = Chunks(DATA, 300_000)
    fetch.gate.clear()
    first, second, late = [await store.track(DIGEST, fetch) for _ in range(3)]
    assert first is not None
    assert second is not None
    assert late is not None
    early = asyncio.create_task(read_all(first))  # reads from the file, then memory
    await asyncio.sleep(0.05)
    ranged = asyncio.create_task(read_all(second, 100, 1_000_000))
    await asyncio.sleep(0.05)
    assert refused  # the disk said no...
    assert list(layout.tmp.iterdir()) == []  # ...and nothing of it is left
    whole = asyncio.create_task(read_all(late))
    await asyncio.sleep(0.05)
    assert not whole.done()  # the last byte waits for verification
    fetch.gate.set()
    assert await early == DATA
    assert await ranged == DATA[100:1_000_000]
    assert await whole == DATA
    await store.settle()
    assert await store.stat(DIGEST) is None
    assert list(layout.tmp.iterdir()) == []
    assert reasons == ["io"]
    assert not store.failures.full  # an I/O error is not a full disk


async def test_pass_through_keeps_the_last_byte_until_verified_and_fails_on_bad_bytes(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_writes_after(monkeypatch, 0, errno.ENOSPC)
    store = BlobStore(layout)
    fetch = Chunks(DATA[:-1] + b"\0", 500_000)
    fetch.gate.clear()
    tracker = await store.track(DIGEST, fetch)
    assert tracker is not None
    reader, got = reading(tracker)
    await asyncio.sleep(0.05)
    assert 0 < len(got) < len(DATA)
    fetch.gate.set()
    with pytest.raises(DigestMismatch):
        await reader
    assert len(got) < len(DATA)  # never the whole of wrong bytes
    assert store.failures.full
    assert list(layout.tmp.iterdir()) == []


async def test_pass_through_memory_is_bounded_by_the_slowest_reader(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobs, "PASS_THROUGH_BUFFER", 200_000)
    fail_writes_after(monkeypatch, 0)
    store = BlobStore(layout)
    fetch = Chunks(DATA, 50_000)
    slow = await store.track(DIGEST, fetch)
    fast = await store.track(DIGEST, fetch)
    assert slow is not None
    assert fast is not None
    fast_read = asyncio.create_task(read_all(fast))
    stream = slow.read(0, None)
    first = await anext(stream)  # then the slow reader stops reading for a while
    await asyncio.sleep(0.1)
    # The writer waits for it: at most the buffer plus one chunk ahead.
    assert fetch.sent <= len(first) + 200_000 + 50_000
    assert not fast_read.done()
    rest = b"".join([chunk async for chunk in stream])
    assert first + rest == DATA
    assert await fast_read == DATA


async def test_pass_through_nobody_reads_any_more_stops_the_fetch(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobs, "PASS_THROUGH_BUFFER", 100_000)
    fail_writes_after(monkeypatch, 0)
    store = BlobStore(layout)
    fetch = Chunks(DATA, 50_000)
    tracker = await store.track(DIGEST, fetch)
    assert tracker is not None
    stream = tracker.read(0, None)
    assert isinstance(stream, AsyncGenerator)
    await anext(stream)
    await stream.aclose()  # the client went away
    await store.settle()
    assert fetch.sent < len(DATA)
    assert list(layout.tmp.iterdir()) == []
    # Forgotten: the next request starts a download of its own.
    again = await store.track(DIGEST, Chunks(DATA, 50_000))
    assert again is not None
    assert not again.joined
    await store.close()


async def test_a_full_disk_is_freed_once_and_the_write_retried(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = fail_writes_after(monkeypatch, 1_000_000, errno.ENOSPC, times=1)
    asked: list[int] = []

    def free(need: int) -> int:
        asked.append(need)
        return need

    reasons: list[str] = []
    store = BlobStore(layout, on_full=free, failures=WriteFailures(reasons.append))
    tracker = await store.track(DIGEST, Chunks(DATA, 300_000))
    assert tracker is not None
    assert await read_all(tracker) == DATA
    await store.settle()
    assert refused == [1_200_000]
    assert asked == [len(DATA) - 1_200_000]  # what the rest of the blob needs
    assert await store.stat(DIGEST) == len(DATA)
    assert reasons == []


async def test_nothing_freed_means_pass_through(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_writes_after(monkeypatch, 1_000_000, errno.ENOSPC)
    asked: list[int] = []

    def free(need: int) -> int:
        asked.append(need)
        return 0

    store = BlobStore(layout, on_full=free)
    tracker = await store.track(DIGEST, Chunks(DATA, 300_000))
    assert tracker is not None
    assert await read_all(tracker) == DATA
    await store.settle()
    assert len(asked) == 1
    assert await store.stat(DIGEST) is None
    assert store.failures.full


async def test_an_open_hit_survives_eviction(layout: Layout) -> None:
    store = BlobStore(layout)
    tracker = await store.track(DIGEST, Chunks(DATA, 1 << 20))
    assert tracker is not None
    await read_all(tracker)
    await store.settle()
    with await store.open(DIGEST) as hit:  # type: ignore[union-attr]
        hit.path.unlink()  # evicted right after the hit
        assert hit.serve_path.read_bytes() == DATA
    assert await store.open(DIGEST) is None


async def test_a_hit_between_touch_and_grace_is_not_evicted(layout: Layout) -> None:
    path = layout.blob(DIGEST)
    path.parent.mkdir(parents=True)
    path.write_bytes(DATA)
    now = time.time()
    used = now - (evict.TOUCH_SECONDS + evict.GRACE_SECONDS) / 2  # touched, not yet evictable
    os.utime(path, (used, used))
    hit = await BlobStore(layout).open(DIGEST)
    assert hit is not None
    hit.close()
    later = now + evict.GRACE_SECONDS / 2
    result = evict.evict([layout], max_size=0, max_age_seconds=None, protected=set(), now=later)
    assert result is not None
    assert result.removed == []
    assert path.exists()


async def test_pass_through_a_reader_far_ahead_does_not_hold_up_the_writer(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reader that resumes mid-blob (its own worker's download was abandoned)
    # needs nothing before its offset: the writer must not wait for it there.
    monkeypatch.setattr(blobs, "PASS_THROUGH_BUFFER", 100_000)
    fail_writes_after(monkeypatch, 0)
    store = BlobStore(layout)
    tracker = await store.track(DIGEST, Chunks(DATA, 50_000))
    assert tracker is not None
    read = read_all(tracker, 1_500_000)
    assert await asyncio.wait_for(read, timeout=30) == DATA[1_500_000:]

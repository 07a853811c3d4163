"""Keeping an S3 store under its size and age limits, least recently used first.

S3 keeps no access time, so with ``redis_url`` the nodes record each blob hit in
a Redis sorted set per store (``pullthrough:uses:s3://bucket/prefix/``, digest
scored by the time of its last use), at most once per ``TOUCH_SECONDS`` per blob
and node, as the filesystem store refreshes a file's mtime. An object's last use
is the later of that score and its write time (``LastModified``). Without Redis
there is nowhere shared to record uses: the write time alone counts, so eviction
removes the oldest written first.

The rules are the filesystem's (``evict.py``): pinned content and anything
written or used within ``GRACE_SECONDS`` stays, the oldest go until the store is
under 90% of ``max_size``, and anything unused for ``max_age`` goes. Blobs only:
manifests (a few KiB, read from each node's memory, so their uses are not seen)
count toward the size and stay. Only one
node evicts at a time: it holds the fetch lock ``evict`` (the key
``pullthrough:lock:evict``, as ``redis_locks.py`` names locks) for the pass;
without Redis an flock in the local cache folder stands in (one node).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
import redis.asyncio
from cachetools import LRUCache
from redis.exceptions import RedisError

from pullthrough.cache.digests import Digest
from pullthrough.cache.evict import GRACE_SECONDS, LOW_WATER, TOUCH_SECONDS
from pullthrough.cache.redis_client import blocking_client
from pullthrough.cache.redis_locks import PREFIX
from pullthrough.cache.s3 import S3BlobStore
from pullthrough.cache.s3_admin import S3Admin, S3Object
from pullthrough.cache.s3_location import S3Location
from pullthrough.cache.storage import Fetch, HeldBlob, Tracker

log = logging.getLogger(__name__)

# A pass holds the lock this long at most (a node killed mid-pass frees it then).
LOCK_SECONDS = 600
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def uses_key(location: S3Location) -> str:
    return f"{PREFIX}uses:{location}"


class UseRecorder:
    """Records blob hits of one store in Redis, for every node's eviction."""

    def __init__(self, client: redis.asyncio.Redis, location: S3Location) -> None:
        self._client = client
        self._key = uses_key(location)
        # When this node last recorded each blob: one ZADD per blob per TOUCH_SECONDS.
        self._recorded: LRUCache[Digest, float] = LRUCache(maxsize=65536)

    async def record(self, digest: Digest) -> None:
        now = time.time()
        if now - self._recorded.get(digest, 0.0) < TOUCH_SECONDS:
            return
        self._recorded[digest] = now
        try:
            await self._client.zadd(self._key, {str(digest): now})
        except RedisError as exc:
            # A use not recorded only makes the blob look older: never fail a hit.
            log.warning("blob use not recorded in Redis: %s", exc)

    async def close(self) -> None:
        await self._client.aclose()


@dataclass
class S3Eviction:
    removed: list[S3Object] = field(default_factory=list)
    total_before: int = 0
    total_after: int = 0

    @property
    def freed(self) -> int:
        return sum(o.size for o in self.removed)


def evict(
    stores: Iterable[S3Admin],
    *,
    redis_url: str | None,
    lock_dir: Path,
    max_size: int | None,
    max_age_seconds: float | None,
    protected: set[Digest],
    dry_run: bool = False,
    now: float | None = None,
) -> S3Eviction | None:
    """Bring the stores under their limits together. None when another node evicts."""
    stores = list(stores)
    now = time.time() if now is None else now
    client = None if redis_url is None else blocking_client(redis_url)
    try:
        with _evicting(client, lock_dir) as held:
            if not held:
                return None
            return _evict(stores, client, max_size, max_age_seconds, protected, dry_run, now)
    finally:
        if client is not None:
            client.close()


@contextlib.contextmanager
def _evicting(client: redis.Redis | None, lock_dir: Path) -> Iterator[bool]:
    if client is None:
        lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_dir / "evict.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)
        return
    key, token = f"{PREFIX}lock:evict", secrets.token_hex(16)
    if not client.set(key, token, nx=True, px=LOCK_SECONDS * 1000):
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(RedisError):
            client.eval(_RELEASE, 1, key, token)


def _evict(
    stores: list[S3Admin],
    client: redis.Redis | None,
    max_size: int | None,
    max_age_seconds: float | None,
    protected: set[Digest],
    dry_run: bool,
    now: float,
) -> S3Eviction:
    found: list[tuple[float, S3Admin, S3Object]] = []
    manifest_bytes = 0
    for store in stores:
        used = _uses(client, store.location)
        for obj in store.every():
            if obj.kind == "manifest":
                manifest_bytes += obj.size
                continue
            found.append((max(obj.modified, used.get(str(obj.digest), 0.0)), store, obj))
    result = S3Eviction(total_before=manifest_bytes + sum(obj.size for _, _, obj in found))
    total = result.total_before
    target = None if max_size is None else int(max_size * LOW_WATER)
    for last_used, store, obj in sorted(found, key=lambda f: f[0]):
        if obj.digest in protected or now - last_used < GRACE_SECONDS:
            continue
        too_old = max_age_seconds is not None and now - last_used > max_age_seconds
        too_big = target is not None and total > target
        if not (too_old or too_big):
            continue
        if not dry_run:
            # A hit may have come since we looked: ask again, just before.
            if now - _use(client, store.location, obj.digest) < GRACE_SECONDS:
                continue
            store.remove(obj)
            if client is not None:
                client.zrem(uses_key(store.location), str(obj.digest))
        result.removed.append(obj)
        total -= obj.size
    result.total_after = total
    return result


def _uses(client: redis.Redis | None, location: S3Location) -> dict[str, float]:
    if client is None:
        return {}
    scored: list[tuple[bytes, float]] = client.zrange(  # type: ignore[assignment]
        uses_key(location), 0, -1, withscores=True
    )
    return {member.decode(): float(score) for member, score in scored}


def _use(client: redis.Redis | None, location: S3Location, digest: Digest) -> float:
    if client is None:
        return 0.0
    score: float | None = client.zscore(uses_key(location), str(digest))
    return 0.0 if score is None else float(score)


class UsedBlobs:
    """An S3 blob store whose hits are recorded for eviction (``UseRecorder``)."""

    def __init__(self, inner: S3BlobStore, uses: UseRecorder) -> None:
        self._inner = inner
        self._uses = uses

    async def stat(self, digest: Digest) -> int | None:
        return await self._inner.stat(digest)

    async def hit(self, digest: Digest) -> int | None:
        size = await self._inner.hit(digest)
        if size is not None:
            await self._uses.record(digest)
        return size

    async def open(self, digest: Digest) -> HeldBlob | None:
        blob = await self._inner.open(digest)
        if blob is not None:
            await self._uses.record(digest)
        return blob

    async def track(
        self, digest: Digest, fetch: Fetch, *, committed: bool = False
    ) -> Tracker | None:
        return await self._inner.track(digest, fetch, committed=committed)

    async def remove(self, digest: Digest) -> bool:
        return await self._inner.remove(digest)

    def digests(self) -> AsyncIterator[Digest]:
        return self._inner.digests()

    async def state(self) -> str:
        return await self._inner.state()

    async def settle(self) -> None:
        await self._inner.settle()

    async def close(self) -> None:
        await self._inner.close()
        await self._uses.close()

"""The tag index on Redis: tags, their freshness, tag lists and pins shared by every
node, so one node's check of a tag upstream counts for all.

Keys (``<prefix>`` is ``pullthrough:`` unless set; ``\\0`` separates names, none
of which can hold it)::

    <prefix>tag:<upstream>\\0<repository>\\0<tag>    hash: Accept key -> JSON
                                                    [digest, media type, fetched_at]
    <prefix>list:<upstream>\\0<repository>\\0<query>  hash: body, link (absent: none), at
    <prefix>lists                                   sorted set: tag list keys by when stored
    <prefix>lists:sizes, <prefix>lists:bytes        their sizes, and the sum
    <prefix>pins                                    set of pinned image names

A tag's hash has at most one field per Accept key the mirror tells apart (2**7,
proxy/mirror.py ``accepted_types``). Tag entries and pins are records, never
evicted (run Redis with its default ``maxmemory-policy noeviction``); tag list
pages are a cache, the least recently stored dropped past ``listings_limit``
bytes, as in the SQLite index.

The server uses the asyncio client; the command line's blocking calls (pins,
listing, rekey) use a blocking client beside it. A Redis that fails a lookup
costs a question upstream, not an error; a failed write is counted like a full
disk's (the answer is given, the upstream asked again next time).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from redis.exceptions import RedisError

from pullthrough.cache.index import LISTINGS_SIZE_LIMIT, Listing, TagEntry
from pullthrough.cache.redis_client import async_client, blocking_client, glob_escape
from pullthrough.cache.space import WriteFailures

log = logging.getLogger(__name__)

PREFIX = "pullthrough:"
# Tag keys read per round trip when walking the whole index (the command line, gc).
SCAN_BATCH = 500

# Store one tag list page and drop the least recently stored past the limit.
# KEYS: page, order, sizes, total; ARGV: body, link, has link, at, now, limit, only if new.
_PUT_LISTING = """
if ARGV[7] == '1' and redis.call('exists', KEYS[1]) == 1 then return 0 end
-- The page's key is held three times (itself, in the order, in the sizes).
local size = #ARGV[1] + #ARGV[2] + 3 * #KEYS[1]
local old = tonumber(redis.call('hget', KEYS[3], KEYS[1]) or '0')
redis.call('del', KEYS[1])
redis.call('hset', KEYS[1], 'body', ARGV[1], 'at', ARGV[4])
if ARGV[3] == '1' then redis.call('hset', KEYS[1], 'link', ARGV[2]) end
redis.call('hset', KEYS[3], KEYS[1], size)
redis.call('zadd', KEYS[2], ARGV[5], KEYS[1])
local total = redis.call('incrby', KEYS[4], size - old)
while total > tonumber(ARGV[6]) do
  local oldest = redis.call('zrange', KEYS[2], 0, 0)[1]
  if not oldest or oldest == KEYS[1] then break end
  local gone = tonumber(redis.call('hget', KEYS[3], oldest) or '0')
  redis.call('del', oldest)
  redis.call('hdel', KEYS[3], oldest)
  redis.call('zrem', KEYS[2], oldest)
  total = redis.call('incrby', KEYS[4], -gone)
end
return 1
"""
# Forget one tag list page. KEYS: page, order, sizes, total.
_DROP_LISTING = """
local size = tonumber(redis.call('hget', KEYS[3], KEYS[1]) or '0')
redis.call('del', KEYS[1])
redis.call('hdel', KEYS[3], KEYS[1])
redis.call('zrem', KEYS[2], KEYS[1])
redis.call('incrby', KEYS[4], -size)
return 1
"""


def _entry(raw: object) -> TagEntry | None:
    try:
        digest, media_type, fetched_at = json.loads(raw)  # type: ignore[arg-type]
        return TagEntry(str(digest), str(media_type), float(fetched_at))
    except (TypeError, ValueError):
        return None


def _listing(raw: dict[bytes, bytes]) -> Listing | None:
    if b"body" not in raw or b"at" not in raw:
        return None
    link = raw.get(b"link")
    return Listing(raw[b"body"], None if link is None else link.decode(), float(raw[b"at"]))


def _encode(entry: TagEntry) -> str:
    return json.dumps([entry.digest, entry.media_type, entry.fetched_at])


class RedisTags:
    """``TagStorage`` on Redis (see the module doc)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = PREFIX,
        failures: WriteFailures | None = None,
        listings_limit: int = LISTINGS_SIZE_LIMIT,
    ) -> None:
        self._async = async_client(url)
        self._sync = blocking_client(url)
        self._prefix = prefix
        self._failures = failures or WriteFailures()
        self._listings_limit = listings_limit
        self._put_listing = self._async.register_script(_PUT_LISTING)
        self._put_listing_sync = self._sync.register_script(_PUT_LISTING)
        self._drop_listing_sync = self._sync.register_script(_DROP_LISTING)
        self._warned = -60.0  # the first failure is logged
        # The pins as this handle last read or wrote them (see set_pins).
        self._pins_seen: set[str] | None = None

    # -- keys -----------------------------------------------------------------------

    def _tag_key(self, upstream: str, repository: str, tag: str) -> str:
        return f"{self._prefix}tag:{upstream}\0{repository}\0{tag}"

    def _listing_key(self, upstream: str, repository: str, query: str) -> str:
        return f"{self._prefix}list:{upstream}\0{repository}\0{query}"

    def _listing_keys(self, page: str) -> list[str]:
        lists = f"{self._prefix}lists"
        return [page, lists, f"{lists}:sizes", f"{lists}:bytes"]

    def _scan(self, kind: str) -> Iterator[tuple[str, list[str]]]:
        """(key, its names split) of every key of ``kind`` ("tag", "list")."""
        start = f"{self._prefix}{kind}:"
        for raw in self._sync.scan_iter(match=glob_escape(start) + "*", count=SCAN_BATCH):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            names = key.removeprefix(start).split("\0")
            if len(names) == 3:
                yield key, names

    def _lookup_failed(self, what: str, exc: RedisError) -> None:
        # One line a minute: Redis down means every lookup fails.
        now = time.monotonic()
        if now - self._warned >= 60:
            self._warned = now
            log.warning("Redis: reading %s failed, asking the upstream instead: %s", what, exc)

    # -- the server's calls ---------------------------------------------------------

    async def get(self, upstream: str, repository: str, tag: str, accept: str) -> TagEntry | None:
        try:
            raw = await self._async.hget(self._tag_key(upstream, repository, tag), accept)
        except RedisError as exc:
            self._lookup_failed(f"the tag {repository}:{tag}", exc)
            return None
        return None if raw is None else _entry(raw)

    async def put(
        self, upstream: str, repository: str, tag: str, accept: str, entry: TagEntry
    ) -> None:
        try:
            await self._async.hset(self._tag_key(upstream, repository, tag), accept, _encode(entry))
        except RedisError as exc:
            self._failures.record(f"the tag index entry for {repository}", exc)

    async def get_listing(self, upstream: str, repository: str, query: str) -> Listing | None:
        try:
            raw: dict[bytes, bytes] = await self._async.hgetall(  # type: ignore[assignment]
                self._listing_key(upstream, repository, query)
            )
        except RedisError as exc:
            self._lookup_failed(f"the tag list of {repository}", exc)
            return None
        return _listing(raw)

    async def put_listing(
        self, upstream: str, repository: str, query: str, listing: Listing
    ) -> None:
        page = self._listing_key(upstream, repository, query)
        try:
            await self._put_listing(keys=self._listing_keys(page), args=self._listing_args(listing))
        except RedisError as exc:
            self._failures.record(f"the tag list of {repository}", exc)

    def _listing_args(self, listing: Listing, *, only_new: bool = False) -> list[Any]:
        return [
            listing.body,
            listing.link or "",
            "0" if listing.link is None else "1",
            repr(listing.fetched_at),
            repr(time.time()),
            self._listings_limit,
            "1" if only_new else "0",
        ]

    # -- blocking calls, for the command line ---------------------------------------

    def get_sync(self, upstream: str, repository: str, tag: str, accept: str) -> TagEntry | None:
        raw = self._sync.hget(self._tag_key(upstream, repository, tag), accept)
        return None if raw is None else _entry(raw)

    def put_sync(
        self, upstream: str, repository: str, tag: str, accept: str, entry: TagEntry
    ) -> None:
        self._sync.hset(self._tag_key(upstream, repository, tag), accept, _encode(entry))

    def tags(self) -> Iterator[tuple[str, str, str, str, TagEntry]]:
        """Every (upstream, repository, tag, accept, entry) recorded."""
        batch: list[tuple[str, list[str]]] = []
        for found in self._scan("tag"):
            batch.append(found)
            if len(batch) == SCAN_BATCH:
                yield from self._entries(batch)
                batch = []
        yield from self._entries(batch)

    def _entries(
        self, batch: list[tuple[str, list[str]]]
    ) -> Iterator[tuple[str, str, str, str, TagEntry]]:
        """The entries of these tag keys, read in one round trip."""
        with self._sync.pipeline(transaction=False) as pipe:
            for key, _ in batch:
                pipe.hgetall(key)
            answers: list[dict[bytes, bytes]] = pipe.execute()
        for (_, (upstream, repository, tag)), fields in zip(batch, answers, strict=True):
            for accept, raw in fields.items():
                entry = _entry(raw)
                if entry is not None:
                    yield upstream, repository, tag, accept.decode(), entry

    def rekey(self, names: dict[str, str]) -> int:
        """Move tags and tag lists recorded under an upstream's URL to its name
        (``names``: URL -> name); an entry already under the name wins."""
        moved = 0
        for key, (upstream, repository, tag) in list(self._scan("tag")):
            name = names.get(upstream)
            if name is None:
                continue
            fields: dict[bytes, bytes] = self._sync.hgetall(key)  # type: ignore[assignment]
            new = self._tag_key(name, repository, tag)
            with self._sync.pipeline(transaction=True) as pipe:
                for accept, raw in fields.items():
                    pipe.hsetnx(new, accept, raw)
                pipe.delete(key)
                pipe.execute()
            moved += len(fields)
        for key, (upstream, repository, query) in list(self._scan("list")):
            name = names.get(upstream)
            if name is None:
                continue
            listing = _listing(self._sync.hgetall(key))  # type: ignore[arg-type]
            if listing is not None:
                page = self._listing_key(name, repository, query)
                self._put_listing_sync(
                    keys=self._listing_keys(page), args=self._listing_args(listing, only_new=True)
                )
            self._drop_listing_sync(keys=self._listing_keys(key))
            moved += 1
        return moved

    def pins(self) -> set[str]:
        members: set[bytes] = self._sync.smembers(f"{self._prefix}pins")  # type: ignore[assignment]
        self._pins_seen = {m.decode() for m in members}
        return set(self._pins_seen)

    def set_pins(self, pins: set[str]) -> None:
        """Make the pins ``pins``: as a change from what ``pins()`` (or the last
        ``set_pins``) of this handle saw, so that two nodes pinning at once both
        keep their pin (``pullthrough cache pin`` reads, adds, then writes)."""
        key = f"{self._prefix}pins"
        with self._sync.pipeline(transaction=True) as pipe:
            if self._pins_seen is None:
                pipe.delete(key)
                added, removed = pins, set()
            else:
                added, removed = pins - self._pins_seen, self._pins_seen - pins
            if added:
                pipe.sadd(key, *sorted(added))
            if removed:
                pipe.srem(key, *sorted(removed))
            pipe.execute()
        self._pins_seen = set(pins)

    def ping(self) -> None:
        """Raise RedisError unless Redis answers (checked at start-up)."""
        self._sync.ping()

    def close(self) -> None:
        """Close the blocking client; the server also awaits ``aclose``."""
        self._sync.close()

    async def aclose(self) -> None:
        await self._async.aclose()
        self._sync.close()

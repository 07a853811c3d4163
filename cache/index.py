"""The tag index: which digest a tag pointed to, for which Accept set, and when."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import diskcache

from pullthrough.cache.space import WriteFailures, keep_reserve, release_reserve


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: str
    media_type: str
    fetched_at: float

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.fetched_at


@dataclass(frozen=True, slots=True)
class Listing:
    """A page of ``tags/list`` as the upstream sent it, or a referrers index."""

    body: bytes
    link: str | None
    fetched_at: float

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.fetched_at


# Tag entries and pins are never evicted by diskcache itself (its default is to drop
# the least recently stored entries past 1 GiB, silently, pins included). Their key
# space is bounded instead: (upstream, repository, tag) of manifests the upstream
# really served, times the few Accept sets the mirror tells apart (proxy/mirror.py).
# The size limit is then only a ceiling on SQLite's own bookkeeping, never reached.
ENTRIES_SIZE_LIMIT = 1 << 62
# Tag list pages are keyed by what clients ask for (?n=&last=): a cache, not a record,
# so least recently stored pages go first beyond this.
LISTINGS_SIZE_LIMIT = 64 << 20


class TagIndex:
    """diskcache (SQLite) underneath: safe across worker processes.

    ``<directory>`` holds tag entries and pins, ``<directory>/listings`` tag list
    pages. diskcache is synchronous and may wait on SQLite's lock, so every call
    from the server goes to a worker thread.
    """

    def __init__(self, directory: Path, failures: WriteFailures | None = None) -> None:
        # Beside the index (<directory>.reserve): space SQLite can have when a
        # full disk would keep it from opening (cache/space.py).
        reserve = directory.with_name(directory.name + ".reserve")
        try:
            self._cache, self._listings = self._open(directory)
        except (sqlite3.OperationalError, OSError):
            if not release_reserve(reserve):
                raise
            self._cache, self._listings = self._open(directory)
        keep_reserve(reserve)
        self._failures = failures or WriteFailures()

    @staticmethod
    def _open(directory: Path) -> tuple[diskcache.Cache, diskcache.Cache]:
        entries = diskcache.Cache(
            str(directory), eviction_policy="none", size_limit=ENTRIES_SIZE_LIMIT
        )
        try:
            listings = diskcache.Cache(
                str(directory / "listings"),
                eviction_policy="least-recently-stored",
                size_limit=LISTINGS_SIZE_LIMIT,
            )
        except BaseException:
            entries.close()
            raise
        return entries, listings

    def _set_or_forget(self, cache: diskcache.Cache, key: str, value: object) -> None:
        """Record ``key``, unless the disk cannot take it (full, failing): then the
        answer is still given, and the upstream is asked again next time."""
        try:
            cache.set(key, value)
        except (sqlite3.OperationalError, OSError) as exc:
            repository = key.split("\0")[2]
            self._failures.record(f"the tag index entry for {repository}", exc)

    @staticmethod
    def _key(upstream: str, repository: str, tag: str, accept: str) -> str:
        return f"tag\0{upstream}\0{repository}\0{tag}\0{accept}"

    async def get(self, upstream: str, repository: str, tag: str, accept: str) -> TagEntry | None:
        return await asyncio.to_thread(self.get_sync, upstream, repository, tag, accept)

    async def put(
        self, upstream: str, repository: str, tag: str, accept: str, entry: TagEntry
    ) -> None:
        value = (entry.digest, entry.media_type, entry.fetched_at)
        await asyncio.to_thread(
            self._set_or_forget, self._cache, self._key(upstream, repository, tag, accept), value
        )

    async def get_listing(self, upstream: str, repository: str, query: str) -> Listing | None:
        key = f"list\0{upstream}\0{repository}\0{query}"
        raw = await asyncio.to_thread(self._listings.get, key)
        if not isinstance(raw, tuple) or len(raw) != 3:
            return None
        body, link, fetched_at = raw
        return Listing(bytes(body), None if link is None else str(link), float(fetched_at))

    async def put_listing(
        self, upstream: str, repository: str, query: str, listing: Listing
    ) -> None:
        value = (listing.body, listing.link, listing.fetched_at)
        key = f"list\0{upstream}\0{repository}\0{query}"
        await asyncio.to_thread(self._set_or_forget, self._listings, key, value)

    # -- blocking access, for the command line and background jobs ---------------

    def get_sync(self, upstream: str, repository: str, tag: str, accept: str) -> TagEntry | None:
        raw = self._cache.get(self._key(upstream, repository, tag, accept))
        if not isinstance(raw, tuple) or len(raw) != 3:
            return None
        digest, media_type, fetched_at = raw
        return TagEntry(str(digest), str(media_type), float(fetched_at))

    def put_sync(
        self, upstream: str, repository: str, tag: str, accept: str, entry: TagEntry
    ) -> None:
        value = (entry.digest, entry.media_type, entry.fetched_at)
        self._cache.set(self._key(upstream, repository, tag, accept), value)

    def tags(self) -> Iterator[tuple[str, str, str, str, TagEntry]]:
        """Every (upstream, repository, tag, accept, entry) recorded."""
        for key in list(self._cache.iterkeys()):
            if not isinstance(key, str) or not key.startswith("tag\0"):
                continue
            _, upstream, repository, tag, accept = key.split("\0")
            entry = self.get_sync(upstream, repository, tag, accept)
            if entry is not None:
                yield upstream, repository, tag, accept, entry

    def rekey(self, names: dict[str, str]) -> int:
        """Move tags and tag lists recorded under an upstream's URL (as before
        they were keyed by the upstream's name) to its name; ``names`` maps URL
        to name. An entry already under the name is newer and wins. Tag lists
        kept beside the tags (where they were before they had a store of their
        own) are dropped: they are a cache of the upstream, asked again. Returns
        how many entries moved."""
        moved = 0
        for cache in (self._cache, self._listings):
            for key in list(cache.iterkeys()):
                if not isinstance(key, str) or not key.startswith(("tag\0", "list\0")):
                    continue
                kind, upstream, rest = key.split("\0", 2)
                if kind == "list" and cache is self._cache:
                    cache.delete(key)
                    continue
                name = names.get(upstream)
                if name is None:
                    continue
                value = cache.get(key)
                if value is not None:
                    cache.add(f"{kind}\0{name}\0{rest}", value)  # add: never overwrites
                cache.delete(key)
                moved += 1
        return moved

    def pins(self) -> set[str]:
        raw = self._cache.get("pins", ())
        return {str(p) for p in raw} if isinstance(raw, tuple | list | set) else set()

    def set_pins(self, pins: set[str]) -> None:
        self._cache.set("pins", tuple(sorted(pins)))

    def volume(self) -> int:
        """Bytes the index takes on disk (SQLite and value files), both parts."""
        return int(self._cache.volume()) + int(self._listings.volume())

    def close(self) -> None:
        self._cache.close()
        self._listings.close()

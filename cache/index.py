"""The tag index: which digest a tag pointed to, for which Accept set, and when."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import diskcache


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: str
    media_type: str
    fetched_at: float

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.fetched_at


@dataclass(frozen=True, slots=True)
class Listing:
    """A page of ``tags/list`` as the upstream sent it."""

    body: bytes
    link: str | None
    fetched_at: float

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.fetched_at


class TagIndex:
    """diskcache (SQLite) underneath: safe across worker processes.

    diskcache is synchronous and may wait on SQLite's lock, so every call goes to a
    worker thread.
    """

    def __init__(self, directory: Path) -> None:
        self._cache = diskcache.Cache(str(directory))

    @staticmethod
    def _key(upstream: str, repository: str, tag: str, accept: str) -> str:
        return f"tag\0{upstream}\0{repository}\0{tag}\0{accept}"

    async def get(self, upstream: str, repository: str, tag: str, accept: str) -> TagEntry | None:
        raw = await asyncio.to_thread(self._cache.get, self._key(upstream, repository, tag, accept))
        if not isinstance(raw, tuple) or len(raw) != 3:
            return None
        digest, media_type, fetched_at = raw
        return TagEntry(str(digest), str(media_type), float(fetched_at))

    async def put(
        self, upstream: str, repository: str, tag: str, accept: str, entry: TagEntry
    ) -> None:
        value = (entry.digest, entry.media_type, entry.fetched_at)
        await asyncio.to_thread(
            self._cache.set, self._key(upstream, repository, tag, accept), value
        )

    async def get_listing(self, upstream: str, repository: str, query: str) -> Listing | None:
        raw = await asyncio.to_thread(self._cache.get, f"list\0{upstream}\0{repository}\0{query}")
        if not isinstance(raw, tuple) or len(raw) != 3:
            return None
        body, link, fetched_at = raw
        return Listing(bytes(body), None if link is None else str(link), float(fetched_at))

    async def put_listing(
        self, upstream: str, repository: str, query: str, listing: Listing
    ) -> None:
        value = (listing.body, listing.link, listing.fetched_at)
        key = f"list\0{upstream}\0{repository}\0{query}"
        await asyncio.to_thread(self._cache.set, key, value)

    def close(self) -> None:
        self._cache.close()

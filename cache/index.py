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

    def close(self) -> None:
        self._cache.close()

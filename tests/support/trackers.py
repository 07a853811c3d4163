"""Reading a blob download the way a client does, for the blob store tests."""

from __future__ import annotations

import asyncio

from pullthrough.cache.storage import Tracker


async def read_all(tracker: Tracker, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in tracker.read(start, end)])


def reading(tracker: Tracker) -> tuple[asyncio.Task[None], bytearray]:
    """Read the whole blob in a task; what arrived so far is in the bytearray."""
    got = bytearray()

    async def read() -> None:
        async for chunk in tracker.read(0, None):
            got.extend(chunk)

    return asyncio.create_task(read()), got

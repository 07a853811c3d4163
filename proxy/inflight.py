"""Single flight: concurrent callers asking for the same key share one call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._calls: dict[K, asyncio.Task[V]] = {}

    async def run(self, key: K, call: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """Result of ``call()``, run once for all callers of ``key`` at a time.

        Returns (result, shared): ``shared`` is True for callers that joined a
        call another caller started. The call runs as its own task, so one caller
        going away does not cancel it for the others.
        """
        task = self._calls.get(key)
        shared = task is not None
        if task is None:

            async def runner() -> V:
                return await call()

            task = asyncio.create_task(runner())
            self._calls[key] = task
            task.add_done_callback(lambda _: self._calls.pop(key, None))
        return await asyncio.shield(task), shared

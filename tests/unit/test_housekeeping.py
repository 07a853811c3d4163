"""The background eviction loop stops when it is told to, whatever else happens."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pullthrough.cache.evict import Eviction
from pullthrough.proxy.housekeeping import Housekeeper
from tests.support.mirror import settings_for


class Counting(Housekeeper):
    passes = 0

    def run_once(self, *, dry_run: bool = False, free_bytes: int = 0) -> Eviction | None:
        self.passes += 1
        return None


async def test_a_cancel_that_meets_a_wake_up_still_stops_the_loop(tmp_path: Path) -> None:
    """A commit pokes the loop just as the server shuts down: asyncio.wait_for on
    3.11 would swallow that cancellation, and shutdown would hang for ever."""
    images: Any = None  # run_once is replaced: the stores are never looked at
    keeper = Counting(settings_for(tmp_path, "http://127.0.0.1:9", max_size=1 << 20), images)
    task = asyncio.create_task(keeper.run_forever())
    await asyncio.sleep(0)  # waiting for a wake-up now
    keeper.poke()
    await asyncio.sleep(0)  # the wake-up has arrived, the loop has not run yet
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    assert task in done
    assert task.cancelled()

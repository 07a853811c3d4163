"""The in-process fetch locks: one holder per key, waiters told of the release."""

from __future__ import annotations

import asyncio

import pytest

from pullthrough.cache.coordination import LocalLocks


async def test_one_holder_per_key_and_waiters_learn_the_commit() -> None:
    locks = LocalLocks()
    lease = await locks.acquire("sha256:a")
    assert lease is not None
    assert not lease.lost
    assert await locks.acquire("sha256:a") is None
    assert await locks.acquire("sha256:b") is not None

    waiter = asyncio.create_task(locks.wait("sha256:a"))
    await asyncio.sleep(0)
    assert not waiter.done()
    await lease.release(committed=True)
    assert await waiter is True
    assert await locks.acquire("sha256:a") is not None


async def test_a_wait_outlives_no_timeout_and_reports_a_failed_fetch() -> None:
    locks = LocalLocks()
    lease = await locks.acquire("k")
    assert lease is not None
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await locks.wait("k")
    waiter = asyncio.create_task(locks.wait("k"))
    await asyncio.sleep(0)
    await lease.release(committed=False)
    assert await waiter is False
    assert await locks.wait("k") is False  # free: look in the store
    await locks.close()

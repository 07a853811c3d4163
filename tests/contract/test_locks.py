"""Fetch-lock contract: one holder per key across handles (processes, nodes),
waiters told whether the holder committed; on Redis also a holder that dies.

Every implementation runs the same tests; each handle stands for another
process (for Redis: its own client and connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio
from redis.exceptions import RedisError

from pullthrough.cache.coordination import FetchLocks, LocalLocks
from pullthrough.cache.redis_locks import RedisLocks
from tests.support import processes
from tests.support.redis import RedisServer

KEY = "sha256:" + "a" * 64


@dataclass
class Locks:
    handle: Callable[[], FetchLocks]
    # How many waiters are waiting on a key right now.
    waiting: Callable[[str], Awaitable[int]]


async def _local() -> AsyncIterator[Locks]:
    shared = LocalLocks()

    async def waiting(key: str) -> int:
        await asyncio.sleep(0)  # let new waiters reach their event
        lease = shared.held.get(key)
        return 0 if lease is None else len(lease.released._waiters or ())

    yield Locks(lambda: shared, waiting)
    await shared.close()


async def _redis(server: RedisServer) -> AsyncIterator[Locks]:
    prefix = server.prefix()
    opened: list[RedisLocks] = []

    def handle() -> FetchLocks:
        locks = RedisLocks.from_url(server.url, prefix=prefix)
        opened.append(locks)
        return locks

    async def waiting(key: str) -> int:
        return sum(locks.waiting(key) for locks in opened)

    yield Locks(handle, waiting)
    for locks in opened:
        await locks.close()


@pytest.fixture(params=["local", "redis"])
async def locks(request: pytest.FixtureRequest) -> AsyncIterator[Locks]:
    local = request.param == "local"
    made = _local() if local else _redis(request.getfixturevalue("redis_server"))
    async for value in made:
        yield value


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` (state in another process or server: nothing to await)."""
    async with asyncio.timeout(10):
        while not await check():  # noqa: ASYNC110 (nothing to await in this process)
            await asyncio.sleep(0.01)


async def _until_waiting(locks: Locks, key: str, count: int) -> None:
    async def enough() -> bool:
        return await locks.waiting(key) >= count

    await _until(enough)


async def test_one_holder_among_many_concurrent_acquirers(locks: Locks) -> None:
    handles = [locks.handle() for _ in range(3)]
    got = await asyncio.gather(*(handles[i % 3].acquire(KEY) for i in range(20)))
    held = [lease for lease in got if lease is not None]
    assert len(held) == 1
    assert held[0].key == KEY
    assert not held[0].lost
    assert await handles[1].acquire(KEY) is None
    assert await handles[1].acquire(KEY.replace("a", "b")) is not None  # another key
    await held[0].release(committed=True)
    again = await handles[2].acquire(KEY)
    assert again is not None
    await again.release(committed=False)


@pytest.mark.parametrize("committed", [True, False])
async def test_waiters_learn_whether_the_holder_committed(locks: Locks, committed: bool) -> None:
    handles = [locks.handle() for _ in range(3)]
    lease = await handles[0].acquire(KEY)
    assert lease is not None
    waiters = [asyncio.create_task(handles[i % 3].wait(KEY)) for i in range(6)]
    await _until_waiting(locks, KEY, 6)
    assert not any(w.done() for w in waiters)
    await lease.release(committed=committed)
    async with asyncio.timeout(10):
        assert await asyncio.gather(*waiters) == [committed] * 6


async def test_waiting_on_a_free_key_returns_at_once(locks: Locks) -> None:
    async with asyncio.timeout(10):
        assert await locks.handle().wait(KEY) is False


async def test_releasing_twice_changes_nothing(locks: Locks) -> None:
    first, second = locks.handle(), locks.handle()
    lease = await first.acquire(KEY)
    assert lease is not None
    await lease.release(committed=True)
    other = await second.acquire(KEY)
    assert other is not None
    await lease.release(committed=False)  # must not free the new holder's key
    assert await first.acquire(KEY) is None
    await other.release(committed=True)


# -- Redis only: holders that die or lose their lease --------------------------------

HOLDER = """
import asyncio, sys
from pullthrough.cache.redis_locks import RedisLocks

async def main():
    locks = RedisLocks.from_url(sys.argv[1], prefix=sys.argv[2],
                                lease_seconds=float(sys.argv[4]), renew_seconds=0.2)
    lease = await locks.acquire(sys.argv[3])
    print("held" if lease else "busy", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_killed_holders_lease_runs_out_and_another_node_takes_over(
    redis_server: RedisServer,
) -> None:
    prefix, lease_seconds = redis_server.prefix(), 1.0
    holder = subprocess.Popen(  # noqa: ASYNC220 (its pipe is read in a thread)
        [sys.executable, "-c", HOLDER, redis_server.url, prefix, KEY, str(lease_seconds)],
        stdout=subprocess.PIPE,
    )
    locks = RedisLocks.from_url(redis_server.url, prefix=prefix)
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(holder.stdout.readline), 20)
        assert line == b"held\n"
        # Renewed past its first lease: still held by the live holder.
        await asyncio.sleep(lease_seconds * 1.5)
        assert await locks.acquire(KEY) is None
        waiter = asyncio.create_task(locks.wait(KEY))
        processes.kill(holder)  # SIGKILL: no release, no publish
        async with asyncio.timeout(lease_seconds + 5):
            assert await waiter is False  # expired, not committed
        lease = await locks.acquire(KEY)
        assert lease is not None
        await lease.release(committed=False)
    finally:
        processes.kill(holder)
        if holder.stdout is not None:
            holder.stdout.close()
        await locks.close()


async def test_a_lost_lease_is_reported_and_its_release_frees_nothing(
    redis_server: RedisServer,
) -> None:
    locks = RedisLocks.from_url(
        redis_server.url, prefix=redis_server.prefix(), lease_seconds=2.0, renew_seconds=0.05
    )
    other = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        lease = await locks.acquire(KEY)
        assert lease is not None
        assert not lease.lost
        # As if the lease had run out while the holder stalled and another took it.
        await other.set(locks.lock_key(KEY), "someone-else", px=60_000)

        async def lost() -> bool:
            return lease.lost

        await _until(lost)
        await lease.release(committed=False)
        assert await other.get(locks.lock_key(KEY)) == b"someone-else"
    finally:
        await other.aclose()
        await locks.close()


async def test_without_redis_locks_hold_in_the_process_and_redis_is_used_again(
    tmp_path: Path,
) -> None:
    with RedisServer(tmp_path / "redis") as server:
        options = {"lease_seconds": 2.0, "renew_seconds": 0.5}
        holder = RedisLocks.from_url(server.url, **options)
        waiter = RedisLocks.from_url(server.url, **options)
        admin = redis.asyncio.Redis.from_url(server.url)
        try:
            first = await holder.acquire(KEY)
            assert first is not None
            before = asyncio.create_task(waiter.wait(KEY))  # subscribes
            await _until_waiting(Locks(lambda: waiter, _count(waiter)), KEY, 1)
            server.stop()
            async with asyncio.timeout(30):
                assert await before is False  # unknown: look in the store
            # Redis away: one holder per key in this process still.
            local = await holder.acquire("other")
            assert local is not None
            assert await holder.acquire("other") is None
            told = asyncio.create_task(holder.wait("other"))
            await asyncio.sleep(0)
            await local.release(committed=True)
            assert await told is True

            server.start()  # same port, empty

            async def resubscribed() -> bool:
                with contextlib.suppress(RedisError):
                    answer = await admin.execute_command("PUBSUB", "NUMPAT")  # type: ignore[no-untyped-call]
                    return int(answer) == 1
                return False

            await _until(resubscribed)
            second = await holder.acquire(KEY)
            assert second is not None
            assert await admin.exists(holder.lock_key(KEY)) == 1  # in Redis again
            after = asyncio.create_task(waiter.wait(KEY))
            await _until_waiting(Locks(lambda: waiter, _count(waiter)), KEY, 1)
            await second.release(committed=True)
            async with asyncio.timeout(10):
                assert await after is True  # told by pub/sub again
        finally:
            await admin.aclose()
            await holder.close()
            await waiter.close()


def _count(locks: RedisLocks) -> Callable[[str], Awaitable[int]]:
    async def waiting(key: str) -> int:
        return locks.waiting(key)

    return waiting

"""Fetch locks and the tag index on Redis, measured on a real redis-server.

    python -m bench.redis                 # all figures
    python -m bench.redis --rounds 5000

Figures (loopback, one event loop per client):
- lock acquire latency (``SET NX PX``), uncontended, p50/p99, RedisLocks beside
  LocalLocks;
- release -> waiter woken on another client (pub/sub), p50/p99;
- a holder process SIGKILLed -> another client holds the lock: the lease's rest,
  for a 2 s lease renewed every 0.5 s and for the defaults (15 s, 5 s);
- tag lookups a second, 64 at a time from one process: RedisTags beside the
  SQLite TagIndex.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pullthrough.cache.coordination import LEASE_SECONDS, RENEW_SECONDS, FetchLocks, LocalLocks
from pullthrough.cache.index import TagEntry, TagIndex
from pullthrough.cache.redis_locks import RedisLocks
from pullthrough.cache.redis_tags import RedisTags
from pullthrough.cache.storage import TagStorage
from tests.support.redis import RedisServer

HOLDER = """
import asyncio, sys
from pullthrough.cache.redis_locks import RedisLocks

async def main():
    locks = RedisLocks.from_url(sys.argv[1], prefix=sys.argv[2],
                                lease_seconds=float(sys.argv[4]), renew_seconds=float(sys.argv[5]))
    lease = await locks.acquire(sys.argv[3])
    print("held" if lease else "busy", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _ms(values: list[float]) -> str:
    cuts = statistics.quantiles(values, n=100)
    return f"p50 {cuts[49] * 1000:.3f} ms, p99 {cuts[98] * 1000:.3f} ms"


async def acquire_latency(locks: FetchLocks, rounds: int) -> list[float]:
    seen = []
    for n in range(rounds):
        start = time.perf_counter()
        lease = await locks.acquire(f"bench-{n}")
        seen.append(time.perf_counter() - start)
        assert lease is not None
        await lease.release(committed=True)
    return seen


async def wake_latency(url: str, rounds: int) -> list[float]:
    holder, waiter = RedisLocks.from_url(url), RedisLocks.from_url(url)
    seen = []
    try:
        for n in range(rounds):
            key = f"wake-{n}"
            lease = await holder.acquire(key)
            assert lease is not None
            waiting = asyncio.create_task(waiter.wait(key))
            while waiter.waiting(key) == 0:  # noqa: ASYNC110 (a count, not an event)
                await asyncio.sleep(0)
            await asyncio.sleep(0.001)  # let it reach its PTTL check and wait
            start = time.perf_counter()
            await lease.release(committed=True)
            assert await waiting is True
            seen.append(time.perf_counter() - start)
    finally:
        await holder.close()
        await waiter.close()
    return seen


async def takeover(url: str, lease: float, renew: float) -> tuple[float, float]:
    """Seconds from SIGKILL to the waiter waking, and to holding the lock."""
    prefix = f"takeover-{lease}:"
    proc = subprocess.Popen(  # noqa: ASYNC220 (its pipe is read in a thread)
        [sys.executable, "-c", HOLDER, url, prefix, "k", str(lease), str(renew)],
        stdout=subprocess.PIPE,
    )
    locks = RedisLocks.from_url(url, prefix=prefix, lease_seconds=lease, renew_seconds=renew)
    try:
        assert proc.stdout is not None
        assert (await asyncio.to_thread(proc.stdout.readline)) == b"held\n"
        await asyncio.sleep(lease * 0.7)  # somewhere inside a renewal period
        waiting = asyncio.create_task(locks.wait("k"))
        proc.kill()
        proc.wait()
        killed = time.perf_counter()
        assert await waiting is False
        woke = time.perf_counter() - killed
        got = await locks.acquire("k")
        assert got is not None
        held = time.perf_counter() - killed
        await got.release(committed=False)
        return woke, held
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        await locks.close()


async def lookups_per_second(tags: TagStorage, total: int, concurrency: int = 64) -> float:
    entry = TagEntry("sha256:" + "a" * 64, "application/vnd.oci.image.index.v1+json", time.time())
    for n in range(100):
        await tags.put("docker.io", f"library/img{n}", "latest", "*", entry)
    left = iter(range(total))

    async def worker() -> None:
        for n in left:
            assert await tags.get("docker.io", f"library/img{n % 100}", "latest", "*") == entry

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - start)


async def run(rounds: int, defaults: bool) -> None:
    with tempfile.TemporaryDirectory() as work, RedisServer(Path(work) / "redis") as server:
        local = LocalLocks()
        print("acquire, LocalLocks:", _ms(await acquire_latency(local, rounds)))
        redis_locks = RedisLocks.from_url(server.url)
        await acquire_latency(redis_locks, 100)  # connections and scripts loaded
        print("acquire, RedisLocks:", _ms(await acquire_latency(redis_locks, rounds)))
        await redis_locks.close()
        print("release -> waiter woken:", _ms(await wake_latency(server.url, min(rounds, 500))))
        for lease, renew in [(2.0, 0.5)] + ([(LEASE_SECONDS, RENEW_SECONDS)] if defaults else []):
            runs = [await takeover(server.url, lease, renew) for _ in range(3 if lease < 5 else 1)]
            print(
                f"SIGKILL -> takeover, lease {lease:g} s renewed every {renew:g} s: "
                + ", ".join(f"woken {w:.2f} s / held {h:.2f} s" for w, h in runs)
            )
        redis_tags = RedisTags(server.url, prefix="bench:")
        sqlite_tags = TagIndex(Path(work) / "index")
        try:
            for name, tags in (("RedisTags", redis_tags), ("TagIndex (SQLite)", sqlite_tags)):
                await lookups_per_second(tags, 2000)  # warm up
                rate = await lookups_per_second(tags, rounds * 5)
                print(f"tag lookups, {name}: {rate:,.0f}/s")
        finally:
            await redis_tags.aclose()
            sqlite_tags.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--no-defaults", action="store_true", help="skip the 15 s lease run")
    args = parser.parse_args()
    asyncio.run(run(args.rounds, not args.no_defaults))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fetch locks on Redis: one holder per key across every node sharing one Redis.

A lock is the key ``<prefix>lock:<key>`` holding a random token, set with
``SET NX PX`` so it lives ``lease_seconds`` unless renewed. The holder renews it
every ``renew_seconds`` with a script that extends it only while it still holds
its own token; a renewal that finds another token (or none), or no renewal
succeeding for a whole lease, marks the lease lost. Release deletes the key the
same way (only our token) and publishes ``1`` (committed) or ``0`` on
``<prefix>released:<key>``.

While Redis cannot be asked, locks fall back to this process's own
(``LocalLocks``): a fleet without Redis fetches a blob once per node rather than
not at all, and the store's verified commit keeps every copy whole.

Each ``RedisLocks`` subscribes once to every such channel (one pattern, one
connection, however many waits run) and hands messages to its waiters. A waiter
registers before it looks at the key, so a release between the two cannot be
missed; while no message comes it re-reads the key's remaining time, so a holder
that died without releasing (SIGKILL, a lost network) frees its waiters when the
lease runs out, not never.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

import redis.asyncio
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from pullthrough.cache.coordination import LEASE_SECONDS, RENEW_SECONDS, Lease, LocalLocks
from pullthrough.cache.redis_client import async_client, glob_escape

log = logging.getLogger(__name__)

PREFIX = "pullthrough:"
# Extend the lease (milliseconds in ARGV[2]) only while it holds our token.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
# Delete the lock only while it holds our token; tell waiters either way when a
# commit happened (the object is in the store whoever holds the key now).
_RELEASE = """
local held = redis.call('get', KEYS[1]) == ARGV[1]
if held then redis.call('del', KEYS[1]) end
if held or ARGV[2] == '1' then redis.call('publish', KEYS[2], ARGV[2]) end
if held then return 1 end
return 0
"""
# When nobody publishes, a waiter re-reads the key this long after the moment its
# lease would run out (and at least once a lease).
_RECHECK_SLACK = 0.05
# While Redis fails, say so at most this often.
_WARN_EVERY_SECONDS = 60.0


class RedisLease:
    """A held lock, renewed by a background task until released."""

    def __init__(self, locks: RedisLocks, key: str, token: str, sent: float) -> None:
        self.key = key
        self._locks = locks
        self._token = token
        # Past this (monotonic) moment the key may have expired: one lease after
        # the SET, or the last renewal that succeeded, was sent.
        self._valid_until = sent + locks.lease_seconds
        self._lost = False
        self._released = False
        self._heartbeat = asyncio.create_task(self._renew(), name=f"lease {key}")

    @property
    def lost(self) -> bool:
        return self._lost or time.monotonic() >= self._valid_until

    async def _renew(self) -> None:
        locks = self._locks
        while True:
            await asyncio.sleep(locks.renew_seconds)
            sent = time.monotonic()
            try:
                extended = await locks.renew_script(
                    keys=[locks.lock_key(self.key)],
                    args=[self._token, int(locks.lease_seconds * 1000)],
                )
            except RedisError as exc:
                # Not lost yet: the key lives until _valid_until; keep trying.
                log.warning("renewing the fetch lock on %s failed: %s", self.key, exc)
                if self.lost:
                    self._lost = True
                    return
                continue
            if not extended:
                self._lost = True
                log.warning("the fetch lock on %s was lost (its lease ran out)", self.key)
                return
            self._valid_until = sent + locks.lease_seconds

    async def release(self, *, committed: bool) -> None:
        if self._released:
            return
        self._released = True
        self._locks.leases.discard(self)
        self._heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._heartbeat
        locks = self._locks
        try:
            await locks.release_script(
                keys=[locks.lock_key(self.key), locks.channel(self.key)],
                args=[self._token, "1" if committed else "0"],
            )
        except RedisError as exc:
            # The lease runs out by itself; waiters notice that.
            log.warning("releasing the fetch lock on %s failed: %s", self.key, exc)


class RedisLocks:
    """``FetchLocks`` on Redis (see the module doc)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str = PREFIX,
        lease_seconds: float = LEASE_SECONDS,
        renew_seconds: float = RENEW_SECONDS,
    ) -> None:
        if not 0 < renew_seconds < lease_seconds:
            raise ValueError("renew_seconds must be positive and shorter than lease_seconds")
        self.client = client
        self.prefix = prefix
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self.renew_script = client.register_script(_RENEW)
        self.release_script = client.register_script(_RELEASE)
        self.leases: set[RedisLease] = set()  # held here, released on close
        self._waiters: dict[str, set[asyncio.Future[bool]]] = {}
        self._subscribing = asyncio.Lock()
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._local = LocalLocks()  # while Redis cannot be asked
        self._warned = -_WARN_EVERY_SECONDS

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisLocks:
        return cls(async_client(url), **options)

    def lock_key(self, key: str) -> str:
        return f"{self.prefix}lock:{key}"

    def channel(self, key: str) -> str:
        return f"{self.prefix}released:{key}"

    def _unreachable(self, exc: RedisError) -> None:
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY_SECONDS:
            self._warned = now
            log.warning("Redis: fetch locks held in this process only for now: %s", exc)

    async def acquire(self, key: str) -> Lease | None:
        token = secrets.token_hex(16)
        sent = time.monotonic()
        try:
            taken = await self.client.set(
                self.lock_key(key), token, nx=True, px=int(self.lease_seconds * 1000)
            )
        except RedisError as exc:
            self._unreachable(exc)
            return await self._local.acquire(key)
        if not taken:
            return None
        lease = RedisLease(self, key, token, sent)
        self.leases.add(lease)
        return lease

    def waiting(self, key: str) -> int:
        """How many ``wait`` calls on ``key`` are pending in this process."""
        return len(self._waiters.get(key, ()))

    async def wait(self, key: str) -> bool:
        if key in self._local.held:  # taken while Redis could not be asked
            return await self._local.wait(key)
        try:
            await self._listen()
        except RedisError as exc:
            self._unreachable(exc)
            return False
        told: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, set()).add(told)
        try:
            # Registered, and the subscription is live: a release from now on
            # resolves ``told``, so looking at the key now cannot miss one.
            while True:
                left = await self.client.pttl(self.lock_key(key))
                if told.done():  # released while the key was read
                    return told.result()
                if left < 0:  # -2: no such key (released or expired)
                    return False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(
                        min(left / 1000 + _RECHECK_SLACK, self.lease_seconds)
                    ):
                        return await asyncio.shield(told)
        except RedisError as exc:
            # Unknown: "not committed" has the caller look in the store and try
            # to fetch (a lock of this process's own if Redis is still away).
            self._unreachable(exc)
            return False
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(told)
                if not waiters:
                    del self._waiters[key]

    async def _listen(self) -> None:
        """Subscribe to every release (one pattern, one connection for all waits)."""
        async with self._subscribing:
            if self._listener is not None:
                return
            pubsub = self.client.pubsub()
            try:
                await pubsub.psubscribe(glob_escape(self.channel("")) + "*")
                # The confirmation: from here on no release goes unseen.
                while await pubsub.get_message(timeout=self.lease_seconds) is None:
                    pass
            except BaseException:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                raise
            self._pubsub = pubsub
            self._listener = asyncio.create_task(self._dispatch(pubsub), name="fetch lock releases")

    async def _dispatch(self, pubsub: PubSub) -> None:
        start = self.channel("")
        failing = False
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            except RedisError as exc:
                # Waiters still notice expiry and re-read keys meanwhile; redis-py
                # subscribes again once it reconnects.
                if not failing:
                    log.warning("Redis: listening for fetch lock releases failed: %s", exc)
                failing = True
                await asyncio.sleep(1)
                continue
            if failing:
                log.info("Redis: listening for fetch lock releases again")
                failing = False
            if message is None or message["type"] != "pmessage":
                continue
            key = bytes(message["channel"]).decode().removeprefix(start)
            committed = bytes(message["data"]) == b"1"
            for told in self._waiters.pop(key, ()):
                if not told.done():
                    told.set_result(committed)

    async def close(self) -> None:
        for lease in list(self.leases):
            await lease.release(committed=False)
        await self._local.close()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.client.aclose()

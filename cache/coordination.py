"""Fetch locks: one holder per key (a blob digest) across every process that shares
a store, so a blob is fetched from the upstream once for the whole fleet.

A lease expires unless its holder keeps renewing it, so a holder that dies (a node
killed mid-download) lets another process take over after ``ttl`` seconds. Waiters
learn of a release without polling the store: in one process through an event,
across nodes through Redis pub/sub (``cache/redis_locks.py``).

``LocalLocks`` is the one-process implementation: what a single node without Redis
uses, and the reference the contract suite holds every implementation to.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

# How long a lease lives without a renewal, and how often its holder renews it.
LEASE_SECONDS = 15.0
RENEW_SECONDS = 5.0


class Lease(Protocol):
    """A held fetch lock; renewed in the background until released."""

    key: str

    @property
    def lost(self) -> bool:
        """True once a renewal failed: another process may hold the key now, so the
        holder must not commit under the belief that it alone fetched."""

    async def release(self, *, committed: bool) -> None:
        """Let go, telling waiters whether the object is now committed."""


class FetchLocks(Protocol):
    async def acquire(self, key: str) -> Lease | None:
        """The lock on ``key``, or None while another live holder has it."""

    async def wait(self, key: str) -> bool:
        """Wait until ``key`` is free: its holder released it or its lease expired
        (bound the wait with ``asyncio.timeout``).

        True: released with ``committed=True``; False: released without a commit,
        expired (the holder died) or not held at all (look in the store)."""

    async def close(self) -> None: ...


@dataclass(eq=False)
class _LocalLease:
    key: str
    locks: LocalLocks
    expires: float
    released: asyncio.Event = field(default_factory=asyncio.Event)
    committed: bool = False

    @property
    def lost(self) -> bool:
        return self.locks.held.get(self.key) is not self

    async def release(self, *, committed: bool) -> None:
        if self.locks.held.get(self.key) is self:
            del self.locks.held[self.key]
        self.committed = committed
        self.released.set()


class LocalLocks:
    """Fetch locks within one process (an in-process lease never expires: its holder
    cannot die without the process)."""

    def __init__(self) -> None:
        self.held: dict[str, _LocalLease] = {}

    async def acquire(self, key: str) -> Lease | None:
        if key in self.held:
            return None
        lease = _LocalLease(key, self, expires=time.monotonic() + LEASE_SECONDS)
        self.held[key] = lease
        return lease

    async def wait(self, key: str) -> bool:
        lease = self.held.get(key)
        if lease is None:
            return False
        await lease.released.wait()
        return lease.committed

    async def close(self) -> None:
        for lease in list(self.held.values()):
            await lease.release(committed=False)

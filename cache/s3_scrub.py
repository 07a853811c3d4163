"""The background scrub over an S3 store: one node re-hashes every object at a
bounded rate, so bit rot (or a damaged copy) is found before a client gets it.

Like the filesystem's scrub (``scrub.py``): a thread, ``scrub_rate`` bytes a
second at most, each object re-hashed at most every ``RECHECK_SECONDS``, a
corrupt one moved to ``quarantine/`` (the mirror fetches it again when asked).
With ``redis_url`` one node of the fleet scrubs: it holds the lock
``pullthrough:lock:scrub`` (renewed while it lives; a node killed frees it when
its lease runs out) and records when it verified each object in a Redis hash
per store, so the node that takes over goes on where it stopped. Without Redis
the node's own ``scrub.lock`` is the lock and the records live in memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis
from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import RedisError

from pullthrough.cache.redis_client import blocking_client
from pullthrough.cache.redis_locks import PREFIX
from pullthrough.cache.s3_admin import S3Admin, S3Object, report
from pullthrough.cache.scrub import (
    LOCK_RETRY_SECONDS,
    PAUSE_MAX_SECONDS,
    PAUSE_MIN_SECONDS,
    RECHECK_SECONDS,
    Stopped,
    Throttle,
)

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_ERRORS = (OSError, RedisError, ClientError, BotoCoreError)


class LockLost(Exception):
    """Another node holds the scrub lock now (ours expired)."""


class _Lock:
    """The fleet's one scrubber: a Redis key, or this node's flock without Redis."""

    def __init__(self, client: redis.Redis | None, lock_file: Path) -> None:
        self._client = client
        self._file = lock_file
        self._token = secrets.token_hex(16)
        self._fd: int | None = None
        self._renewed = 0.0

    def try_take(self) -> bool:
        if self._client is None:
            fd = os.open(self._file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._fd = fd
            return True
        taken = self._client.set(
            f"{PREFIX}lock:scrub", self._token, nx=True, px=int(LEASE_SECONDS * 1000)
        )
        self._renewed = time.monotonic()
        return bool(taken)

    def renew(self) -> None:
        """Keep the lease (at most every few seconds); LockLost when it is gone."""
        if self._client is None or time.monotonic() - self._renewed < LEASE_SECONDS / 6:
            return
        kept = self._client.eval(
            _RENEW, 1, f"{PREFIX}lock:scrub", self._token, str(int(LEASE_SECONDS * 1000))
        )
        if not kept:
            raise LockLost
        self._renewed = time.monotonic()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._client is not None:
            with contextlib.suppress(RedisError):
                self._client.eval(_RELEASE, 1, f"{PREFIX}lock:scrub", self._token)


class _Verified:
    """When each object of one store was last verified: Redis or memory."""

    def __init__(self, client: redis.Redis | None, store: S3Admin) -> None:
        self._client = client
        self._key = f"{PREFIX}verified:{store.location}"
        self._memory: dict[str, str] = {}

    def load(self) -> dict[str, str]:
        """Every record, read once a pass (one HGETALL, not a call per object)."""
        if self._client is None:
            return dict(self._memory)
        found: dict[bytes, bytes] = self._client.hgetall(self._key)  # type: ignore[assignment]
        return {k.decode(): v.decode() for k, v in found.items()}

    @staticmethod
    def at(records: dict[str, str], obj: S3Object) -> float | None:
        """When this very object (its ETag) was verified; None: never, or written
        again since (the filesystem scrub's inode check)."""
        raw = records.get(f"{obj.kind}:{obj.digest}")
        if raw is None:
            return None
        when, _, etag = raw.partition(" ")
        return float(when) if etag == obj.etag else None

    def record(self, obj: S3Object, when: float) -> None:
        member, value = f"{obj.kind}:{obj.digest}", f"{when} {obj.etag}"
        if self._client is None:
            self._memory[member] = value
        else:
            self._client.hset(self._key, member, value)

    def forget(self, obj: S3Object) -> None:
        self.drop({f"{obj.kind}:{obj.digest}"})

    def drop(self, members: set[str]) -> None:
        for member in members:
            self._memory.pop(member, None)
        if self._client is not None and members:
            self._client.hdel(self._key, *members)


class S3Scrubber:
    """The server's scrub of S3 stores; ``run`` blocks (a thread) until ``stop``."""

    def __init__(
        self,
        stores: Sequence[S3Admin],
        *,
        redis_url: str | None,
        lock_file: Path,
        rate: int,
        recheck_seconds: float = RECHECK_SECONDS,
        on_bytes: Callable[[int], None] = lambda n: None,
        on_corrupt: Callable[[str], None] = lambda kind: None,
        on_pass: Callable[[], None] = lambda: None,
    ) -> None:
        self.stores = list(stores)
        self.rate = rate
        self.recheck_seconds = recheck_seconds
        self._client = None if redis_url is None else blocking_client(redis_url)
        self._lock = _Lock(self._client, lock_file)
        self._verified = [_Verified(self._client, store) for store in self.stores]
        self._on_bytes = on_bytes
        self._on_corrupt = on_corrupt
        self._on_pass = on_pass

    def run(self, stop: threading.Event) -> None:
        try:
            with contextlib.suppress(Stopped):
                while True:
                    try:
                        if self._lock.try_take():
                            try:
                                self._scrub(stop)
                            finally:
                                self._lock.release()
                    except LockLost:
                        log.warning("the scrub lock went to another node; stopped scrubbing")
                    except _ERRORS as exc:
                        log.warning("cannot scrub S3, trying again later: %s", exc)
                    if stop.wait(LOCK_RETRY_SECONDS):
                        return
        finally:
            for store in self.stores:
                store.close()
            if self._client is not None:
                self._client.close()

    def _scrub(self, stop: threading.Event) -> None:
        log.info("scrubbing S3 at up to %d bytes/s", self.rate)
        throttle = Throttle(self.rate, stop)
        while True:
            checked = self.scrub_once(throttle)
            self._on_pass()
            # Rest, keeping the lock: the next pass is this node's too. A pass
            # that found nothing due rests longest.
            pause = PAUSE_MIN_SECONDS if checked else PAUSE_MAX_SECONDS
            deadline = time.monotonic() + pause
            while (left := deadline - time.monotonic()) > 0:
                if stop.wait(min(left, LEASE_SECONDS / 6)):
                    raise Stopped
                self._lock.renew()
            throttle.restart()

    def scrub_once(self, throttle: Throttle) -> int:
        """One walk over every store, re-hashing what is due (blocking); returns
        how many objects it re-hashed."""
        checked = 0

        def read(n: int) -> None:
            throttle.take(n)
            self._on_bytes(n)

        for store, verified in zip(self.stores, self._verified, strict=True):
            records = verified.load()
            gone = set(records)  # records of objects evicted or collected since
            for obj in store.every():
                gone.discard(f"{obj.kind}:{obj.digest}")
                self._lock.renew()
                last = verified.at(records, obj)
                if last is not None and time.time() - last < self.recheck_seconds:
                    continue
                checked += 1
                if obj.kind == "blob":
                    corrupt = store.check_blob(obj, read)
                else:
                    read(obj.size)
                    corrupt = store.check_manifest(obj)
                if corrupt is None:
                    verified.record(obj, time.time())
                    continue
                verified.forget(obj)
                self._on_corrupt(obj.kind)
                report(corrupt)
            verified.drop(gone)
        return checked

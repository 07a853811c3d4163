"""Redis clients as every node opens them: bounded waits and a bounded pool.

Redis answers in well under a millisecond, so seconds without an answer mean it
is gone: commands and connects give up after ``TIMEOUT_SECONDS`` (a
subscription's blocking read is not bound by it). A worker serving thousands of
clients at once takes at most ``MAX_CONNECTIONS`` connections; more requests wait
for one, up to the same timeout, rather than open thousands against Redis's
``maxclients``.
"""

from __future__ import annotations

import redis
import redis.asyncio

TIMEOUT_SECONDS = 5.0
MAX_CONNECTIONS = 32


def async_client(url: str) -> redis.asyncio.Redis:
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=TIMEOUT_SECONDS,
        socket_timeout=TIMEOUT_SECONDS,
        socket_connect_timeout=TIMEOUT_SECONDS,
    )
    return redis.asyncio.Redis.from_pool(pool)


def blocking_client(url: str) -> redis.Redis:
    """For the command line and background threads (one connection at a time)."""
    return redis.Redis.from_url(
        url, socket_timeout=TIMEOUT_SECONDS, socket_connect_timeout=TIMEOUT_SECONDS
    )


def glob_escape(text: str) -> str:
    """``text`` matched literally in a SCAN or PSUBSCRIBE pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)

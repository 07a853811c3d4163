"""Is a repository public? Asked of the upstream anonymously, once, and remembered.

An upstream with credentials serves the mirror what only those credentials can
read. Before an anonymous client gets anything of such an upstream, the
upstream is asked the same thing without them: ``GET /v2/<name>/tags/list?n=1``
with an anonymous token, which needs exactly the pull right and which Docker Hub
does not count against its rate limit. 2xx and 404 mean anonymous clients of
the upstream itself may see the repository (a 404 says no more than the upstream
says to anyone); 401 and 403 mean they may not (Docker Hub answers 401 also for
repositories that do not exist, distribution with token auth when the token
lacks the right). The answer is kept ``VISIBILITY_SECONDS`` per worker; when the
upstream cannot be asked, the last answer stands, and with none the client gets
503 (the same for every repository, so it tells nothing).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from aiohttp import web

from pullthrough.proxy.errors import Unauthorized, UpstreamUnavailable
from pullthrough.proxy.keys import SETTINGS
from pullthrough.proxy.upstream import UpstreamClient, UpstreamOptions, new_session

log = logging.getLogger(__name__)

# A repository turned private upstream is still served to anonymous clients for
# at most this long (a tag's default freshness).
VISIBILITY_SECONDS = 300.0
VISIBILITY_MAX = 65_536


class Visibility:
    """Remembers, per upstream and repository, whether anonymous pulls are allowed."""

    def __init__(self, clients: dict[str, UpstreamClient], ttl: float = VISIBILITY_SECONDS) -> None:
        self._clients = clients
        self._ttl = ttl
        self._known: OrderedDict[tuple[str, str], tuple[float, bool]] = OrderedDict()
        # One question upstream at a time per key; the others wait for its answer.
        self._asking: dict[tuple[str, str], asyncio.Task[bool]] = {}

    async def public(self, upstream: str, repository: str) -> bool:
        key = (upstream, repository)
        known = self._known.get(key)
        if known is not None and known[0] > time.monotonic():
            return known[1]
        try:
            public = await self._once(key, lambda: self._ask(upstream, repository))
        except UpstreamUnavailable:
            if known is not None:
                return known[1]  # the last answer, rather than nothing
            raise
        self._remember(key, public)
        return public

    async def holds(self, upstream: str, repository: str, kind: str, digest: str) -> bool:
        """Whether an anonymous client of the upstream gets ``digest`` from this
        (public) repository. The cache serves content by digest, whichever
        repository it came from: without this, an anonymous client naming a
        public repository could read a private image's cached layers by digest.
        """
        key = (upstream, f"{repository}\0{kind}\0{digest}")
        known = self._known.get(key)
        if known is not None and known[0] > time.monotonic():
            return known[1]
        try:
            held = await self._once(
                key, lambda: self._ask_digest(upstream, repository, kind, digest)
            )
        except UpstreamUnavailable:
            if known is not None:
                return known[1]
            raise
        self._remember(key, held)
        return held

    async def _ask_digest(self, upstream: str, repository: str, kind: str, digest: str) -> bool:
        client = self._clients.get(upstream)
        if client is None:
            return False
        try:
            resp = await client.request("HEAD", repository, kind, digest)
        except Unauthorized:
            return False
        status = resp.status
        resp.release()
        if status == 429 or status >= 500:
            raise UpstreamUnavailable(f"cannot tell whether {repository} holds {digest}: {status}")
        return status < 400

    async def _once(
        self, key: tuple[str, str], ask: Callable[[], Coroutine[Any, Any, bool]]
    ) -> bool:
        task = self._asking.get(key)
        if task is None:
            task = asyncio.ensure_future(ask())
            self._asking[key] = task
            task.add_done_callback(lambda done: self._done(key, done))
        # Shielded: a client that leaves does not cancel the question for the others.
        return await asyncio.shield(task)

    def _done(self, key: tuple[str, str], task: asyncio.Task[bool]) -> None:
        self._asking.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved, also when every asker left

    def _remember(self, key: tuple[str, str], value: bool) -> None:
        self._known[key] = (time.monotonic() + self._ttl, value)
        self._known.move_to_end(key)
        while len(self._known) > VISIBILITY_MAX:
            self._known.popitem(last=False)

    async def _ask(self, upstream: str, repository: str) -> bool:
        client = self._clients.get(upstream)
        if client is None:  # offline: nothing to ask, so nothing is public
            return False
        try:
            resp = await client.request("GET", repository, "tags", "list", query={"n": "1"})
        except Unauthorized:  # the token realm gives anonymous clients nothing
            return False
        except UpstreamUnavailable as exc:
            raise UpstreamUnavailable(
                f"cannot tell whether {repository} is public: {exc.detail}"
            ) from None
        status = resp.status
        resp.release()
        if status < 300 or status == 404:
            public = True
        elif status == 429 or status >= 500:
            raise UpstreamUnavailable(
                f"cannot tell whether {repository} is public: upstream answered {status}"
            )
        else:
            public = False
        log.debug("upstream %s: %s is %s", upstream, repository, "public" if public else "private")
        return public


VISIBILITY = web.AppKey("visibility", Visibility)


async def serve_visibility(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: anonymous clients of the upstreams with credentials, on a
    session of their own (the mirror's clients must never lend them a token)."""
    settings = app[SETTINGS]
    session = new_session(settings)
    options = UpstreamOptions.from_settings(settings)
    clients = {
        up.name: UpstreamClient(
            dataclasses.replace(up, username=None, password=None), session, options=options
        )
        for up in settings.all_upstreams()
        if up.has_credentials and not (settings.offline if up.offline is None else up.offline)
    }
    app[VISIBILITY] = Visibility(clients)
    try:
        yield
    finally:
        await session.close()


def install(app: web.Application) -> None:
    """Ask the upstreams with credentials about repositories, for this app."""
    app.cleanup_ctx.append(serve_visibility)

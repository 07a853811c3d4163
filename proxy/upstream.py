"""The one client of the upstream registry: auth, redirects, timeouts, error mapping."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.auth import Credentials, TokenAuth, parse_challenge
from proxy.config import Settings, UpstreamSettings
from proxy.errors import (
    BlobUnknown,
    Denied,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    Unauthorized,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

USER_AGENT = "pullthrough/0.1"
MAX_REDIRECTS = 5
PING_SECONDS = 3.0
REDIRECTS = frozenset({301, 302, 303, 307, 308})


_RATE = re.compile(r"^\s*(\d+)\s*(?:;\s*w\s*=\s*(\d+))?")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Docker Hub's pull allowance, from ``ratelimit-limit: 100;w=21600`` and friends."""

    limit: int
    remaining: int
    window_seconds: int | None
    source: str | None
    observed_at: float


def parse_ratelimit(headers: Mapping[str, str]) -> RateLimit | None:
    """None when the upstream sent no rate-limit headers (as for unlimited accounts)."""
    limit = _RATE.match(headers.get("RateLimit-Limit", ""))
    remaining = _RATE.match(headers.get("RateLimit-Remaining", ""))
    if limit is None or remaining is None:
        return None
    window = limit[2] or remaining[2]
    return RateLimit(
        limit=int(limit[1]),
        remaining=int(remaining[1]),
        window_seconds=int(window) if window else None,
        source=headers.get("Docker-RateLimit-Source"),
        observed_at=time.time(),
    )


def same_origin(a: URL, b: URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def new_session(settings: Settings) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(
        total=None, connect=settings.connect_timeout, sock_read=settings.read_timeout
    )
    return aiohttp.ClientSession(
        timeout=timeout,
        headers={"User-Agent": USER_AGENT},
        # Blobs are hashed as they arrive: bytes must reach us exactly as stored.
        auto_decompress=False,
        read_bufsize=1 << 20,
        connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
    )


class UpstreamClient:
    def __init__(
        self,
        upstream: UpstreamSettings,
        session: aiohttp.ClientSession,
        *,
        on_token: Callable[[], None] = lambda: None,
        on_ratelimit: Callable[[RateLimit], None] = lambda _: None,
        on_response: Callable[[str, int], None] = lambda method, status: None,
    ) -> None:
        self.name = upstream.name
        self.base = upstream.url
        self._on_response = on_response
        self.ratelimit: RateLimit | None = None
        self._on_ratelimit = on_ratelimit
        self._session = session
        credentials = None
        if upstream.username is not None and upstream.password is not None:
            credentials = Credentials(upstream.username, upstream.password)
        self.auth = TokenAuth(session, self.base, credentials, on_token=on_token)

    def url(self, repository: str, kind: str, reference: str) -> URL:
        return self.base.with_path(f"/v2/{repository}/{kind}/{reference}")

    async def request(
        self,
        method: str,
        repository: str,
        kind: str,
        reference: str,
        accept: Iterable[str] = (),
        query: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a request upstream, authenticated for a pull of ``repository``.

        The caller owns (and must release) the response. Transport failures raise
        UpstreamUnavailable.
        """
        scope = f"repository:{repository}:pull"
        headers: CIMultiDict[str] = CIMultiDict()
        for value in accept:
            headers.add("Accept", value)
        if "Accept" not in headers:
            headers["Accept"] = "*/*"
        headers["Accept-Encoding"] = "identity"
        url = self.url(repository, kind, reference)
        if query:
            url = url.with_query(query)
        for attempt in (1, 2):
            authorization = await self.auth.header(scope)
            resp = await self._send(method, url, headers, authorization)
            if resp.status == 401 and attempt == 1:
                challenge = parse_challenge(resp.headers.getall("WWW-Authenticate", []))
                if challenge is not None:
                    resp.release()
                    self.auth.learn(challenge)
                    self.auth.forget(scope)
                    continue
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    async def discover(self) -> None:
        """Learn the upstream's auth challenge from ``GET /v2/`` ahead of the first
        pull, which then needs no 401 round trip. Failures are left for later."""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self._session.get(
                self.base.with_path("/v2/"),
                timeout=aiohttp.ClientTimeout(total=PING_SECONDS),
                allow_redirects=False,
            ) as resp:
                self._on_response("GET", resp.status)
                challenge = parse_challenge(resp.headers.getall("WWW-Authenticate", []))
                if resp.status == 401 and challenge is not None:
                    self.auth.learn(challenge)
        return

    async def ping(self) -> int:
        """The status ``GET /v2/`` answers with (401 counts as reachable)."""
        try:
            async with self._session.get(
                self.base.with_path("/v2/"),
                timeout=aiohttp.ClientTimeout(total=PING_SECONDS),
                allow_redirects=False,
            ) as resp:
                return resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"{self.base.host}: {exc!r}") from exc

    async def _send(
        self, method: str, url: URL, headers: CIMultiDict[str], authorization: str | None
    ) -> aiohttp.ClientResponse:
        for _ in range(MAX_REDIRECTS + 1):
            sent = headers.copy()
            # Never hand the upstream's credentials to another host (a blob
            # redirect goes to a CDN with its own signed URL).
            if authorization is not None and same_origin(url, self.base):
                sent["Authorization"] = authorization
            try:
                resp = await self._session.request(method, url, headers=sent, allow_redirects=False)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamUnavailable(f"{method} {url.host}: {exc!r}") from exc
            self._on_response(method, resp.status)
            ratelimit = parse_ratelimit(resp.headers)
            if ratelimit is not None:
                self.ratelimit = ratelimit
                self._on_ratelimit(ratelimit)
            location = resp.headers.get("Location")
            if resp.status not in REDIRECTS or location is None:
                return resp
            resp.release()
            url = url.join(URL(location))
            if resp.status == 303 and method != "HEAD":
                method = "GET"
        raise UpstreamUnavailable(f"more than {MAX_REDIRECTS} redirects from upstream")


async def raise_for_status(resp: aiohttp.ClientResponse, kind: str, reference: str) -> None:
    """Map an upstream error answer to the registry error a client should see."""
    if resp.status < 300:
        return
    code = None
    if resp.method != "HEAD":
        with contextlib.suppress(Exception):
            body = json.loads(await resp.content.read(64 * 1024))
            code = body["errors"][0]["code"]
    resp.release()
    detail = f"upstream answered {resp.status}" + (f" {code}" if code else "")
    error: RegistryError
    if resp.status == 404:
        if code == "NAME_UNKNOWN":
            error = NameUnknown(detail)
        elif kind == "blobs":
            error = BlobUnknown(reference)
        else:
            error = ManifestUnknown(reference)
    elif resp.status == 401:
        error = Unauthorized(detail)
    elif resp.status == 403:
        error = Denied(detail)
    elif resp.status == 429:
        retry_after = resp.headers.get("Retry-After")
        error = TooManyRequests(detail, headers={"Retry-After": retry_after} if retry_after else {})
    else:
        error = UpstreamUnavailable(detail)
    raise error

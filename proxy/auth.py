"""Upstream authentication: the ``WWW-Authenticate`` challenge and a token cache.

The flow is Docker's token auth (distribution ``docs/spec/auth/token.md``): a 401
names a realm and service; the realm hands out a bearer token for a scope such as
``repository:library/alpine:pull``. Tokens are cached per scope until shortly
before they expire. Credentials are only ever sent to the realm the upstream named,
and never in clear text when the upstream itself uses TLS.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from pullthrough.proxy.errors import Unauthorized, UpstreamUnavailable
from pullthrough.proxy.failures import describe_failure, where

log = logging.getLogger(__name__)

_PARAM = re.compile(r'([a-zA-Z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
# The token spec says a token without expires_in lives 60 seconds.
DEFAULT_TOKEN_LIFETIME = 60.0
# Stop using a token this long before it expires, so it does not die in flight.
EXPIRY_MARGIN = 10.0


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" or "basic", lower case
    params: dict[str, str] = field(hash=False)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")


def parse_challenge(values: Iterable[str]) -> Challenge | None:
    """The first Bearer (else Basic) challenge among ``WWW-Authenticate`` values."""
    found: list[Challenge] = []
    for value in values:
        scheme, _, rest = value.strip().partition(" ")
        params = {m[1].lower(): m[3] if m[2] is None else m[2] for m in _PARAM.finditer(rest)}
        found.append(Challenge(scheme.lower(), params))
    for scheme in ("bearer", "basic"):
        for challenge in found:
            if challenge.scheme == scheme:
                return challenge
    return None


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(slots=True)
class _Token:
    value: str
    expires_at: float


class TokenAuth:
    """Knows the upstream's challenge and holds one token per scope."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        upstream: URL,
        credentials: Credentials | None,
        *,
        on_token: Callable[[], None] = lambda: None,
        timeout: float | None = None,
    ) -> None:
        self._session = session
        # A stalled realm must not hold a pull longer than a stalled upstream.
        self._timeout = aiohttp.ClientTimeout(total=timeout) if timeout else None
        self._upstream = upstream
        self._credentials = credentials
        self._on_token = on_token
        self.challenge: Challenge | None = None
        self._tokens: dict[str, _Token] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def learn(self, challenge: Challenge) -> None:
        """Adopt the challenge the upstream's own origin answered with (never one
        from a redirect target: the realm is where credentials go)."""
        self.challenge = challenge

    def forget(self, scope: str) -> None:
        self._tokens.pop(scope, None)

    async def header(self, scope: str) -> str | None:
        """The Authorization value to send for ``scope``, or None for none."""
        challenge = self.challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._credentials.basic() if self._credentials else None
        if challenge.scheme != "bearer" or not challenge.realm:
            return None
        token = self._valid(scope)
        if token is None:
            lock = self._locks.setdefault(scope, asyncio.Lock())
            async with lock:
                # Another request may have fetched it while we waited.
                token = self._valid(scope)
                if token is None:
                    token = await self._fetch(challenge, scope)
                    self._tokens[scope] = token
        return f"Bearer {token.value}"

    def _valid(self, scope: str) -> _Token | None:
        token = self._tokens.get(scope)
        if token is not None and token.expires_at > time.monotonic():
            return token
        return None

    async def _fetch(self, challenge: Challenge, scope: str) -> _Token:
        assert challenge.realm is not None
        realm = URL(challenge.realm)
        if realm.scheme not in ("http", "https") or not realm.host:
            raise UpstreamUnavailable(f"upstream names an unusable token realm {realm}")
        query = dict(realm.query)
        if challenge.service:
            query["service"] = challenge.service
        query["scope"] = scope
        headers = {}
        if self._credentials is not None:
            if realm.scheme != "https" and self._upstream.scheme == "https":
                raise Unauthorized(f"refusing to send credentials to non-TLS realm {realm}")
            headers["Authorization"] = self._credentials.basic()
        started = time.monotonic()
        try:
            async with self._session.get(
                realm.with_query(query),
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout or self._session.timeout,
            ) as resp:
                self._on_token()
                if resp.status in (401, 403):
                    raise Unauthorized(f"token realm refused the credentials ({resp.status})")
                if resp.status != 200:
                    raise UpstreamUnavailable(f"token realm answered {resp.status}")
                body = await resp.json(content_type=None)
        except ValueError as exc:
            raise UpstreamUnavailable(f"token realm {where(realm)} sent no JSON") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            total = None if self._timeout is None else self._timeout.total
            cause = describe_failure(exc, realm, total_timeout=total)
            raise UpstreamUnavailable(f"token realm: {cause}") from exc
        value = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise UpstreamUnavailable("token realm sent no token")
        lifetime = body.get("expires_in")
        if not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        expires_at = started + max(float(lifetime) - EXPIRY_MARGIN, 1.0)
        log.debug("token for %s from %s, %ss", scope, realm.host, lifetime)
        return _Token(value, expires_at)

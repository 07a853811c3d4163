"""The mirror's own bearer tokens, Docker Hub style: issued at ``/token``, checked per request.

docker answers a ``Basic`` challenge without credentials by giving up (it has no
anonymous Basic), so a mirror that challenges with Basic cannot serve anonymous
docker pulls of public images. With a ``Bearer`` challenge every client does what
it does with Docker Hub: fetches a token from the realm, anonymously or with the
user's credentials (``docker login`` is exactly that request), and sends it with
each request until it expires.

A token says who the client is, not what it may do: rights are checked on every
request (so a changed rule applies at once). It is ``payload.signature``,
the payload ``{"sub": user, "exp": unix time}`` and the signature an HMAC-SHA256
under a key all workers share and a restart replaces; checking one costs a few
microseconds, no bcrypt.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import re
import time

from aiohttp import web

# Clients refresh before expiry; a user removed from htpasswd (and a SIGHUP) is
# refused at once regardless, since the user is looked up on every request.
TOKEN_SECONDS = 300
# Tokens remembered as checked, at most (the oldest go first).
SEEN_MAX = 10_000
SERVICE = "pullthrough"
TOKEN_PATH = "/token"  # noqa: S105 - a path, not a secret
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


class InvalidToken(Exception):
    """Not a token this mirror issued, or expired."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Tokens:
    def __init__(self, key: bytes, lifetime: int = TOKEN_SECONDS) -> None:
        self._key = key
        self.lifetime = lifetime
        self._seen: dict[str, tuple[str | None, float]] = {}

    def issue(self, user: str | None) -> str:
        payload = json.dumps(
            {"sub": user or "", "exp": int(time.time()) + self.lifetime}, separators=(",", ":")
        ).encode()
        signature = hmac.digest(self._key, payload, hashlib.sha256)
        return f"{_b64(payload)}.{_b64(signature)}"

    def verify(self, token: str) -> str | None:
        """The user a token names (None: anonymous); InvalidToken otherwise.

        A token checked once is remembered until it expires: a client sends the
        same one with every request, and a lookup is cheaper than its HMAC.
        """
        seen = self._seen.get(token)
        if seen is not None and seen[1] > time.time():
            return seen[0]
        user, expires = self._check(token)
        self._seen[token] = (user, expires)
        while len(self._seen) > SEEN_MAX:
            self._seen.pop(next(iter(self._seen)))
        return user

    def _check(self, token: str) -> tuple[str | None, float]:
        encoded, dot, signed = token.strip().partition(".")
        try:
            payload, signature = _unb64(encoded), _unb64(signed)
        except (binascii.Error, ValueError):
            raise InvalidToken("malformed token") from None
        expected = hmac.digest(self._key, payload, hashlib.sha256)
        if not dot or not hmac.compare_digest(signature, expected):
            raise InvalidToken("token not issued by this mirror")
        claims = json.loads(payload)
        expires = float(claims["exp"])
        if expires < time.time():
            raise InvalidToken("token expired")
        user: str = claims["sub"]
        return user or None, expires


def origin(request: web.Request, forwarded: tuple[str | None, str | None]) -> str:
    """``scheme://host`` the client reached the mirror by, for the token realm:
    a trusted proxy's X-Forwarded-Proto and -Host, else the connection and Host."""
    proto, host = forwarded
    scheme = proto if proto in ("http", "https") else request.scheme
    host = host if host and _HOST.match(host) else request.host
    if not _HOST.match(host):
        host = "localhost"
    return f"{scheme}://{host}"


def challenge(realm_origin: str, scope: str | None) -> str:
    value = f'Bearer realm="{realm_origin}{TOKEN_PATH}",service="{SERVICE}"'
    return value + (f',scope="{scope}"' if scope else "")


def token_body(token: str, lifetime: int) -> dict[str, object]:
    issued = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {"token": token, "access_token": token, "expires_in": lifetime, "issued_at": issued}

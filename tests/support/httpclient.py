"""A tiny synchronous HTTP client for talking to the loopback test services.

It is deliberately built on :mod:`http.client` so it works the same from plain
functions, session fixtures and (via ``asyncio.to_thread``) async tests, and it
refuses any host that is not loopback so a test can never reach the network.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: Sent unless the caller gives its own, so harness traffic is recognisable in
#: the registry's access log (see ``AccessLogEntry.user_agent``).
USER_AGENT = "pullthrough-test-harness"


@dataclass(frozen=True)
class Response:
    """A fully read HTTP response."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes
    url: str

    def header(self, name: str, default: str = "") -> str:
        """The first value of header ``name`` (case-insensitive), or ``default``."""
        value = self.headers.get(name)
        return default if value is None else value

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 30.0,
) -> Response:
    """Send one request to a loopback ``http://`` URL and read the whole response."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, got {url!r}")
    host = parts.hostname or ""
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"refusing to contact non-loopback host {host!r}")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    conn = http.client.HTTPConnection(host, parts.port or 80, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        if not any(k.lower() == "user-agent" for k in hdrs):
            hdrs["User-Agent"] = USER_AGENT
        conn.request(method, target, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return Response(status=resp.status, headers=resp.headers, body=data, url=url)
    finally:
        conn.close()


def resolve(base: str, location: str) -> str:
    """Resolve a (possibly relative) ``Location`` header against ``base``."""
    return urljoin(base, location)


def basic_auth(username: str, password: str) -> str:
    """The value of an ``Authorization`` header for HTTP Basic credentials."""
    raw = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split a ``WWW-Authenticate`` value into its scheme and parameters.

    >>> parse_challenge('Bearer realm="http://x/token",service="s"')
    ('bearer', {'realm': 'http://x/token', 'service': 's'})
    """
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


def fetch_token(
    realm: str,
    *,
    service: str,
    scopes: Iterable[str] = (),
    credentials: tuple[str, str] | None = None,
) -> str:
    """GET a bearer token from a Docker-style token endpoint; raise on failure."""
    query = urlencode([("service", service), *(("scope", s) for s in scopes)])
    headers = {}
    if credentials is not None:
        headers["Authorization"] = basic_auth(*credentials)
    resp = request("GET", f"{realm}?{query}", headers=headers)
    if resp.status != 200:
        raise PermissionError(f"token request to {realm} failed: {resp.status} {resp.body[:200]!r}")
    token = resp.json().get("token") or resp.json().get("access_token")
    if not isinstance(token, str):
        raise TypeError(f"token endpoint returned no token: {resp.body[:200]!r}")
    return token

"""The client's address behind trusted proxies (nginx terminating TLS, a load balancer).

``X-Forwarded-For`` is believed only from ``trusted_proxies``: walking it from the
right, the first address that is not a trusted proxy is the client (anyone can
write the left part). ``X-Forwarded-Proto`` and ``-Host`` (the nearest proxy's,
the last value) name the token realm clients are sent to. The address feeds
the login rate limit and the access log; it is kept on the request rather than
in a clone (aiohttp-remotes' way), because the access log sees the original
request, never a clone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aiohttp import web
from aiohttp.typedefs import Handler

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

TRUSTED = web.AppKey("trusted_proxies", tuple)
CLIENT = web.RequestKey("client", str)
# More hops than any real chain of proxies; the rest is not read.
MAX_HOPS = 16


def networks(entries: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(e, strict=False) for e in entries)


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def forwarded_client(peer: str, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str:
    """The client address, from the peer and its ``X-Forwarded-For`` values."""
    if not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",")][-MAX_HOPS:]
    client = peer
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # garbage: the last proxy we trust said who connected to it
        client = hop
        if not _trusted(hop, trusted):
            break
    return client


def client_address(request: web.Request) -> str:
    return request.get(CLIENT) or request.remote or "unknown"


@web.middleware
async def forwarded_for(request: web.Request, handler: Handler) -> web.StreamResponse:
    trusted = request.app.get(TRUSTED)
    if trusted and request.remote:
        values = request.headers.getall("X-Forwarded-For", [])
        request[CLIENT] = forwarded_client(request.remote, values, trusted)
    return await handler(request)


def forwarded_origin(request: web.Request) -> tuple[str | None, str | None]:
    """X-Forwarded-Proto and -Host as the nearest trusted proxy set them, else None."""
    trusted = request.app.get(TRUSTED)
    if not trusted or not request.remote or not _trusted(request.remote, trusted):
        return None, None
    found = []
    for name in ("X-Forwarded-Proto", "X-Forwarded-Host"):
        values = [v.strip() for raw in request.headers.getall(name, []) for v in raw.split(",")]
        found.append(values[-1] if values and values[-1] else None)
    return found[0], found[1]

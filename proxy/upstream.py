"""The one client of the upstream registry: auth, redirects, timeouts, error mapping.

The upstream path is hostile ground. Only the configured upstream's own origin
gets credentials and may teach the mirror an auth challenge; redirects are
followed for blobs only, never carry ``Authorization``, never go from https to
http, and never reach a loopback, private or link-local address unless the
upstream itself lives on one or ``redirect_allow`` says so. Bodies have deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
from aiohttp.abc import ResolveResult
from aiohttp.tracing import Trace
from multidict import CIMultiDict
from yarl import URL

from pullthrough.proxy.auth import Challenge, Credentials, TokenAuth, parse_challenge
from pullthrough.proxy.config import Settings, UpstreamSettings
from pullthrough.proxy.errors import (
    BlobUnknown,
    Denied,
    ManifestUnknown,
    NameUnknown,
    RedirectFailed,
    RedirectRefused,
    RegistryError,
    TooManyRequests,
    Unauthorized,
    UpstreamUnavailable,
)
from pullthrough.proxy.failures import describe_failure, where
from pullthrough.proxy.ratelog import ThrottledLog

log = logging.getLogger(__name__)
# One line per upstream and cause every 30 s: a dead upstream under load must
# not flood the log, nor go unlogged.
WARN_INTERVAL = 30.0

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


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def internal_address(ip: IPAddress) -> bool:
    """Loopback, private, link-local, shared or reserved: not for the internet."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


def on_internal_address(url: URL) -> bool:
    """Whether the upstream itself lives on a loopback or private address (as in
    tests, or a registry on the LAN): its redirects may then go there too."""
    host = (url.host or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    ip = _literal(host)
    return ip is not None and internal_address(ip)


@dataclass(frozen=True, slots=True)
class RedirectPolicy:
    """Where a redirect may lead although its address is internal."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> RedirectPolicy:
        networks: list[IPNetwork] = []
        # A configured upstream's own host is trusted as much as the upstream.
        hosts = {(up.url.host or "").lower() for up in settings.all_upstreams()}
        for entry in settings.redirect_allow:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower())
        return cls(tuple(networks), frozenset(hosts))

    def allows(self, host: str, address: str) -> bool:
        """May a redirect to ``host`` connect to ``address``?"""
        if host.lower() in self.hosts:
            return True
        ip = _literal(address)
        if ip is None:
            return False
        if not internal_address(ip):
            return True
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        return any(ip in net or (mapped is not None and mapped in net) for net in self.networks)


def redirect_refusal(
    current: URL, target: URL, policy: RedirectPolicy, *, anywhere: bool
) -> str | None:
    """Why the redirect from ``current`` to ``target`` must not be followed, or None.

    ``anywhere``: the upstream is itself on an internal address, so internal
    targets are fine. Host names are checked again once resolved (GuardedConnector).
    """
    if target.scheme not in ("http", "https") or not target.host:
        return f"redirect to a non-HTTP location ({target.scheme or 'relative'}:)"
    if current.scheme == "https" and target.scheme != "https":
        return f"redirect from https to http ({where(target)}) would drop TLS"
    if target.user is not None or target.password is not None:
        return f"redirect to {where(target)} carries credentials in the URL"
    if anywhere:
        return None
    ip = _literal(target.host)
    if ip is not None and not policy.allows(target.host, str(ip)):
        return f"redirect to internal address {where(target)}"
    return None


class UnsafeAddress(aiohttp.ClientError):
    """A redirect target resolved to an address the policy refuses."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to internal address {address}")
        self.host = host
        self.address = address


class GuardedConnector(aiohttp.TCPConnector):
    """Connects only to addresses the policy allows, checked on the addresses
    actually resolved (cached or not), so a name that resolves inside the network
    is refused however it was spelled. Used for redirect hops only."""

    def __init__(self, policy: RedirectPolicy, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._policy = policy

    async def _resolve_host(
        self, host: str, port: int, traces: Sequence[Trace] | None = None
    ) -> list[ResolveResult]:
        found = await super()._resolve_host(host, port, traces)
        for result in found:
            if not self._policy.allows(host, result["host"]):
                raise UnsafeAddress(host, result["host"])
        return found


@dataclass(frozen=True, slots=True)
class UpstreamOptions:
    """Deadlines and redirect rules, from the settings."""

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    manifest_timeout: float = 30.0
    revalidate_timeout: float = 5.0
    min_rate: int = 1024
    rate_window: float = 10.0
    policy: RedirectPolicy = field(default_factory=RedirectPolicy)

    @classmethod
    def from_settings(cls, settings: Settings) -> UpstreamOptions:
        return cls(
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            manifest_timeout=settings.manifest_timeout,
            revalidate_timeout=settings.revalidate_timeout,
            min_rate=settings.upstream_min_rate,
            rate_window=settings.upstream_rate_window,
            policy=RedirectPolicy.from_settings(settings),
        )


def _timeout(settings: Settings) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        total=None, connect=settings.connect_timeout, sock_read=settings.read_timeout
    )


def new_session(settings: Settings) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        timeout=_timeout(settings),
        headers={"User-Agent": USER_AGENT},
        # Blobs are hashed as they arrive: bytes must reach us exactly as stored.
        auto_decompress=False,
        read_bufsize=1 << 20,
        connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
    )


def new_redirect_session(settings: Settings) -> aiohttp.ClientSession:
    """The session redirect hops of public upstreams take: its own connection pool,
    every connection in it made to an address the redirect policy allows."""
    return aiohttp.ClientSession(
        timeout=_timeout(settings),
        headers={"User-Agent": USER_AGENT},
        auto_decompress=False,
        read_bufsize=1 << 20,
        connector=GuardedConnector(
            RedirectPolicy.from_settings(settings), limit=256, ttl_dns_cache=300
        ),
    )


class UpstreamClient:
    def __init__(
        self,
        upstream: UpstreamSettings,
        session: aiohttp.ClientSession,
        *,
        redirect_session: aiohttp.ClientSession | None = None,
        options: UpstreamOptions | None = None,
        on_token: Callable[[], None] = lambda: None,
        on_ratelimit: Callable[[RateLimit], None] = lambda _: None,
        on_response: Callable[[str, int], None] = lambda method, status: None,
        on_redirect: Callable[[str], None] = lambda status: None,
    ) -> None:
        self.name = upstream.name
        self.base = upstream.url
        self.options = options or UpstreamOptions()
        self._on_response = on_response
        self._on_redirect = on_redirect
        self._on_ratelimit = on_ratelimit
        self._session = session
        # An upstream on an internal address may redirect inside the network;
        # the others' redirects go through the guarded session.
        self._anywhere = on_internal_address(self.base)
        self._redirect_session = (
            session if self._anywhere or redirect_session is None else redirect_session
        )
        self._warn = ThrottledLog(log, WARN_INTERVAL)
        credentials = None
        if upstream.username is not None and upstream.password is not None:
            credentials = Credentials(upstream.username, upstream.password)
        self.auth = TokenAuth(
            session,
            self.base,
            credentials,
            on_token=on_token,
            timeout=self.options.manifest_timeout,
        )

    def url(self, repository: str, kind: str, reference: str) -> URL:
        return self.base.with_path(f"/v2/{repository}/{kind}/{reference}")

    def warn(self, cause: str) -> None:
        """Log an upstream failure, at most once per cause every WARN_INTERVAL."""
        self._warn.warning(cause, "upstream %s: %s", self.name, cause)

    def failure(self, exc: BaseException, url: URL, *, total: float | None = None) -> str:
        """A transport failure in words, logged (throttled)."""
        cause = describe_failure(
            exc,
            url,
            connect_timeout=self.options.connect_timeout,
            read_timeout=self.options.read_timeout,
            total_timeout=total,
        )
        self.warn(cause)
        return cause

    async def request(
        self,
        method: str,
        repository: str,
        kind: str,
        reference: str,
        accept: Iterable[str] = (),
        query: Mapping[str, str] | None = None,
        *,
        deadline: float | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a request upstream, authenticated for a pull of ``repository``.

        The caller owns (and must release) the response. Transport failures raise
        UpstreamUnavailable. Only blob requests follow redirects. Manifest and
        tag-list answers must be complete (body included) within manifest_timeout,
        a blob answer's head too;
        ``deadline`` bounds the whole request, token included, more tightly (the
        check of a cached tag, which can be served stale instead).
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
        blob = kind == "blobs"
        limits = None if blob else self._total(self.options.manifest_timeout)
        if blob and (deadline is None or deadline > self.options.manifest_timeout):
            # A blob's body is watched by the minimum-rate rule (copy_body), but
            # its head is not: one byte every few seconds would keep a socket
            # read timeout from ever firing. The head, token and redirects
            # included, must come within manifest_timeout.
            deadline = self.options.manifest_timeout
        limit = asyncio.timeout(deadline)
        try:
            async with limit:
                for attempt in (1, 2):
                    authorization = await self.auth.header(scope)
                    resp, redirected = await self._send(
                        method, url, headers, authorization, follow=blob, limits=limits
                    )
                    # Only the upstream's own origin may teach us a challenge
                    # (and so where credentials go); a redirect target's 401
                    # is a failure, dealt with in _send.
                    if resp.status == 401 and attempt == 1 and not redirected:
                        challenge = parse_challenge(resp.headers.getall("WWW-Authenticate", []))
                        if challenge is not None:
                            resp.release()
                            self.auth.learn(challenge)
                            self.auth.forget(scope)
                            continue
                    return resp
        except TimeoutError as exc:
            if not limit.expired():
                raise
            cause = f"{where(self.base)} did not answer within {deadline:g} s"
            self.warn(cause)
            raise UpstreamUnavailable(cause) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _total(self, seconds: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=seconds,
            connect=self.options.connect_timeout,
            sock_read=self.options.read_timeout,
        )

    async def discover(self) -> None:
        """Learn the upstream's auth challenge from ``GET /v2/`` ahead of the first
        pull, which then needs no 401 round trip. Failures are left for later."""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            status, challenge = await self._root()
            self._on_response("GET", status)
            if status == 401 and challenge is not None:
                self.auth.learn(challenge)

    async def ping(self) -> int:
        """The status ``GET /v2/`` answers with (401 counts as reachable)."""
        try:
            status, _ = await self._root()
        except (aiohttp.ClientError, TimeoutError) as exc:
            url = self.base.with_path("/v2/")
            raise UpstreamUnavailable(self.failure(exc, url, total=PING_SECONDS)) from exc
        return status

    async def _root(self) -> tuple[int, Challenge | None]:
        """``GET /v2/``: the status and the auth challenge. aiohttp's errors pass."""
        async with self._session.get(
            self.base.with_path("/v2/"),
            timeout=aiohttp.ClientTimeout(total=PING_SECONDS),
            allow_redirects=False,
        ) as resp:
            return resp.status, parse_challenge(resp.headers.getall("WWW-Authenticate", []))

    async def _send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        authorization: str | None,
        *,
        follow: bool,
        limits: aiohttp.ClientTimeout | None,
    ) -> tuple[aiohttp.ClientResponse, bool]:
        """The answer to ``method url``, and whether it came through a redirect."""
        sent = headers.copy()
        if authorization is not None:
            sent["Authorization"] = authorization
        total = None if limits is None else limits.total
        try:
            resp = await _one_hop(self._session, method, url, sent, limits)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(self.failure(exc, url, total=total)) from exc
        self._on_response(method, resp.status)
        ratelimit = parse_ratelimit(resp.headers)
        if ratelimit is not None:
            self._on_ratelimit(ratelimit)
        hops = 0
        while resp.status in REDIRECTS and "Location" in resp.headers:
            location = resp.headers["Location"]
            resp.release()
            # Byte for byte: a CDN signs the raw query string, so it must not be
            # re-encoded (yarl would turn %2F into /).
            try:
                target = url.join(URL(location, encoded=True))
            except ValueError:
                target = URL()
            reason = None
            if not follow:
                reason = (
                    f"upstream redirected {url.path.rsplit('/', 2)[-2]} request to "
                    f"{where(target) if target.host else 'elsewhere'}: only blob "
                    "requests may be redirected"
                )
            elif hops == MAX_REDIRECTS:
                reason = f"more than {MAX_REDIRECTS} redirects from upstream"
            else:
                reason = redirect_refusal(url, target, self.options.policy, anywhere=self._anywhere)
            if reason is not None:
                self._on_redirect("refused")
                self.warn(reason)
                raise RedirectRefused(reason)
            hops += 1
            if resp.status == 303 and method != "HEAD":
                method = "GET"
            url = target
            # No Authorization, ever: the upstream's token is for the upstream.
            try:
                resp = await _one_hop(self._redirect_session, method, url, headers, limits)
            except UnsafeAddress as exc:
                self._on_redirect("refused")
                cause = f"redirect to {where(url)} refused: {exc}"
                self.warn(cause)
                raise RedirectRefused(cause) from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._on_redirect("error")
                raise RedirectFailed(self.failure(exc, url, total=total)) from exc
            self._on_redirect(str(resp.status))
            if resp.status in (401, 403):
                resp.release()
                cause = (
                    f"redirect target {where(url)} answered {resp.status} "
                    "(it gets no credentials of the upstream's)"
                )
                self.warn(cause)
                raise RedirectFailed(cause)
        return resp, hops > 0

    async def copy_body(
        self,
        resp: aiohttp.ClientResponse,
        write: Callable[[bytes], Awaitable[None]],
        batch: int,
    ) -> None:
        """Pass a blob body to ``write`` in chunks of up to ``batch`` bytes (what has
        arrived, one step per batch when the upstream outpaces us).

        Raises UpstreamUnavailable when the body breaks, or when the upstream sends
        less than ``min_rate`` bytes a second over ``rate_window`` seconds of our
        waiting for it: a trickle would otherwise hold the download, and every
        client following it, for ever. Time spent in ``write`` (our disk) does not
        count against the upstream.
        """
        loop = asyncio.get_running_loop()
        window = self.options.rate_window
        need = self.options.min_rate * window
        waited, got = 0.0, 0
        while True:
            started = loop.time()
            limit = asyncio.timeout_at(started + window - waited if need else None)
            chunk = None
            try:
                async with limit:
                    chunk = await resp.content.readany()
            except TimeoutError as exc:
                if not limit.expired():
                    raise UpstreamUnavailable(self.failure(exc, resp.url)) from exc
            except aiohttp.ClientError as exc:
                raise UpstreamUnavailable(self.failure(exc, resp.url)) from exc
            waited += loop.time() - started
            if chunk is not None:
                if not chunk:
                    return
                if len(chunk) < batch and (more := resp.content.read_nowait(batch - len(chunk))):
                    chunk += more
                got += len(chunk)
            if need and waited >= window:
                if got < need:
                    cause = (
                        f"{where(resp.url)} sent {got} bytes in {waited:.0f} s, below the "
                        f"minimum of {self.options.min_rate} bytes/s"
                    )
                    self.warn(cause)
                    raise UpstreamUnavailable(cause)
                waited, got = 0.0, 0
            if chunk is not None:
                await write(chunk)


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


async def _one_hop(
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    limits: aiohttp.ClientTimeout | None,
) -> aiohttp.ClientResponse:
    """One request, redirects not followed: the caller checks each one."""
    return await session.request(
        method, url, headers=headers, allow_redirects=False, timeout=limits or session.timeout
    )

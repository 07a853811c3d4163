"""The rules of the hostile upstream path, decided without a hostile upstream:
which redirects are followed, what a failure reads like, how often it is logged."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.test_utils import TestServer
from yarl import URL

from pullthrough.proxy.config import ConfigError, Settings, load_settings
from pullthrough.proxy.failures import describe_failure
from pullthrough.proxy.ratelog import ThrottledLog
from pullthrough.proxy.upstream import (
    GuardedConnector,
    RedirectPolicy,
    UnsafeAddress,
    on_internal_address,
    redirect_refusal,
)

PUBLIC = URL("https://registry.example")
NONE = RedirectPolicy()

Server = Callable[[web.Application], Awaitable[TestServer]]


@pytest.mark.parametrize(
    "target",
    [
        "https://127.0.0.1/x",
        "https://127.0.0.1:8080/internal",
        "https://10.1.2.3/x",
        "https://192.168.0.10/x",
        "https://172.16.5.5/x",
        "https://169.254.169.254/latest/meta-data/",  # a cloud's metadata service
        "https://100.64.0.1/x",  # carrier-grade NAT
        "https://[::1]/x",
        "https://[fe80::1]/x",
        "https://[fd00::1]/x",
        "https://[::ffff:127.0.0.1]/x",
        "https://0.0.0.0/x",
    ],
)
def test_internal_targets_are_refused_for_a_public_upstream(target: str) -> None:
    reason = redirect_refusal(PUBLIC, URL(target, encoded=True), NONE, anywhere=False)
    assert reason is not None
    assert "internal address" in reason


def test_public_targets_are_followed() -> None:
    for target in (
        "https://203.0.114.9/x",
        "https://cdn.example/blob?sig=a%2Fb",
        "https://8.8.8.8/",
    ):
        assert redirect_refusal(PUBLIC, URL(target, encoded=True), NONE, anywhere=False) is None


def test_https_to_http_is_refused_even_for_an_internal_upstream() -> None:
    for anywhere in (False, True):
        reason = redirect_refusal(PUBLIC, URL("http://cdn.example/x"), NONE, anywhere=anywhere)
        assert reason is not None
        assert "https to http" in reason
    # http upstreams (tests, a LAN registry) may redirect to http.
    lan = URL("http://10.0.0.2")
    assert redirect_refusal(lan, URL("http://10.0.0.3/x"), NONE, anywhere=True) is None


@pytest.mark.parametrize(
    "target", ["ftp://cdn.example/x", "file:///etc/passwd", "https://user:pw@cdn.example/x"]
)
def test_odd_targets_are_refused(target: str) -> None:
    assert redirect_refusal(PUBLIC, URL(target), NONE, anywhere=True) is not None


def test_an_internal_upstream_may_redirect_inside_the_network() -> None:
    assert on_internal_address(URL("http://127.0.0.1:5000"))
    assert on_internal_address(URL("http://10.1.2.3:5000"))
    assert on_internal_address(URL("http://localhost:5000"))
    assert not on_internal_address(URL("https://registry-1.docker.io"))
    assert not on_internal_address(URL("https://8.8.8.8"))
    target = URL("http://127.0.0.1:9000/bucket/blob")
    assert redirect_refusal(URL("http://127.0.0.1:5000"), target, NONE, anywhere=True) is None


def test_the_allow_list_lets_named_networks_and_hosts_through() -> None:
    settings = Settings(
        upstream=PUBLIC, redirect_allow=("10.20.0.0/16", "minio.internal", "fd00::/8")
    )
    policy = RedirectPolicy.from_settings(settings)
    allowed = ("https://10.20.3.4/x", "https://[fd00::5]/x")
    for target in allowed:
        assert redirect_refusal(PUBLIC, URL(target), policy, anywhere=False) is None
    assert redirect_refusal(PUBLIC, URL("https://10.21.0.1/x"), policy, anywhere=False)
    # Host names are judged on the addresses they resolve to (GuardedConnector).
    assert policy.allows("minio.internal", "10.99.0.1")
    assert policy.allows("MINIO.internal", "127.0.0.1")
    assert not policy.allows("other.internal", "10.99.0.1")
    assert policy.allows("cdn.example", "93.184.216.34")
    # The upstream's own host is as trusted as the upstream.
    assert policy.allows("registry.example", "10.0.0.1")


def test_redirect_allow_is_checked_at_start_up() -> None:
    settings = load_settings(environ={"PULLTHROUGH_REDIRECT_ALLOW": "10.0.0.0/8, minio.lan"})
    assert settings.redirect_allow == ("10.0.0.0/8", "minio.lan")
    for bad in ("10.0.0.0/33", "not a host", "host:80"):
        with pytest.raises(ConfigError, match="redirect_allow"):
            load_settings(environ={"PULLTHROUGH_REDIRECT_ALLOW": bad})


def test_deadline_settings_are_checked_at_start_up() -> None:
    settings = load_settings(environ={"PULLTHROUGH_UPSTREAM_MIN_RATE": "2KiB"})
    assert settings.upstream_min_rate == 2048
    assert load_settings(environ={"PULLTHROUGH_UPSTREAM_MIN_RATE": "0"}).upstream_min_rate == 0
    for name, value in (
        ("UPSTREAM_MIN_RATE", "-1"),
        ("UPSTREAM_RATE_WINDOW", "0"),
        ("MANIFEST_TIMEOUT", "-3"),
        ("REVALIDATE_TIMEOUT", "0"),
    ):
        with pytest.raises(ConfigError):
            load_settings(environ={f"PULLTHROUGH_{name}": value})


async def test_the_guarded_connector_checks_resolved_addresses(aiohttp_server: Server) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="internal")

    app = web.Application()
    app.router.add_get("/", hello)
    server = await aiohttp_server(app)
    port = server.port
    strict = RedirectPolicy()
    # "localhost" is a name: only its resolved address gives it away.
    for url in (f"http://localhost:{port}/", f"http://127.0.0.1:{port}/"):
        async with aiohttp.ClientSession(connector=GuardedConnector(strict)) as session:
            with pytest.raises(UnsafeAddress):
                await session.get(url)
    allowing = RedirectPolicy(networks=(ipaddress.ip_network("127.0.0.0/8"),))
    async with (
        aiohttp.ClientSession(connector=GuardedConnector(allowing)) as session,
        session.get(f"http://localhost:{port}/") as resp,
    ):
        assert await resp.text() == "internal"


KEY = ConnectionKey("registry-1.docker.io", 443, True, True, None, None, None)
HUB = URL("https://registry-1.docker.io/v2/library/alpine/manifests/3.19")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            aiohttp.ClientConnectorDNSError(
                KEY, socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            ),
            "cannot connect to registry-1.docker.io:443: Name or service not known",
        ),
        (
            aiohttp.ClientConnectorError(
                KEY, ConnectionRefusedError(111, "Connect call failed ('10.0.0.1', 443)")
            ),
            "cannot connect to registry-1.docker.io:443: Connection refused",
        ),
        (
            aiohttp.ConnectionTimeoutError("Connection timeout to host"),
            "cannot connect to registry-1.docker.io:443: timed out after 10 s",
        ),
        (
            aiohttp.SocketTimeoutError("Timeout on reading data from socket"),
            "registry-1.docker.io:443 sent nothing for 60 s",
        ),
        (TimeoutError(), "registry-1.docker.io:443 did not answer in full within 30 s"),
        (
            aiohttp.ServerDisconnectedError(),
            "registry-1.docker.io:443 closed the connection",
        ),
        (
            aiohttp.ClientPayloadError("Response payload is not completed"),
            "registry-1.docker.io:443 sent a broken body",
        ),
    ],
)
def test_transport_failures_read_as_words(exc: BaseException, expected: str) -> None:
    described = describe_failure(exc, HUB, connect_timeout=10, read_timeout=60, total_timeout=30)
    assert described == expected
    assert "Error(" not in described
    assert "ConnectionKey" not in described


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_repeated_warning_is_written_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    throttled = ThrottledLog(logging.getLogger("test.ratelog"), interval=30, clock=clock)
    caplog.set_level(logging.WARNING, logger="test.ratelog")
    written = [throttled.warning("down", "upstream %s down", "hub") for _ in range(50)]
    assert written == [True] + [False] * 49
    assert throttled.warning("other cause", "upstream %s slow", "hub")  # its own key
    clock.now = 31
    assert throttled.warning("down", "upstream %s down", "hub")
    assert [r.getMessage() for r in caplog.records] == [
        "upstream hub down",
        "upstream hub slow",
        "upstream hub down (49 more like this held back)",
    ]

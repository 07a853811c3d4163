"""Token auth against a registry fake: the challenge, one token per scope, 401s."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from pullthrough.proxy import auth
from pullthrough.proxy.auth import Challenge, Credentials, TokenAuth, parse_challenge
from pullthrough.proxy.config import UpstreamSettings
from pullthrough.proxy.errors import Unauthorized
from pullthrough.proxy.upstream import UpstreamClient
from tests.support.faults import FaultRegistry

Server = Callable[[web.Application], Awaitable[TestServer]]
MANIFEST = {"schemaVersion": 2, "layers": []}


def test_a_bearer_challenge_is_preferred_and_its_parameters_read() -> None:
    challenge = parse_challenge(
        [
            'Basic realm="registry"',
            'bearer Realm="https://auth.example/token",service="reg, one",scope="a:b:pull"',
        ]
    )
    assert challenge is not None
    assert challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.example/token"
    assert challenge.service == "reg, one"  # a comma inside quotes is the value's
    assert challenge.params["scope"] == "a:b:pull"


def test_basic_is_taken_when_nothing_else_is_offered_and_nothing_is_none() -> None:
    basic = parse_challenge(['Basic realm="registry"'])
    assert basic is not None
    assert (basic.scheme, basic.realm) == ("basic", "registry")
    assert parse_challenge([]) is None
    assert parse_challenge(["Negotiate abc"]) is None


@pytest.fixture
def registry() -> FaultRegistry:
    fault = FaultRegistry(require_token=True)
    fault.add_manifest("1", MANIFEST)
    return fault


@pytest.fixture
async def client(registry: FaultRegistry, aiohttp_server: Server) -> AsyncIterator[UpstreamClient]:
    server = await aiohttp_server(registry.app())
    url = URL(str(server.make_url("/")))
    async with aiohttp.ClientSession() as session:
        yield UpstreamClient(UpstreamSettings("registry.test", url, "mirror", "s3cret"), session)


async def status(client: UpstreamClient, repository: str = "team/app") -> int:
    resp = await client.request("GET", repository, "manifests", "1")
    resp.release()
    return resp.status


async def test_one_token_per_scope_is_fetched_and_reused(
    client: UpstreamClient, registry: FaultRegistry
) -> None:
    assert await status(client) == 200
    assert await status(client) == 200
    assert registry.tokens_issued == 1
    assert await status(client, "team/other") == 200  # another scope: its own token
    assert registry.tokens_issued == 2
    # The credentials went to the realm the upstream named, as Basic.
    assert registry.token_auth == [Credentials("mirror", "s3cret").basic()] * 2


async def test_concurrent_requests_fetch_one_token(
    client: UpstreamClient, registry: FaultRegistry
) -> None:
    assert await asyncio.gather(*(status(client) for _ in range(10))) == [200] * 10
    assert registry.tokens_issued == 1


async def test_an_expired_token_is_replaced(
    client: UpstreamClient, registry: FaultRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    # proxy.auth's clock only: the event loop keeps the real one.
    monkeypatch.setattr("pullthrough.proxy.auth.time", SimpleNamespace(monotonic=lambda: now[0]))
    assert await status(client) == 200
    now[0] += 300 - auth.EXPIRY_MARGIN - 1  # the fake's tokens live 300 s
    assert await status(client) == 200
    assert registry.tokens_issued == 1
    now[0] += 2
    assert await status(client) == 200
    assert registry.tokens_issued == 2


async def test_a_token_refused_is_replaced_once_then_the_401_stands(
    client: UpstreamClient, registry: FaultRegistry
) -> None:
    assert await status(client) == 200
    registry.rejected_tokens.add("tok-1")
    registry.seen.clear()
    assert await status(client) == 200  # 401, a new token, the request again
    assert registry.tokens_issued == 2
    assert registry.count("GET", "manifests") == 2
    registry.rejected_tokens.update({"tok-2", "tok-3", "tok-4"})
    registry.seen.clear()
    assert await status(client) == 401  # retried once, not for ever
    assert registry.count("GET", "manifests") == 2
    assert registry.tokens_issued == 3


async def test_credentials_never_go_in_clear_text_for_a_tls_upstream() -> None:
    async with aiohttp.ClientSession() as session:
        tokens = TokenAuth(
            session, URL("https://registry.example"), Credentials("mirror", "s3cret")
        )
        tokens.learn(Challenge("bearer", {"realm": "http://127.0.0.1:9/token"}))
        with pytest.raises(Unauthorized, match="non-TLS realm"):
            await tokens.header("repository:a:pull")


async def test_without_a_challenge_nothing_is_sent(client: UpstreamClient) -> None:
    assert await client.auth.header("repository:a:pull") is None

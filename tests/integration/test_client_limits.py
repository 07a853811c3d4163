"""Hostile and careless clients against a real server process: slow, oversized and
malformed requests, too many connections, junk Accept lines, clients that leave;
and the server process itself: start-up failures and dead workers.

The server runs as ``python -m proxy serve``; its memory and open descriptors are
read from /proc, its log from its file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pullthrough.cache.index import TagIndex
from tests.support.images import ALPINE, BIG, DOCKER_MANIFEST_LIST, seed_images
from tests.support.mirror import MirrorProcess, workers_of
from tests.support.processes import free_port
from tests.support.registry import Registry

HELLO = "library/hello:latest"


def start(
    stop_later: list[MirrorProcess],
    upstream: Registry,
    cache: Path,
    *,
    workers: int = 1,
    open_files: int | None = None,
    **settings: str,
) -> MirrorProcess:
    env = {f"PULLTHROUGH_{k.upper()}": v for k, v in settings.items()}
    mirror = MirrorProcess(cache, upstream.url, env=env, workers=workers, open_files=open_files)
    stop_later.append(mirror)
    mirror.start()
    return mirror


@pytest.fixture
def many_sockets() -> Iterator[None]:
    """This test process may hold 2,500 sockets at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2500:
        pytest.skip(f"needs 2500 open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2500), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match[1]) / 1024


def open_fds(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def connect(mirror: MirrorProcess, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", mirror.port), timeout=timeout)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length, read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(min(length - len(body), 1 << 20))
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += chunk
    return status, headers, body


def get(sock: socket.socket, path: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    extra = "".join(f"{h}\r\n" for h in headers)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n{extra}\r\n".encode())
    return read_response(sock)


def readable(sock: socket.socket, timeout: float) -> bool:
    # poll, not select: these tests hold descriptors past select()'s 1,024.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed ``sock`` within ``seconds``, and what it said."""
    said = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not readable(sock, max(deadline - time.monotonic(), 0)):
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionError:
            return True, said
        if not chunk:
            return True, said
        said += chunk
    return False, said


def log_since(mirror: MirrorProcess, mark: int) -> str:
    return mirror.log.read_bytes()[mark:].decode(errors="replace")


def error_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


# -- Accept ---------------------------------------------------------------------------


def test_junk_accept_lines_cost_one_upstream_get_and_leave_one_index_entry(
    upstream: Registry, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    mirror = start(stop_later, upstream, tmp_path / "cache")
    mark = upstream.mark()
    digests = set()
    with connect(mirror) as sock:
        for i in range(200):
            status, headers, _ = get(
                sock,
                "/v2/library/alpine/manifests/3.19",
                f"Accept: {DOCKER_MANIFEST_LIST}",
                f"Accept: application/x-junk-{i}; q=0.{i % 10}",
            )
            assert status == 200
            digests.add(headers["docker-content-digest"])
    assert digests == {seed_images()[ALPINE].digest}
    manifest_gets = [
        e for e in upstream.requests_since(mark) if e.method == "GET" and "/manifests/" in e.path
    ]
    assert len(manifest_gets) <= 1
    mirror.stop()
    index = TagIndex(tmp_path / "cache" / "index")
    try:
        entries = [(repo, tag, accept) for _, repo, tag, accept, _ in index.tags()]
    finally:
        index.close()
    assert entries == [("library/alpine", "3.19", DOCKER_MANIFEST_LIST)]


# -- request heads ----------------------------------------------------------------------


def test_a_thousand_oversized_or_unfinished_heads_are_bounded_and_closed(
    upstream: Registry, tmp_path: Path, stop_later: list[MirrorProcess], many_sockets: None
) -> None:
    mirror = start(stop_later, upstream, tmp_path / "cache", request_head_timeout="3")
    assert mirror.proc is not None
    pid = mirror.proc.pid
    with connect(mirror) as sock:
        assert get(sock, "/v2/")[0] == 200
    rss_before, fds_before = rss_mib(pid), open_fds(pid)

    # 127 header lines of 8,000 bytes, never finished: refused at the size limit.
    line = b"X-Filler: " + b"a" * 7988 + b"\r\n"
    oversized = [connect(mirror) for _ in range(1000)]
    for sock in oversized:
        sock.settimeout(5)
        # Refused and closed, maybe before all of it was sent.
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n" + line * 127)
    for sock in oversized:
        assert closed_within(sock, 5)[0]
        sock.close()
    rss_oversized = rss_mib(pid)

    # Under the size limit but never finished: held until the head deadline.
    unfinished = [connect(mirror) for _ in range(1000)]
    for sock in unfinished:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n" + line * 7)
    sent = time.monotonic()
    time.sleep(0.5)
    rss_during, fds_during = rss_mib(pid), open_fds(pid)
    assert fds_during >= fds_before + 900
    answers = []
    for sock in unfinished:
        closed, said = closed_within(sock, 10)
        assert closed
        answers.append(said)
        sock.close()
    lifetime = time.monotonic() - sent
    deadline = time.monotonic() + 10
    while open_fds(pid) > fds_before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    fds_after, rss_after = open_fds(pid), rss_mib(pid)
    print(
        f"RSS MiB before {rss_before:.0f}, after 1000 oversized {rss_oversized:.0f}, "
        f"1000 unfinished {rss_during:.0f}, after {rss_after:.0f}; open fds before "
        f"{fds_before}, during {fds_during}, after {fds_after}; unfinished heads lived "
        f"{lifetime:.1f} s"
    )
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers)
    assert lifetime < 3 + 5
    assert fds_after <= fds_before + 2
    # 1,000 heads of 56 KiB are 55 MiB of input: the server may hold them, no more.
    assert rss_oversized - rss_before < 150
    assert rss_during - rss_before < 250
    with connect(mirror) as sock:
        assert get(sock, "/v2/")[0] == 200
    assert "Traceback" not in mirror.log.read_text()


def test_a_trickled_head_is_cut_off_at_the_deadline(
    upstream: Registry, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    mirror = start(stop_later, upstream, tmp_path / "cache", request_head_timeout="2")
    with connect(mirror) as sock:
        began = time.monotonic()
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n")
        said = b""
        for i in range(20):  # one header line every half second: never idle for long
            closed, got = closed_within(sock, 0.5)
            said += got
            if closed:
                break
            with contextlib.suppress(OSError):  # closed while this was on its way
                sock.sendall(f"X-Slow-{i}: x\r\n".encode())
        took = time.monotonic() - began
    assert 1.5 < took < 4
    assert said.startswith(b"HTTP/1.1 408 ")


def test_an_oversized_head_gets_431_with_an_oci_body(
    upstream: Registry, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    mirror = start(stop_later, upstream, tmp_path / "cache", max_request_head="16384")
    with connect(mirror) as sock:
        lines = "".join(f"X-Filler-{i}: {'b' * 1000}\r\n" for i in range(17))
        sock.sendall(f"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n{lines}\r\n".encode())
        status, headers, body = read_response(sock)
        assert closed_within(sock, 5)[0]
    assert status == 431
    assert headers["content-type"] == "application/json"
    assert error_code(body) == "UNSUPPORTED"
    with connect(mirror) as sock:  # 15 such lines fit
        lines = "".join(f"X-Filler-{i}: {'b' * 1000}\r\n" for i in range(15))
        sock.sendall(f"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n{lines}\r\n".encode())
        assert read_response(sock)[0] == 200


def test_an_idle_keepalive_connection_is_closed_after_the_timeout(
    upstream: Registry, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    mirror = start(stop_later, upstream, tmp_path / "cache", keepalive_timeout="2")
    with connect(mirror) as sock:
        assert get(sock, "/v2/")[0] == 200
        idle = time.monotonic()
        closed, said = closed_within(sock, 10)
        lived = time.monotonic() - idle
    assert closed
    assert said == b""
    assert 1.5 < lived < 5


# -- connections -------------------------------------------------------------------------


def test_connections_over_the_cap_get_503_and_cached_blobs_still_work(
    upstream: Registry, tmp_path: Path, stop_later: list[MirrorProcess], many_sockets: None
) -> None:
    # With `ulimit -n 1024` the cap comes down to what 1,024 descriptors serve.
    mirror = start(stop_later, upstream, tmp_path / "cache", open_files=1024)
    hello = seed_images()[HELLO]
    layer = hello.layers_of(hello.top)[0]
    path = f"/v2/library/hello/blobs/{layer.digest}"
    first = connect(mirror)
    status, _, body = get(first, path)
    assert (status, body) == (200, layer.data)

    crowd = [connect(mirror) for _ in range(1100)]
    # Those over the cap are answered 503 and closed, a batch at a time (the rest
    # wait in the listen backlog meanwhile); a client that has read its answer
    # closes, as real ones do.
    waiting, refused = set(crowd), 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for sock in list(waiting):
            if readable(sock, 0):
                closed, said = closed_within(sock, 2)
                assert closed
                assert said.startswith(b"HTTP/1.1 503 ")
                assert error_code(said.partition(b"\r\n\r\n")[2]) == "UNAVAILABLE"
                sock.close()
                waiting.discard(sock)
                refused += 1
        time.sleep(0.1)
        if (
            refused
            and len(waiting) < 1100 - refused + 1
            and not any(readable(s, 0) for s in waiting)
        ):
            time.sleep(1)
            if not any(readable(s, 0) for s in waiting):
                break

    # The connection held from before still gets a cached blob.
    status, _, body = get(first, path)
    assert (status, body) == (200, layer.data)
    for sock in waiting:
        sock.close()
    first.close()
    time.sleep(0.5)
    with connect(mirror) as sock:
        status, _, body = get(sock, path)
        assert (status, body) == (200, layer.data)
    log = mirror.log.read_text()
    assert "out of system resource" not in log
    assert "Traceback" not in log
    cap = re.search(r"connection limit \((\d+)\) reached", log)
    assert cap is not None
    assert int(cap[1]) < 1024 // 2
    # Everyone but the cap's worth (one of them the first connection) was refused.
    assert refused == 1100 - int(cap[1]) + 1
    assert len(waiting) == int(cap[1]) - 1


# -- validation --------------------------------------------------------------------------


def test_bad_numbers_and_references_get_oci_errors(
    upstream: Registry, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    mirror = start(stop_later, upstream, tmp_path / "cache")
    cases = [
        ("GET", "/v2/library/hello/tags/list?n=" + "9" * 5000, 400, "PAGINATION_NUMBER_INVALID"),
        ("GET", "/v2/library/hello/tags/list?n=%C2%B2", 400, "PAGINATION_NUMBER_INVALID"),
        ("GET", "/v2/library/hello/tags/list?n=0", 400, "PAGINATION_NUMBER_INVALID"),
        ("GET", "/v2/library/hello/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("HEAD", "/v2/library/hello/manifests/.INVALID_MANIFEST_NAME", 404, None),
        ("GET", "/v2/library/hello/manifests/sha256:nothex", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/library/hello/manifests/md5:" + "0" * 32, 404, "MANIFEST_UNKNOWN"),
        # Blobs keep DIGEST_INVALID, as distribution answers: the conformance suite
        # only asks for a well-formed digest that does not exist.
        ("GET", "/v2/library/hello/blobs/sha256:nothex", 400, "DIGEST_INVALID"),
    ]
    with connect(mirror) as sock:
        for method, path, status, code in cases:
            sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
            if method == "HEAD":
                data = b""
                while b"\r\n\r\n" not in data:
                    data += sock.recv(4096)
                assert data.startswith(f"HTTP/1.1 {status} ".encode()), path
                continue
            got, _, body = read_response(sock)
            assert (got, error_code(body)) == (status, code), path
    assert not (tmp_path / "cache" / "manifests").exists() or not any(
        (tmp_path / "cache" / "manifests").rglob("*.INVALID*")
    )
    assert "Traceback" not in mirror.log.read_text()


# -- logging -----------------------------------------------------------------------------


def test_clients_leaving_mid_blob_log_no_traceback_and_bytes_are_counted(
    upstream: Registry, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    mirror = start(stop_later, upstream, tmp_path / "cache")
    big = seed_images()[BIG]
    layer = max(big.blobs, key=lambda b: b.size)
    path = f"/v2/library/big/blobs/{layer.digest}"
    for _ in range(2):  # cold (streamed while it downloads), then a hit (sendfile)
        for _ in range(5):
            with connect(mirror) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
                sock.recv(1 << 20)
                # Leave with a reset, the way a killed client goes.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        hexdigest = layer.digest.removeprefix("sha256:")
        committed = tmp_path / "cache" / "blobs" / "sha256" / hexdigest[:2] / hexdigest
        deadline = time.monotonic() + 20  # the download goes on without them
        while not committed.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    with connect(mirror) as sock:
        status, _, body = get(sock, path)
        assert (status, len(body)) == (200, layer.size)
    time.sleep(0.3)
    log = mirror.log.read_text()
    assert "Traceback" not in log
    assert " ERROR " not in log
    assert re.search(rf"GET {re.escape(path)} 200 hit {layer.size}B ", log)
    partial = re.findall(rf"GET {re.escape(path)} 200 \w+ (\d+)B ", log)
    assert any(0 < int(n) < layer.size for n in partial), partial


def test_a_malformed_request_line_is_one_warning(
    upstream: Registry, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    mirror = start(stop_later, upstream, tmp_path / "cache")
    mark = mirror.log.stat().st_size
    with connect(mirror) as sock:
        sock.sendall(b"GARBAGE\x01 /\r\n\r\n")
        status, headers, _ = read_response(sock)
    assert status == 400
    assert headers["content-type"] == "application/json"
    time.sleep(0.3)
    lines = log_since(mirror, mark).splitlines()
    warnings = [line for line in lines if " WARNING " in line]
    assert len(warnings) == 1
    assert "bad request from 127.0.0.1" in warnings[0]
    assert not any("Traceback" in line or " ERROR " in line for line in lines)


def test_a_tls_hello_on_the_plain_port_is_routine_not_a_warning(
    upstream: Registry, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    # skopeo, podman and containerd try HTTPS first on every pull from an
    # "insecure" mirror: a warning each time would bury the real ones.
    mirror = start(stop_later, upstream, tmp_path / "cache")
    mark = mirror.log.stat().st_size
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="mirror")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    with connect(mirror) as sock:
        sock.sendall(outgoing.read())
        status, headers, _ = read_response(sock)
    assert status == 400
    assert headers["content-type"] == "application/json"
    time.sleep(0.3)
    lines = log_since(mirror, mark).splitlines()
    assert not [line for line in lines if " WARNING " in line]
    assert any("TLS handshake from 127.0.0.1 on the plain HTTP port" in line for line in lines)


# -- the server process ------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_port_in_use_is_one_line_and_exit_1(tmp_path: Path, workers: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve_once(tmp_path, f"--port={port}", f"--workers={workers}")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"pullthrough: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


@pytest.mark.parametrize(
    ("args", "says", "status"),
    [
        # An address that is not this machine's: a runtime failure (1); nothing
        # is sent anywhere, binding fails at once.
        (["--host=192.0.2.1"], "cannot listen on 192.0.2.1:", 1),
        # A cache folder that cannot be: the setting is wrong (2).
        (["--cache-dir=CACHE/in-a-file"], "Not a directory", 2),
    ],
)
def test_other_start_up_failures_are_one_line(
    tmp_path: Path, args: list[str], says: str, status: int
) -> None:
    (tmp_path / "CACHE").write_text("a file, not a directory")
    args = [a.replace("CACHE", str(tmp_path / "CACHE")) for a in args]
    done = serve_once(tmp_path, f"--port={free_port()}", "--workers=2", *args)
    assert done.returncode == status
    [line] = done.stderr.splitlines()
    assert line.startswith("pullthrough: ")
    assert says in line


def serve_once(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pullthrough",
            "serve",
            "--host=127.0.0.1",
            f"--cache-dir={tmp_path / 'cache'}",
            "--upstream=http://127.0.0.1:9",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_killed_worker_is_replaced_and_pulls_go_on(
    upstream: Registry, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    mirror = start(stop_later, upstream, tmp_path / "cache", workers=2)
    assert mirror.proc is not None
    hello = seed_images()[HELLO]
    layer = hello.layers_of(hello.top)[0]
    path = f"/v2/library/hello/blobs/{layer.digest}"
    deadline = time.monotonic() + 20
    while len(workers_of(mirror.proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    before = workers_of(mirror.proc.pid)
    assert len(before) == 2
    victim = min(before)
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    new: set[int] = set()
    while time.monotonic() < killed + 20:
        with connect(mirror) as sock:  # pulls keep working meanwhile
            status, _, body = get(sock, path)
            assert (status, body) == (200, layer.data)
        new = workers_of(mirror.proc.pid) - before
        if new and f"worker pid {min(new)} serving" in mirror.log.read_text():
            break
        time.sleep(0.02)
    replaced = time.monotonic() - killed
    print(f"worker {victim} killed; pid {new} serving after {replaced:.2f} s")
    assert len(new) == 1
    assert replaced < 10
    log = mirror.log.read_text()
    assert f"(pid {victim}) died: killed by SIGKILL" in log
    assert mirror.proc.poll() is None


def test_workers_that_keep_dying_stop_the_server_with_status_1(
    upstream: Registry, tmp_path: Path, stop_later: list[MirrorProcess]
) -> None:
    mirror = start(stop_later, upstream, tmp_path / "cache", workers=2)
    assert mirror.proc is not None
    killed: set[int] = set()
    deadline = time.monotonic() + 60
    while mirror.proc.poll() is None and time.monotonic() < deadline:
        for pid in workers_of(mirror.proc.pid) - killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.05)
    assert mirror.proc.poll() == 1
    log = mirror.log.read_text()
    assert "workers died 6 times in 60 s: stopping" in log
    assert log.count("died: killed by SIGKILL") == 6
    assert "Traceback" not in log

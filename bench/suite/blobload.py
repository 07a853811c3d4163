"""A blob download load generator: N keep-alive HTTP/1.1 connections, one thread each,
each GETting one URL over and over for a fixed time and reading into a 1 MiB buffer.

``python -m bench.suite.blobload URL STREAMS SECONDS`` prints one JSON object.

Why not wrk: wrk reads 8 KiB per ``read()``; on loopback that caps it near 6 GiB/s
on the development machine, below what nginx serves with ``sendfile``, so the
client would be measured instead of the servers. ``recv_into`` a 1 MiB buffer
(the GIL is released while the kernel copies) gets 9-10 GiB/s from nginx there.
"""

from __future__ import annotations

import json
import resource
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

BUFFER = 1 << 20
HEAD_LIMIT = 64 * 1024


class LoadError(RuntimeError):
    pass


@dataclass
class Stream:
    body_bytes: int = 0
    completed: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    error: str | None = None


def _read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(HEAD_LIMIT)
        if not more:
            raise ConnectionResetError("connection closed before the response head")
        data += more
        if len(data) > HEAD_LIMIT:
            raise LoadError("response head too long")
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def _download(host: str, port: int, target: str, deadline: float, out: Stream) -> None:
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: bench-blobload\r\n"
        "Accept: */*\r\n\r\n"
    ).encode()
    view = memoryview(bytearray(BUFFER))
    sock: socket.socket | None = None
    try:
        while time.monotonic() < deadline:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=60)
            sock.sendall(request)
            status, headers, rest = _read_head(sock)
            out.statuses[str(status)] = out.statuses.get(str(status), 0) + 1
            if status != 200 or "content-length" not in headers:
                raise LoadError(f"status {status}, headers {headers}")
            left = int(headers["content-length"]) - len(rest)
            out.body_bytes += len(rest)
            while left > 0:
                n = sock.recv_into(view, min(BUFFER, left))
                if not n:
                    raise ConnectionResetError("connection closed inside a body")
                left -= n
                out.body_bytes += n
                if time.monotonic() >= deadline:
                    return  # stop mid-body: the bytes so far count, the request does not
            out.completed += 1
            if headers.get("connection", "").lower() == "close":
                sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.close()


def run_stream(host: str, port: int, target: str, deadline: float, out: Stream) -> None:
    """One connection's loop; an error ends it and is kept in ``out.error``."""
    try:
        _download(host, port, target, deadline, out)
    except (OSError, LoadError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"


def measure(url: str, streams: int, seconds: float) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    results = [Stream() for _ in range(streams)]
    started = time.monotonic()
    deadline = started + seconds
    threads = [
        threading.Thread(target=run_stream, args=(host, port, target, deadline, out))
        for out in results
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = sum(s.body_bytes for s in results)
    statuses: dict[str, int] = {}
    for s in results:
        for code, count in s.statuses.items():
            statuses[code] = statuses.get(code, 0) + count
    return {
        "streams": streams,
        "seconds": elapsed,
        "bytes": total,
        "mib_per_second": total / elapsed / (1 << 20),
        "completed": sum(s.completed for s in results),
        "statuses": statuses,
        "errors": [s.error for s in results if s.error],
        "client_cpu_cores": (usage.ru_utime + usage.ru_stime) / elapsed,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m bench.suite.blobload URL STREAMS SECONDS", file=sys.stderr)
        return 2
    print(json.dumps(measure(argv[0], int(argv[1]), float(argv[2]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

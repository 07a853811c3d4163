"""The clients: wrk for manifests, the blob load generator, curl, aiohttp, skopeo."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.suite.procs import Cpus

MiB = 1 << 20

# wrk calls done() once at the end; this prints exact figures (summary.bytes and the
# latency percentiles in microseconds) instead of wrk's rounded, unit-suffixed text.
_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH_RESULT %d %d %d %d %d %d %d %d %d %d %d %d\\n",
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""
_RESULT = re.compile(r"^BENCH_RESULT((?: \d+){12})$", re.MULTILINE)


def _lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string of printable ASCII is a valid Lua string


def write_wrk_script(path: Path, targets: Sequence[str], headers: Mapping[str, str]) -> Path:
    """A wrk script sending ``headers`` and cycling through the request ``targets``."""
    lines = [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    lines.append("local targets = {" + ", ".join(_lua_string(t) for t in targets) + "}")
    lines.append("local count, i = #targets, 0")
    lines.append(
        "request = function()\n"
        "  i = i + 1\n"
        "  if i > count then i = 1 end\n"
        "  return wrk.format(nil, targets[i])\n"
        "end"
    )
    path.write_text("\n".join(lines) + "\n" + _DONE)
    return path


@dataclass(frozen=True)
class HttpLoad:
    """One wrk run."""

    seconds: float
    requests: int
    bytes: int
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "requests": self.requests,
            "requests_per_second": self.requests_per_second,
            "bytes": self.bytes,
            "errors": self.errors,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
        }


def wrk(
    wrk_binary: str,
    url: str,
    script: Path,
    *,
    connections: int,
    seconds: int,
    cpus: Cpus,
) -> HttpLoad:
    cmd = [wrk_binary, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    cmd += ["--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(
        cpus.client_cmd(cmd), capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    found = _RESULT.search(out)
    if found is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    n = [int(x) for x in found[1].split()]
    return HttpLoad(
        seconds=n[0] / 1e6,
        requests=n[1],
        bytes=n[2],
        errors=dict(zip(("connect", "read", "write", "status", "timeout"), n[3:8], strict=True)),
        p50_ms=n[8] / 1000,
        p90_ms=n[9] / 1000,
        p99_ms=n[10] / 1000,
        max_ms=n[11] / 1000,
    )


def blob_load(url: str, *, streams: int, seconds: float, cpus: Cpus) -> dict[str, Any]:
    """``streams`` connections downloading ``url`` for ``seconds`` (see ``blobload``)."""
    cmd = [sys.executable, "-m", "bench.suite.blobload", url, str(streams), f"{seconds:g}"]
    out = subprocess.run(
        cpus.client_cmd(cmd), capture_output=True, text=True, check=True, timeout=seconds + 120
    ).stdout
    result: dict[str, Any] = json.loads(out)
    if result["errors"] or set(result["statuses"]) - {"200"}:
        raise RuntimeError(f"{url}: errors under load: {result}")
    return result


@dataclass(frozen=True)
class CurlTiming:
    status: int
    ttfb: float
    total: float
    size: int


def curl_get(url: str, headers: Mapping[str, str] | None = None) -> CurlTiming:
    """One GET with curl, body to /dev/null: time to first byte and total time."""
    cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_starttransfer} "]
    cmd[-1] += "%{time_total} %{size_download}"
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run(
        [*cmd, url], capture_output=True, text=True, check=True, timeout=600
    ).stdout.split()
    return CurlTiming(int(out[0]), float(out[1]), float(out[2]), int(out[3]))


async def _concurrent_gets(url: str, n: int) -> list[tuple[int, str, int]]:
    async def one(session: aiohttp.ClientSession) -> tuple[int, str, int]:
        async with session.get(url) as resp:
            digest, size = hashlib.sha256(), 0
            async for chunk in resp.content.iter_chunked(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            return resp.status, "sha256:" + digest.hexdigest(), size

    # One connection per request, all opened at once: 16 clients, not one queue.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return list(await asyncio.gather(*(one(session) for _ in range(n))))


def concurrent_gets(url: str, n: int) -> list[tuple[int, str, int]]:
    """``n`` simultaneous GETs of ``url``: (status, sha256 of the body, size) each."""
    return asyncio.run(_concurrent_gets(url, n))


def timed(cmd: Sequence[str], **kwargs: Any) -> float:
    started = time.monotonic()
    subprocess.run(list(cmd), check=True, **kwargs)
    return time.monotonic() - started


def top_frames(raw: Path, count: int = 12) -> list[tuple[str, float]]:
    """The leaf frames where a py-spy ``raw`` profile spent most samples, as shares,
    leaving out idle thread-pool workers waiting for work."""
    leaves: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        if leaf.startswith(("_worker (concurrent/futures/thread.py", "process ")):
            continue  # idle pool threads, and processes caught with no Python frame
        leaves[leaf] = leaves.get(leaf, 0) + int(n)
        total += int(n)
    ranked = sorted(leaves.items(), key=lambda item: -item[1])[:count]
    return [(frame, round(n / total, 3)) for frame, n in ranked] if total else []


def py_spy(binary: str, pid: int, seconds: int, out: Path, cpus: Cpus) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` (and its workers) into a raw (collapsed stacks) file."""
    cmd = [binary, "record", "-p", str(pid), "--subprocesses", "--nonblocking"]
    cmd += ["-r", "500", "-d", str(seconds), "-f", "raw", "-o", str(out)]
    return subprocess.Popen(
        cpus.client_cmd(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

"""Cold pulls over an emulated WAN: pullthrough, distribution's proxy, the upstream.

``python -m bench.wan`` (``--reps 5``, ``--rtt-ms``, ``--mbit``). Loopback has no
latency, which hides what read-ahead wins; this puts a user-space TCP relay
between the upstream registry and whoever pulls from it (the mirror, the peer,
or a client pulling straight), since these machines have no ``tc netem``. The
relay delays every chunk by half the RTT each way and passes at most the link's
rate in each direction, shared by every connection (a FIFO link). It does not
emulate TCP slow start or loss: connection reuse wins less here than on a real
link. The token realm is reached directly by everyone.

Clients: a dockerd-like one (aiohttp, three blob downloads at a time, digests
checked) and skopeo (one at a time). Each pull is cold: a fresh mirror or peer
with an empty cache every time. The client-to-mirror hop is loopback (a LAN).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.run import start_upstream
from tests.support.binaries import require_binary
from tests.support.images import Image, make_image
from tests.support.mirror import MirrorProcess
from tests.support.processes import free_port
from tests.support.registry import Registry

MiB = 1 << 20
ACCEPT = (
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.oci.image.manifest.v1+json"
)
# About 50 MB in 12 layers, big ones first as in most images.
LAYER_SIZES = (12, 8, 6, 5, 4, 4, 3, 3, 2, 1.5, 1, 0.5)
CHUNK = 64 * 1024
# Bytes a connection may have on the wire per direction: a socket buffer's worth.
WINDOW = 4 * MiB


@dataclass
class Link:
    """One direction of the emulated link: a FIFO of fixed rate and latency."""

    rate: float  # bytes a second
    delay: float  # one way, seconds
    free_at: float = 0.0
    bytes: int = 0

    def schedule(self, size: int) -> float:
        """When a chunk of ``size`` bytes handed over now arrives at the far end."""
        now = time.monotonic()
        start = max(now, self.free_at)
        self.free_at = start + size / self.rate
        self.bytes += size
        return self.free_at + self.delay


@dataclass
class Wan:
    """A TCP relay to ``target`` through an emulated link, in its own thread."""

    target_port: int
    rtt: float
    mbit: float
    port: int = field(default_factory=free_port)
    down: Link = field(init=False)  # upstream -> client
    up: Link = field(init=False)
    _loop: asyncio.AbstractEventLoop | None = None

    def __post_init__(self) -> None:
        rate = self.mbit * 1e6 / 8
        self.down = Link(rate, self.rtt / 2)
        self.up = Link(rate, self.rtt / 2)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            server = loop.run_until_complete(
                asyncio.start_server(self._relay, "127.0.0.1", self.port)
            )
            ready.set()
            try:
                loop.run_forever()
            finally:
                server.close()
                loop.close()

        threading.Thread(target=serve, name="wan", daemon=True).start()
        ready.wait(10)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def reset(self) -> None:
        self.down.bytes = self.up.bytes = 0

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            far_reader, far_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            _pump(reader, far_writer, self.up),
            _pump(far_reader, writer, self.down),
            return_exceptions=True,
        )


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: Link) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    room = asyncio.Semaphore(WINDOW // CHUNK)

    async def deliver() -> None:
        while True:
            at, data = await queue.get()
            if not data:
                break
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            dst.write(data)
            await dst.drain()
            room.release()
        dst.close()

    sender = asyncio.create_task(deliver())
    try:
        while data := await src.read(CHUNK):
            await room.acquire()
            queue.put_nowait((link.schedule(len(data)), data))
    except OSError:
        pass
    finally:
        queue.put_nowait((0.0, b""))
        await asyncio.gather(sender, return_exceptions=True)


# -- clients ---------------------------------------------------------------------------


async def _token(session: aiohttp.ClientSession, base: str, name: str) -> dict[str, str]:
    async with session.get(f"{base}/v2/") as resp:
        if resp.status == 200:
            return {}
        challenge = resp.headers["WWW-Authenticate"].removeprefix("Bearer ")
    params = dict(p.split("=", 1) for p in challenge.split(","))
    params = {k: v.strip('"') for k, v in params.items()}
    query = {"service": params.get("service", ""), "scope": f"repository:{name}:pull"}
    async with session.get(params["realm"], params=query) as resp:
        body = await resp.json()
    return {"Authorization": f"Bearer {body.get('token') or body['access_token']}"}


async def dockerd_like(base: str, name: str, tag: str, parallel: int = 3) -> float:
    """Pull like dockerd: manifest, config, then layers ``parallel`` at a time."""
    started = time.monotonic()
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        auth = await _token(session, base, name)
        async with session.get(
            f"{base}/v2/{name}/manifests/{tag}", headers={**auth, "Accept": ACCEPT}
        ) as resp:
            resp.raise_for_status()
            manifest = json.loads(await resp.read())
        gate = asyncio.Semaphore(parallel)

        async def blob(digest: str) -> None:
            async with gate, session.get(f"{base}/v2/{name}/blobs/{digest}", headers=auth) as r:
                r.raise_for_status()
                sha = hashlib.sha256()
                async for chunk in r.content.iter_chunked(1 << 20):
                    sha.update(chunk)
                if "sha256:" + sha.hexdigest() != digest:
                    raise AssertionError(f"{base} served wrong bytes for {digest}")

        await blob(manifest["config"]["digest"])
        await asyncio.gather(*(blob(layer["digest"]) for layer in manifest["layers"]))
    return time.monotonic() - started


def skopeo_pull(skopeo: str, policy: Path, host: str, ref: str, dest: Path) -> float:
    started = time.monotonic()
    subprocess.run(
        [
            skopeo,
            "--policy",
            str(policy),
            "copy",
            "-q",
            "--src-tls-verify=false",
            "--src-no-creds",
            f"docker://{host}/{ref}",
            f"dir:{dest}",
        ],
        check=True,
    )
    return time.monotonic() - started


# -- the run ---------------------------------------------------------------------------


def metrics_of(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:  # noqa: S310 (http to our mirror)
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "_created" in line:
            continue
        if line.startswith("pullthrough_prefetch") or line.startswith(
            'pullthrough_requests_total{kind="blob"'
        ):
            name, _, number = line.rpartition(" ")
            out[name] = float(number)
    return out


def run(args: argparse.Namespace) -> str:
    skopeo = require_binary("skopeo")
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="pt-wan-") as tmp:
        work = Path(tmp)
        upstream = start_upstream(stack, work)
        image: Image = make_image(
            "bench/wan", "1", "wan", [int(s * MiB) for s in LAYER_SIZES], compresslevel=1
        )
        upstream.push(image)
        image_bytes = sum(b.size for b in image.blobs)
        wan = Wan(int(upstream.host.rsplit(":", 1)[1]), args.rtt_ms / 1000, args.mbit)
        wan.start()
        stack.callback(wan.stop)
        policy = work / "policy.json"
        policy.write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
        serial = 0

        def fresh(kind: str) -> tuple[str, Callable[[], None], str | None]:
            """A cold server of ``kind``: (host, stop, metrics url)."""
            nonlocal serial
            serial += 1
            if kind == "upstream":
                return wan.host, lambda: None, None
            if kind == "peer":
                peer = Registry(work / f"peer{serial}", proxy_remote_url=f"http://{wan.host}")
                peer.start()
                return peer.host, peer.stop, None
            mirror = MirrorProcess(
                work / f"m{serial}" / "cache",
                f"http://{wan.host}",
                env={
                    "PULLTHROUGH_LOG_LEVEL": "WARNING",
                    "PULLTHROUGH_PREFETCH": kind_prefetch(kind),
                },
            )
            (work / f"m{serial}").mkdir(parents=True, exist_ok=True)
            mirror.start()
            return mirror.url.removeprefix("http://"), mirror.stop, mirror.url

        contenders = ("upstream", "pullthrough", "pullthrough-noprefetch", "peer")
        times: dict[tuple[str, str], list[float]] = {}
        moved: dict[tuple[str, str], list[float]] = {}
        last_metrics: dict[str, float] = {}
        for rep in range(args.reps):
            for client in ("dockerd-like", "skopeo"):
                for who in contenders:
                    host, stop, metrics_url = fresh(who)
                    try:
                        wan.reset()
                        if client == "dockerd-like":
                            took = asyncio.run(dockerd_like(f"http://{host}", "bench/wan", "1"))
                        else:
                            dest = work / f"pull{serial}"
                            took = skopeo_pull(skopeo, policy, host, "bench/wan:1", dest)
                        time.sleep(0.5)  # read-ahead nobody claimed would show here
                        times.setdefault((client, who), []).append(took)
                        moved.setdefault((client, who), []).append(wan.down.bytes / image_bytes)
                        if metrics_url is not None and who == "pullthrough":
                            last_metrics = metrics_of(metrics_url)
                    finally:
                        stop()
                print(f"rep {rep + 1}/{args.reps}: {client} done", flush=True)
        return report(args, image, image_bytes, times, moved, last_metrics)


def kind_prefetch(kind: str) -> str:
    return "false" if kind.endswith("noprefetch") else "true"


def report(
    args: argparse.Namespace,
    image: Image,
    image_bytes: int,
    times: dict[tuple[str, str], list[float]],
    moved: dict[tuple[str, str], list[float]],
    metrics: dict[str, float],
) -> str:
    lines = [
        f"Cold pulls over an emulated link: RTT {args.rtt_ms:g} ms, {args.mbit:g} Mbit/s, "
        f"image of {len(image.blobs) - 1} layers, {image_bytes / 1e6:.1f} MB, "
        f"median of {args.reps} (all runs in brackets).",
        "",
        "| client | path | cold pull (s) | vs upstream | upstream bytes / image |",
        "|---|---|---|---|---|",
    ]
    for client in ("dockerd-like", "skopeo"):
        base = statistics.median(times[(client, "upstream")])
        for who in ("upstream", "pullthrough", "pullthrough-noprefetch", "peer"):
            runs = times[(client, who)]
            median = statistics.median(runs)
            every = ", ".join(f"{t:.2f}" for t in runs)
            ratio = max(moved[(client, who)])
            lines.append(
                f"| {client} | {who} | {median:.2f} [{every}] | {median / base:.2f}x "
                f"| {ratio:.3f} |"
            )
    lines += ["", "Read-ahead metrics of the last cold skopeo pull through pullthrough:", ""]
    lines += [f"    {k} {v:g}" for k, v in sorted(metrics.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wan", description=__doc__)
    parser.add_argument("--reps", type=int, default=3, help="pulls per cell (median)")
    parser.add_argument("--rtt-ms", type=float, default=40.0)
    parser.add_argument("--mbit", type=float, default=400.0)
    args = parser.parse_args(argv)
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

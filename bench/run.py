"""Side-by-side benchmarks: pullthrough, distribution's proxy (the peer), nginx, the upstream.

One command: ``python -m bench`` (``--quick`` for a smaller run). Everything runs on
this machine, on loopback: the upstream is Debian's docker-registry with token
auth, seeded here; the peer is the same binary in proxy mode; nginx serves the
same blob file with sendfile, the practical limit for a hit. Servers are pinned
to one core and the load tool (wrk) to the other.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support import processes
from tests.support.binaries import require_binary
from tests.support.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    Blob,
    Image,
    Manifest,
    Pusher,
    make_image,
)
from tests.support.mirror import MirrorProcess
from tests.support.processes import free_port
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer

SERVER_CORE, CLIENT_CORE = "1", "0"
ACCEPT = (
    "application/vnd.oci.image.index.v1+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)
MiB = 1 << 20


# -- processes -------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, queue = [], [pid]
    while queue:
        p = queue.pop()
        out.append(p)
        queue.extend(children.get(p, []))
    return out


def rss(pid: int) -> int:
    total = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


@contextmanager
def peak_rss(pid: int) -> Iterator[list[int]]:
    """Samples the process tree's RSS every 20 ms; yields a list holding the peak."""
    peak = [rss(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


def server_pid(server: MirrorProcess | Registry) -> int:
    pid = server.proc.pid if isinstance(server, MirrorProcess) and server.proc else None
    if isinstance(server, Registry):
        pid = server.pid
    if pid is None:
        raise RuntimeError("server is not running")
    return pid


def pin(pid: int, core: str) -> None:
    for p in descendants(pid):
        subprocess.run(["taskset", "-a", "-cp", core, str(p)], capture_output=True, check=False)


class Nginx:
    def __init__(self, workdir: Path, blob: Path) -> None:
        self.port = free_port()
        root = workdir / "www"
        (root / "blob").parent.mkdir(parents=True, exist_ok=True)
        target = root / "blob"
        if not target.exists():
            os.link(blob, target)
        conf = workdir / "nginx.conf"
        conf.write_text(
            # The worker must read files in our 0700 temporary folder.
            (f"user {os.environ.get('USER', 'root')};\n" if os.geteuid() == 0 else "")
            + f"""daemon off; worker_processes 1; pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path {workdir}/tmp; proxy_temp_path {workdir}/tmp;
  fastcgi_temp_path {workdir}/tmp; uwsgi_temp_path {workdir}/tmp; scgi_temp_path {workdir}/tmp;
  server {{ listen 127.0.0.1:{self.port}; root {root}; }}
}}
"""
        )
        (workdir / "tmp").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [require_binary("nginx"), "-c", str(conf), "-e", str(workdir / "error.log")]
        )
        wait_http(f"http://127.0.0.1:{self.port}/blob", method="HEAD")
        self.url = f"http://127.0.0.1:{self.port}/blob"

    def stop(self) -> None:
        processes.stop(self.proc)


def wait_http(url: str, method: str = "GET", timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-X", method, "-w", "%{http_code}", url],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.stdout not in ("", "000"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


# -- load tools ------------------------------------------------------------------------


def wrk(url: str, *, connections: int, seconds: int, script: Path | None) -> dict[str, float]:
    cmd = ["taskset", "-c", CLIENT_CORE, require_binary("wrk"), "--latency"]
    cmd += ["-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    result = {"requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])}  # type: ignore[index]
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    if transfer:
        unit = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[transfer[2]]
        result["bytes_per_second"] = float(transfer[1]) * unit
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        if m:
            scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m[2]]
            result[key] = float(m[1]) * scale
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(errors[1]) if errors else 0.0
    return result


def ttfb(url: str) -> float:
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{time_starttransfer} %{http_code}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if out[1] != "200":
        raise RuntimeError(f"{url}: {out[1]}")
    return float(out[0])


def fetch_all(url: str) -> None:
    subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True)


async def concurrent_gets(url: str, n: int) -> list[str]:
    async def one(session: aiohttp.ClientSession) -> str:
        async with session.get(url) as resp:
            digest = hashlib.sha256()
            async for chunk in resp.content.iter_chunked(1 << 20):
                digest.update(chunk)
            return "sha256:" + digest.hexdigest()

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        return await asyncio.gather(*(one(session) for _ in range(n)))


# -- the setup -------------------------------------------------------------------------


@dataclass
class Seeded:
    ten_layers: Image
    big_digest: str
    big_size: int
    big_path: Path
    small_tags: list[str]


def seed(upstream: Registry, workdir: Path, big_size: int, small_images: int) -> Seeded:
    pusher = Pusher(upstream.url)
    ten = make_image(
        "bench/ten", "1", seed="ten", layer_sizes=[(i % 4 + 1) * 256 * 1024 for i in range(10)]
    )
    pusher.push(ten)
    # One big incompressible layer (not a real tar: blob bytes are all that is measured).
    data = os.urandom(big_size)
    big_path = workdir / "big.blob"
    big_path.write_bytes(data)
    layer = Blob.of(data, DOCKER_LAYER)
    del data
    config = Blob.of(json.dumps({"architecture": "amd64", "os": "linux"}).encode(), DOCKER_CONFIG)
    manifest = Manifest.of(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": config.descriptor(),
            "layers": [layer.descriptor()],
        }
    )
    pusher.push(Image("bench/big", "1", (manifest,), (config, layer), manifest))
    big_digest, size = layer.digest, layer.size
    del layer
    # Many small tagged images sharing one layer: only their configs differ.
    tags = []
    shared = make_image("bench/small", "0", seed="small")
    for i in range(small_images):
        cfg = Blob.of(
            json.dumps({"architecture": "amd64", "os": "linux", "n": i}).encode(), DOCKER_CONFIG
        )
        layers = shared.layers_of(shared.top)
        m = Manifest.of(
            {
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": cfg.descriptor(),
                "layers": [b.descriptor() for b in layers],
            }
        )
        pusher.push(Image("bench/small", f"t{i}", (m,), (cfg, *layers), m))
        tags.append(f"t{i}")
    return Seeded(ten, big_digest, size, big_path, tags)


@dataclass
class Results:
    machine: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def put(self, name: str, **values: float | None) -> None:
        self.metrics.setdefault(name, {}).update(values)
        print(f"  {name}: {values}", flush=True)


def machine() -> dict[str, Any]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")
    )

    def version(cmd: list[str]) -> str:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return (
            (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr) else "?"
        )

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem.split(":", 1)[1].strip(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "distribution": version(["docker-registry", "--version"]),
        "nginx": version(["nginx", "-v"]),
        "wrk": version(["wrk", "-v"]),
    }


# -- the run ---------------------------------------------------------------------------


def start_upstream(stack: ExitStack, work: Path) -> Registry:
    """The upstream every benchmark pulls from: distribution 2.8 behind a
    Docker-Hub-style token server, both stopped when ``stack`` closes."""
    tokens = TokenServer(workdir=work / "tokens")
    tokens.start()
    stack.callback(tokens.close)
    upstream = Registry(work / "upstream", tokens=tokens)
    upstream.start()
    stack.callback(upstream.stop)
    return upstream


def run(args: argparse.Namespace) -> Results:
    results = Results(machine=machine())
    big_size = (256 if args.quick else 1024) * MiB
    seconds = 5 if args.quick else 10
    reps = 3
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="pt-bench-") as tmp:
        work = Path(tmp)
        upstream = start_upstream(stack, work)
        print("seeding the upstream...", flush=True)
        seeded = seed(upstream, work, big_size, 20 if args.quick else 200)
        results.machine["big_blob_bytes"] = seeded.big_size

        def new_mirror(name: str, **env: str) -> MirrorProcess:
            mirror = MirrorProcess(
                work / name / "cache",
                upstream.url,
                workers=args.workers,
                env={"PULLTHROUGH_LOG_LEVEL": "WARNING", **env},
            )
            (work / name).mkdir(parents=True, exist_ok=True)
            mirror.start()
            assert mirror.proc is not None
            pin(mirror.proc.pid, SERVER_CORE)
            stack.callback(mirror.stop)
            return mirror

        def new_peer(name: str) -> Registry:
            peer = Registry(work / name, proxy_remote_url=upstream.url)
            peer.start()
            assert peer.pid is not None
            pin(peer.pid, SERVER_CORE)
            stack.callback(peer.stop)
            return peer

        # ---- cold: blob GETs for 16 concurrent requests, TTFB and RSS of a big blob
        print("cold figures...", flush=True)
        layer = seeded.ten_layers.layers_of(seeded.ten_layers.top)[0]
        for name, make in (
            ("pullthrough", lambda: new_mirror("c16")),
            ("peer", lambda: new_peer("p16")),
        ):
            server = make()
            mark = upstream.mark()
            digests = asyncio.run(
                concurrent_gets(f"{server.url}/v2/bench/ten/blobs/{layer.digest}", 16)
            )
            assert set(digests) == {layer.digest}, f"{name} served wrong bytes"
            gets = [
                e
                for e in upstream.requests_since(mark, settle=0.3)
                if e.method == "GET" and "/blobs/" in e.path and e.status < 300
            ]
            results.put("upstream_blob_gets_16_concurrent_cold", **{name: float(len(gets))})

        for name, make in (
            ("pullthrough", lambda: new_mirror("big")),
            ("peer", lambda: new_peer("pbig")),
        ):
            server = make()
            url = f"{server.url}/v2/bench/big/blobs/{seeded.big_digest}"
            with peak_rss(server_pid(server)) as peak:
                first = ttfb(url)
            results.put("cold_big_blob_ttfb_seconds", **{name: first})
            results.put("peak_rss_cold_big_pull_mib", **{name: peak[0] / MiB})
        results.put("cold_big_blob_ttfb_seconds", upstream=None)

        # ---- cold pulls of the 10-layer image: wall time and upstream bytes
        print("cold pulls...", flush=True)
        policy = work / "policy.json"
        policy.write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
        skopeo = [
            require_binary("skopeo"),
            "--policy",
            str(policy),
            "copy",
            "-q",
            "--src-tls-verify=false",
            "--src-no-creds",
        ]

        def pull(host: str, dest: Path) -> float:
            started = time.monotonic()
            subprocess.run([*skopeo, f"docker://{host}/bench/ten:1", f"dir:{dest}"], check=True)
            return time.monotonic() - started

        image_bytes = sum(b.size for b in seeded.ten_layers.blobs)
        times: dict[str, list[float]] = {"pullthrough": [], "peer": [], "upstream": []}
        moved: dict[str, int] = {}
        for rep in range(reps):
            times["upstream"].append(pull(upstream.host, work / f"d{rep}"))
            for name, make in (
                ("pullthrough", lambda r=rep: new_mirror(f"cp{r}")),
                ("peer", lambda r=rep: new_peer(f"pp{r}")),
            ):
                server = make()
                host = server.url.removeprefix("http://")
                # A cold cache in a running server, as operators see it: one
                # unrelated pull first, so the timing is not a new process's
                # first request (connections, threads, SQLite).
                subprocess.run(
                    [*skopeo, f"docker://{host}/bench/small:t1", f"dir:{work / f'w{name}{rep}'}"],
                    check=True,
                )
                mark = upstream.mark()
                times[name].append(pull(host, work / f"{name}{rep}"))
                entries = upstream.requests_since(mark, settle=0.3)
                moved[name] = sum(
                    e.size
                    for e in entries
                    if e.method == "GET" and "/blobs/" in e.path and e.status < 300
                )
        results.put("cold_pull_seconds", **{k: statistics.median(v) for k, v in times.items()})
        results.put(
            "upstream_bytes_cold_pull_ratio", **{k: v / image_bytes for k, v in moved.items()}
        )

        # ---- warm: blob throughput and manifest load
        print("warm figures...", flush=True)
        mirror = new_mirror("warm")
        peer = new_peer("pwarm")
        nginx = Nginx(work / "nginx", seeded.big_path)
        stack.callback(nginx.stop)
        pin(nginx.proc.pid, SERVER_CORE)
        blob_path = f"/v2/bench/big/blobs/{seeded.big_digest}"
        for server in (mirror, peer):
            fetch_all(server.url + blob_path)  # make it warm
        targets = {
            "pullthrough": mirror.url + blob_path,
            "peer": peer.url + blob_path,
            "nginx": nginx.url,
        }
        for streams in (1, 4):
            row = {}
            for name, url in targets.items():
                load = wrk(url, connections=streams, seconds=seconds, script=None)
                if load["errors"]:  # a fast 403 is no throughput
                    raise RuntimeError(f"{name} answered {url} with errors: {load}")
                row[name] = load.get("bytes_per_second", 0.0) / MiB
            results.put(f"warm_blob_mib_per_second_{streams}_stream", **row)

        lua = work / "accept.lua"
        lua.write_text(f'wrk.headers["Accept"] = "{ACCEPT}"\n')
        digest = subprocess.run(
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-D",
                "-",
                "-H",
                f"Accept: {ACCEPT}",
                f"{mirror.url}/v2/bench/small/manifests/t0",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        manifest_digest = re.search(r"(?i)docker-content-digest:\s*(\S+)", digest)[1]  # type: ignore[index]
        for server in (mirror, peer):
            fetch_all(f"{server.url}/v2/bench/small/manifests/{manifest_digest}")
        for kind, ref in (("tag", "t0"), ("digest", manifest_digest)):
            for name, server in (("pullthrough", mirror), ("peer", peer)):
                url = f"{server.url}/v2/bench/small/manifests/{ref}"
                with peak_rss(server_pid(server)) as peak:
                    load = wrk(url, connections=32, seconds=seconds, script=lua)
                results.put(f"warm_manifest_by_{kind}_rps", **{name: load["requests_per_second"]})
                results.put(f"warm_manifest_by_{kind}_p50_ms", **{name: load.get("p50_ms")})
                results.put(f"warm_manifest_by_{kind}_p99_ms", **{name: load.get("p99_ms")})
                results.put(f"warm_manifest_by_{kind}_errors", **{name: load["errors"]})
                results.put("peak_rss_manifest_load_mib", **{name: peak[0] / MiB})
    return results


def table(results: Results) -> str:
    m = results.metrics

    def get(metric: str, who: str) -> float:
        value = m.get(metric, {}).get(who)
        return float("nan") if value is None else value

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a is not None and b else "-"

    def fmt(v: float | None) -> str:
        return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:,.0f}")

    lines = [
        "| metric | pullthrough | peer | nginx / upstream | vs peer | vs nginx / upstream |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in m.items():
        mine, peer = row.get("pullthrough"), row.get("peer")
        other = row.get("nginx", row.get("upstream"))
        lines.append(
            f"| {name} | {fmt(mine)} | {fmt(peer)} | {fmt(other)} "
            f"| {ratio(mine, peer)} | {ratio(mine, other)} |"
        )
    blob1, blob4 = "warm_blob_mib_per_second_1_stream", "warm_blob_mib_per_second_4_stream"
    cold = "cold_pull_seconds"
    peak = max(
        get("peak_rss_cold_big_pull_mib", "pullthrough"),
        get("peak_rss_manifest_load_mib", "pullthrough"),
    )
    checks = [
        (
            "warm blob throughput >= 0.9x nginx, 1 stream",
            get(blob1, "pullthrough") >= 0.9 * get(blob1, "nginx"),
        ),
        (
            "warm blob throughput >= 0.9x nginx, 4 streams",
            get(blob4, "pullthrough") >= 0.9 * get(blob4, "nginx"),
        ),
        (
            "warm blob throughput >= 1.0x peer, 1 and 4 streams",
            get(blob1, "pullthrough") >= get(blob1, "peer")
            and get(blob4, "pullthrough") >= get(blob4, "peer"),
        ),
        (
            "warm manifest req/s >= 1.0x peer, by tag and by digest",
            all(
                get(f"warm_manifest_by_{k}_rps", "pullthrough")
                >= get(f"warm_manifest_by_{k}_rps", "peer")
                for k in ("tag", "digest")
            ),
        ),
        (
            "warm manifest p99 no worse than the peer",
            all(
                get(f"warm_manifest_by_{k}_p99_ms", "pullthrough")
                <= get(f"warm_manifest_by_{k}_p99_ms", "peer")
                for k in ("tag", "digest")
            ),
        ),
        (
            f"cold pull <= 1.05x upstream "
            f"({ratio(get(cold, 'pullthrough'), get(cold, 'upstream'))})",
            get(cold, "pullthrough") <= 1.05 * get(cold, "upstream"),
        ),
        (
            f"upstream bytes for a cold pull = 1.0x the image "
            f"({get('upstream_bytes_cold_pull_ratio', 'pullthrough'):.2f}x)",
            abs(get("upstream_bytes_cold_pull_ratio", "pullthrough") - 1.0) < 1e-9,
        ),
        (
            f"16 concurrent cold requests -> 1 upstream GET "
            f"({get('upstream_blob_gets_16_concurrent_cold', 'pullthrough'):.0f})",
            get("upstream_blob_gets_16_concurrent_cold", "pullthrough") == 1,
        ),
        (f"peak RSS <= 100 MiB ({peak:.0f} MiB)", peak <= 100),
    ]
    verdicts = [f"- {'met' if ok else 'NOT met'}: {label}" for label, ok in checks]
    return "\n".join(lines) + "\n\nTargets:\n" + "\n".join(verdicts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="256 MiB blob, 5 s loads")
    parser.add_argument("--workers", type=int, default=1, help="pullthrough worker processes")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    for tool in ("docker-registry", "skopeo", "wrk", "nginx", "curl", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing (apt-get install it)", file=sys.stderr)
            return 2
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    results.machine["workers"] = args.workers
    results.machine["quick"] = args.quick
    doc = {"machine": results.machine, "metrics": results.metrics}
    (args.out / "latest.json").write_text(json.dumps(doc, indent=1))
    text = table(results)
    (args.out / "latest.md").write_text(text)
    print(text)
    return 0

"""Side-by-side benchmarks: pullthrough, distribution's proxy (the peer), nginx, the upstream.

One command, from the repository's root: ``python -m bench.suite`` (``--quick`` for a
smaller run). Everything runs on this machine over loopback; see ``README.md``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.suite import load
from bench.suite.procs import (
    Cpus,
    CpuSnapshot,
    Nginx,
    PeakRss,
    QuietRegistry,
    born_on,
    exit_on_signals,
    pin_tree,
    server_pid,
    tree_cpu_seconds,
    wait_for_other_benchmarks,
    wait_until_quiet,
)
from bench.suite.report import NGINX, PEER, PT, UPSTREAM, Results, machine
from bench.suite.seed import Seeded, seed
from tests.support import httpclient
from tests.support.images import ACCEPT_ALL_MANIFESTS
from tests.support.mirror import MirrorProcess
from tests.support.registry import AccessLogEntry, Registry
from tests.support.skopeo import Skopeo, dir_blob_digests
from tests.support.tokenserver import Access, TokenServer

MiB = 1 << 20
TOOLS = ("docker-registry", "skopeo", "wrk", "nginx", "curl", "taskset")
CONCURRENT = 16
MANIFEST_CONNECTIONS = 32
BLOB_TRIALS = 3
QUIET_CORES = 0.15  # other processes' CPU use, in cores, that counts as quiet

_MIRRORS: set[MirrorProcess] = set()


def _stop_mirrors() -> None:
    for mirror in list(_MIRRORS):
        with contextlib.suppress(OSError):
            mirror.kill()
    _MIRRORS.clear()


atexit.register(_stop_mirrors)


def say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Run:
    """What every phase needs: the options, the upstream and its content, the results."""

    args: argparse.Namespace
    work: Path
    cpus: Cpus
    binaries: dict[str, str]
    tokens: TokenServer
    upstream: Registry
    seeded: Seeded
    results: Results
    quiet_budget: float = 0.0
    _last_quiet: float = 0.0
    _last_load: float = 1.0

    @contextlib.contextmanager
    def watched(self, label: str) -> Iterator[None]:
        """A measurement: first wait (from a budget for the whole run) until other
        processes leave the machine alone, then record how much they used meanwhile."""
        # Right after a quiet measurement there is no need to look again.
        if self.quiet_budget > 0 and not (
            time.monotonic() - self._last_quiet < 2 and self._last_load < QUIET_CORES
        ):
            started = time.monotonic()
            wait_until_quiet(self.quiet_budget, say, threshold=QUIET_CORES, window=1.0)
            self.quiet_budget -= time.monotonic() - started
        before = CpuSnapshot.take()
        try:
            yield
        finally:
            load = before.other_load()
            self.results.load[label] = load
            self._last_quiet, self._last_load = time.monotonic(), load["other_cores"]

    @property
    def seconds(self) -> int:
        return int(self.args.seconds or (4 if self.args.quick else 10))

    def mirror(self, stack: ExitStack, name: str, *, pinned: bool) -> MirrorProcess:
        """A pullthrough with an empty cache of its own, stopped (and its cache
        removed) when ``stack`` closes."""
        home = self.work / name
        home.mkdir(parents=True)
        mirror = MirrorProcess(
            home / "cache",
            self.upstream.url,
            workers=self.args.workers,
            env={"PULLTHROUGH_LOG_LEVEL": "WARNING"},
        )
        stack.callback(shutil.rmtree, home, ignore_errors=True)
        stack.callback(_MIRRORS.discard, mirror)
        stack.callback(mirror.stop)
        _MIRRORS.add(mirror)
        with born_on(self.cpus.server if pinned else None):
            mirror.start()
        if self.args.workers > 1:
            _wait_for_workers(mirror)
        return mirror

    def peer(self, stack: ExitStack, name: str, *, pinned: bool) -> Registry:
        """A distribution proxy of the upstream with empty storage of its own."""
        peer = QuietRegistry(self.work / name, proxy_remote_url=self.upstream.url)
        stack.callback(shutil.rmtree, peer.workdir, ignore_errors=True)
        stack.callback(peer.stop)
        with born_on(self.cpus.server if pinned else None):
            peer.start()
        return peer

    def profile(self, name: str, pid: int, seconds: int, work: Callable[[], object]) -> None:
        """Run ``work`` while py-spy samples ``pid``'s tree; keep the collapsed stacks
        and their busiest frames. A profile that cannot be taken is noted, not fatal."""
        profiles = self.results.details.setdefault("profiles", {})
        binary = shutil.which("py-spy")
        if binary is None:
            profiles[name] = "py-spy is not installed (pip install py-spy)"
            return
        self.args.out.mkdir(parents=True, exist_ok=True)
        raw = self.args.out / f"profile-{name}.txt"
        raw.unlink(missing_ok=True)
        spy = load.py_spy(binary, pid, seconds, raw, self.cpus)
        try:
            time.sleep(0.3)  # attached before the load starts
            work()
        finally:
            try:
                spy.wait(timeout=seconds + 60)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        if not raw.exists():
            profiles[name] = f"py-spy wrote nothing (exit status {spy.returncode})"
            return
        profiles[name] = {"file": str(raw), "top_leaf_frames": load.top_frames(raw)}
        say(f"  profile {name}: {raw}")

    def upstream_token(self, name: str) -> str:
        return self.tokens.issue([Access("repository", name, ("pull",))], expires_in=3600)


def _wait_for_workers(mirror: MirrorProcess, timeout: float = 30) -> None:
    """With several workers the port answers once the first one listens; a load
    test must not start before all of them do."""
    assert mirror.proc is not None
    deadline = time.monotonic() + timeout
    pid = mirror.proc.pid
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children")
        with contextlib.suppress(OSError):
            kids = children.read_text().split()
            listening = sum(1 for kid in kids if _listens(int(kid)))
            if listening >= mirror.workers:
                return
        time.sleep(0.1)
    say(f"  warning: not all {mirror.workers} workers seem to listen after {timeout} s")


def _listens(pid: int) -> bool:
    """Whether ``pid`` holds a listening TCP socket (a worker that is serving)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = fd.readlink().name
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                return True
    return False


def blob_gets(entries: list[AccessLogEntry]) -> list[AccessLogEntry]:
    """The blob downloads among the upstream's access-log entries (2xx GETs)."""
    return [e for e in entries if e.method == "GET" and "/blobs/" in e.route and e.status < 300]


def summarize(entries: list[AccessLogEntry]) -> dict[str, int]:
    """Upstream requests by method, kind and status: ``GET blobs 200`` -> count."""
    counts: dict[str, int] = {}
    for e in entries:
        kind = (
            "manifests"
            if "/manifests/" in e.route
            else "blobs"
            if "/blobs/" in e.route
            else e.route
        )
        key = f"{e.method} {kind} {e.status}"
        counts[key] = counts.get(key, 0) + 1
    return counts


# -- phases -------------------------------------------------------------------------------


def coalescing(run: Run) -> None:
    """16 simultaneous cold GETs of one 32 MiB blob: how many reach the upstream."""
    digest = run.seeded.mid_digest
    size = run.seeded.mid.blob(digest).size
    for who in (PT, PEER):
        with ExitStack() as stack:
            server: MirrorProcess | Registry = (
                run.mirror(stack, "coalesce-pt", pinned=False)
                if who == PT
                else run.peer(stack, "coalesce-peer", pinned=False)
            )
            mark = run.upstream.mark()
            with run.watched(f"16 concurrent cold GETs, {who}"):
                answers = load.concurrent_gets(
                    f"{server.url}/v2/bench/mid/blobs/{digest}", CONCURRENT
                )
            wrong = [a for a in answers if a != (200, digest, size)]
            if wrong:
                raise RuntimeError(
                    f"{who} answered {len(wrong)} of {CONCURRENT} wrongly: {wrong[:3]}"
                )
            entries = run.upstream.requests_since(mark, settle=0.5)
            run.results.set("coalesced_upstream_gets", who, float(len(blob_gets(entries))))
            run.results.details.setdefault("coalescing_upstream_requests", {})[who] = summarize(
                entries
            )


def cold_big(run: Run) -> None:
    """The big blob through a fresh server: time to first byte, whole GET, peak RSS."""
    big = run.seeded.big
    path = f"/v2/bench/big/blobs/{big.layer_digest}"
    for who in (PT, PEER):
        with ExitStack() as stack:
            server: MirrorProcess | Registry = (
                run.mirror(stack, "big-pt", pinned=False)
                if who == PT
                else run.peer(stack, "big-peer", pinned=False)
            )
            # A running server, not a process's first request: one unrelated request first.
            httpclient.request(
                "GET",
                f"{server.url}/v2/bench/small/manifests/t0",
                headers={"Accept": ACCEPT_ALL_MANIFESTS},
            )
            with run.watched(f"cold big blob, {who}"), PeakRss(server_pid(server)) as peak:
                timing = load.curl_get(server.url + path)
            if (timing.status, timing.size) != (200, big.layer_size):
                raise RuntimeError(f"{who}: {timing}")
            run.results.set("cold_big_ttfb", who, timing.ttfb)
            run.results.set("cold_big_total", who, timing.total)
            run.results.set("peak_rss_cold_big", who, peak.peak_mib)
            run.results.details.setdefault("memory", {})[f"cold big blob, {who}"] = {
                "peak_rss_mib": round(peak.peak_mib, 1),
                "peak_pss_mib": round(peak.peak_pss_mib, 1),
                "processes": peak.processes,
                "samples": peak.samples,
            }
    if run.args.profile:
        with ExitStack() as stack:
            mirror = run.mirror(stack, "big-pt-profile", pinned=False)
            seconds = max(2, round(3 * (run.results.get("cold_big_total", PT) or 1)))
            run.profile(
                "cold-big-blob",
                server_pid(mirror),
                seconds,
                functools.partial(load.curl_get, mirror.url + path),
            )
    direct = load.curl_get(
        run.upstream.url + path,
        {"Authorization": f"Bearer {run.upstream_token('bench/big')}"},
    )
    if (direct.status, direct.size) != (200, big.layer_size):
        raise RuntimeError(f"upstream: {direct}")
    run.results.set("cold_big_ttfb", UPSTREAM, direct.ttfb)
    run.results.set("cold_big_total", UPSTREAM, direct.total)


def cold_pulls(run: Run) -> None:
    """skopeo pulls of the 10-layer image: straight from the upstream, and through a
    fresh pullthrough and a fresh peer each time; the order rotates between rounds."""
    skopeo = Skopeo(run.binaries["skopeo"], run.work / "skopeo")
    ten = run.seeded.ten
    want = {b.digest for b in ten.blobs}
    times: dict[str, list[float]] = {UPSTREAM: [], PT: [], PEER: []}
    ratios: dict[str, list[float]] = {UPSTREAM: [], PT: [], PEER: []}
    requests: dict[str, list[dict[str, int]]] = {UPSTREAM: [], PT: [], PEER: []}
    order = [UPSTREAM, PT, PEER]
    for rep in range(run.args.reps):
        for who in order[rep % 3 :] + order[: rep % 3]:
            with ExitStack() as stack:
                if who == UPSTREAM:
                    host = run.upstream.host
                else:
                    server: MirrorProcess | Registry = (
                        run.mirror(stack, f"pull-pt-{rep}", pinned=False)
                        if who == PT
                        else run.peer(stack, f"pull-peer-{rep}", pinned=False)
                    )
                    host = server.url.removeprefix("http://")
                    # A running server with an empty cache for this image, as
                    # operators see it: an unrelated pull first.
                    warm = run.work / f"warmup-{who}-{rep}"
                    tag = f"t{(rep + 1) % len(run.seeded.small)}"
                    skopeo.copy(f"docker://{host}/bench/small:{tag}", f"dir:{warm}")
                    stack.callback(shutil.rmtree, warm, ignore_errors=True)
                dest = run.work / f"dest-{who}-{rep}"
                stack.callback(shutil.rmtree, dest, ignore_errors=True)
                mark = run.upstream.mark()
                with run.watched(f"cold pull {rep + 1}, {who}"):
                    started = time.monotonic()
                    skopeo.copy(f"docker://{host}/{ten.ref}", f"dir:{dest}")
                    times[who].append(time.monotonic() - started)
                if not want <= dir_blob_digests(dest):
                    raise RuntimeError(f"the pull through {who} missed blobs")
                entries = run.upstream.requests_since(mark, settle=0.3)
                moved = sum(e.size for e in blob_gets(entries))
                ratios[who].append(moved / run.seeded.ten_bytes)
                requests[who].append(summarize(entries))
        say(f"  round {rep + 1}: " + ", ".join(f"{w} {times[w][-1]:.3f} s" for w in order))
    for who in order:
        run.results.set("cold_pull", who, statistics.median(times[who]))
    for who in (PT, PEER):
        # The worst round: a pull that fetched anything twice must show.
        run.results.set("cold_pull_upstream_bytes", who, max(ratios[who]))
    run.results.details["cold_pull"] = {
        "seconds": times,
        "upstream_bytes_ratio": ratios,
        "upstream_requests": requests,
        "image_blob_bytes": run.seeded.ten_bytes,
    }


def warm(run: Run) -> None:
    """Hits: blob throughput against nginx, then manifest load. Servers on the server
    CPUs, clients on the client CPUs."""
    with ExitStack() as stack:
        pt = run.mirror(stack, "warm-pt", pinned=True)
        peer = run.peer(stack, "warm-peer", pinned=True)
        nginx = Nginx(run.binaries["nginx"], run.work / "nginx", run.seeded.big.layer_path)
        stack.callback(nginx.stop)
        nginx.start(run.cpus.server)
        warm_blobs(run, pt, peer, nginx)
        warm_manifests(run, pt, peer)
        if run.args.profile:
            profile_warm(run, pt)


def profile_warm(run: Run, pt: MirrorProcess) -> None:
    """py-spy on pullthrough under the warm loads again (not measured: sampling slows it)."""
    big = f"{pt.url}/v2/bench/big/blobs/{run.seeded.big.layer_digest}"
    small = run.seeded.small
    headers = {"Accept": ACCEPT_ALL_MANIFESTS}
    loads: dict[str, Callable[[], object]] = {
        "blob-4-streams": functools.partial(
            load.blob_load, big, streams=4, seconds=run.seconds, cpus=run.cpus
        ),
    }
    for kind in ("tag", "digest"):
        targets = [
            f"/v2/bench/small/manifests/{img.tag if kind == 'tag' else img.digest}" for img in small
        ]
        script = load.write_wrk_script(run.work / f"profile-{kind}.lua", targets, headers)
        loads[f"manifest-by-{kind}"] = functools.partial(
            load.wrk,
            run.binaries["wrk"],
            pt.url + targets[0],
            script,
            connections=MANIFEST_CONNECTIONS,
            seconds=run.seconds,
            cpus=run.cpus,
        )
    for name, work in loads.items():
        run.profile(name, server_pid(pt), max(1, run.seconds - 1), work)


def warm_blobs(run: Run, pt: MirrorProcess, peer: Registry, nginx: Nginx) -> None:
    big = run.seeded.big
    path = f"/v2/bench/big/blobs/{big.layer_digest}"
    for who, server in ((PT, pt), (PEER, peer)):
        fill = load.curl_get(server.url + path)  # the cold GET that fills the cache
        if (fill.status, fill.size) != (200, big.layer_size):
            raise RuntimeError(f"{who}: {fill}")
    urls = {PT: pt.url + path, PEER: peer.url + path, NGINX: nginx.url}
    pids = {PT: server_pid(pt), PEER: server_pid(peer), NGINX: nginx.pid}
    # Three shorter trials per server, taking turns, and the median: a slow moment of
    # the (virtual) machine then costs one trial of one server, not a whole figure.
    trial = max(2, -(-run.seconds // 2))
    details: dict[str, Any] = {}
    for streams, key in ((1, "warm_blob_1_stream"), (4, "warm_blob_4_streams")):
        speeds: dict[str, list[float]] = {who: [] for who in urls}
        busy: dict[str, list[float]] = {who: [] for who in urls}
        client: dict[str, list[float]] = {who: [] for who in urls}
        for _ in range(BLOB_TRIALS):
            for who, url in urls.items():
                before = tree_cpu_seconds(pids[who])
                with run.watched(f"warm blob, {streams} stream(s), {who}"):
                    result = load.blob_load(url, streams=streams, seconds=trial, cpus=run.cpus)
                speeds[who].append(result["mib_per_second"])
                # How busy the server was: near 1 core, it is the bottleneck.
                busy[who].append(
                    round((tree_cpu_seconds(pids[who]) - before) / result["seconds"], 2)
                )
                client[who].append(round(result["client_cpu_cores"], 2))
        for who, values in speeds.items():
            details[f"{who}, {streams} stream(s)"] = values
            details[f"{who}, {streams} stream(s), server CPU cores"] = busy[who]
            details[f"{who}, {streams} stream(s), client CPU cores"] = client[who]
            run.results.set(key, who, statistics.median(values))
    run.results.details["warm_blob"] = details


def warm_manifests(run: Run, pt: MirrorProcess, peer: Registry) -> None:
    small = run.seeded.small
    by = {
        "tag": [f"/v2/bench/small/manifests/{img.tag}" for img in small],
        "digest": [f"/v2/bench/small/manifests/{img.digest}" for img in small],
    }
    expected = [img.digest for img in small]
    token = run.upstream_token("bench/small")
    servers: dict[str, tuple[str, dict[str, str]]] = {
        PT: (pt.url, {"Accept": ACCEPT_ALL_MANIFESTS}),
        PEER: (peer.url, {"Accept": ACCEPT_ALL_MANIFESTS}),
        UPSTREAM: (
            run.upstream.url,
            {"Accept": ACCEPT_ALL_MANIFESTS, "Authorization": f"Bearer {token}"},
        ),
    }
    # Every manifest once through every server, by tag then by digest: now they are hits.
    for who, (base, headers) in servers.items():
        for kind in ("tag", "digest"):
            for target, digest in zip(by[kind], expected, strict=True):
                resp = httpclient.request("GET", base + target, headers=headers)
                if resp.status != 200 or resp.header("Docker-Content-Digest") != digest:
                    raise RuntimeError(f"{who} {target}: {resp.status} {resp.body[:200]!r}")
    pids = {PT: server_pid(pt), PEER: server_pid(peer)}
    peaks: dict[str, float] = {}
    details: dict[str, Any] = {}
    for kind in ("tag", "digest"):
        for who, (base, headers) in servers.items():
            script = load.write_wrk_script(run.work / f"wrk-{who}-{kind}.lua", by[kind], headers)
            with contextlib.ExitStack() as stack:
                stack.enter_context(run.watched(f"warm manifests by {kind}, {who}"))
                if who == UPSTREAM:
                    # Like the servers under test, on the server CPUs while measured.
                    pin_tree(run.upstream.pid or 0, run.cpus.server)
                    stack.callback(pin_tree, run.upstream.pid or 0, None)
                    sampler = None
                else:
                    sampler = stack.enter_context(PeakRss(pids[who], cpus=run.cpus.client))
                result = load.wrk(
                    run.binaries["wrk"],
                    base + by[kind][0],
                    script,
                    connections=MANIFEST_CONNECTIONS,
                    seconds=run.seconds,
                    cpus=run.cpus,
                )
            if sampler is not None:
                peaks[who] = max(peaks.get(who, 0.0), sampler.peak_mib)
                run.results.details.setdefault("memory", {})[f"manifests by {kind}, {who}"] = {
                    "peak_rss_mib": round(sampler.peak_mib, 1),
                    "peak_pss_mib": round(sampler.peak_pss_mib, 1),
                    "processes": sampler.processes,
                    "samples": sampler.samples,
                }
            details[f"{who} {kind}"] = result.as_dict()
            if result.failed:
                run.results.errors[f"manifests by {kind}, {who}"] = (
                    f"wrk counted errors {result.errors} in {result.requests} requests"
                )
            run.results.set(f"warm_manifest_{kind}_rps", who, result.requests_per_second)
            run.results.set(f"warm_manifest_{kind}_p50", who, result.p50_ms)
            run.results.set(f"warm_manifest_{kind}_p99", who, result.p99_ms)
    for who, peak in peaks.items():
        run.results.set("peak_rss_manifest_load", who, peak)
    run.results.details["warm_manifest"] = details


PHASES: list[tuple[str, Callable[[Run], None]]] = [
    ("16 concurrent cold GETs", coalescing),
    ("cold big blob", cold_big),
    ("cold pulls", cold_pulls),
    ("warm blobs and manifests", warm),
]


# -- the run ------------------------------------------------------------------------------


def find_tools() -> dict[str, str]:
    found = {}
    for tool in TOOLS:
        path = shutil.which(tool) or (
            f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None
        )
        if path is None:
            raise SystemExit(f"bench: {tool} is missing (apt-get install it)")
        found[tool] = path
    return found


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pt-bench-suite-"))
    try:
        yield path
    finally:
        if keep:
            say(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def execute(args: argparse.Namespace, results: Results) -> None:
    binaries = find_tools()
    cpus = Cpus.plan(pin=not args.no_pin)
    big_size = (256 if args.quick else 1024) * MiB
    results.machine = machine(binaries)
    results.params = {
        "quick": args.quick,
        "workers": args.workers,
        "big_blob_bytes": big_size,
        "load_seconds": int(args.seconds or (4 if args.quick else 10)),
        "cold_pull_rounds": args.reps,
        "small_images": args.small,
        "manifest_connections": MANIFEST_CONNECTIONS,
        "concurrent_cold_gets": CONCURRENT,
        "cpus": cpus.describe(),
    }
    with ExitStack() as stack, workdir(args.keep) as work:
        say(
            f"working in {work}; servers on CPUs {cpus.describe()['server']}, "
            f"clients on {cpus.describe()['client']}"
        )
        tokens = TokenServer(workdir=work / "tokens")
        tokens.start()
        stack.callback(tokens.close)
        upstream = Registry(work / "upstream", tokens=tokens)
        upstream.start()
        stack.callback(upstream.stop)
        say("seeding the upstream...")
        started = time.monotonic()
        seeded = seed(upstream.url, tokens, work, big_size, args.small)
        results.phases["seeding"] = time.monotonic() - started
        results.params["big_blob_bytes"] = seeded.big.layer_size
        run = Run(args, work, cpus, binaries, tokens, upstream, seeded, results, args.wait_idle)
        for name, phase in PHASES:
            say(f"{name}...")
            started = time.monotonic()
            try:
                phase(run)
            except Exception as exc:  # one phase failing must not lose the others
                traceback.print_exc()
                results.errors[name] = f"{type(exc).__name__}: {exc}"
            finally:
                results.phases[name] = time.monotonic() - started


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="256 MiB blob, 4 s loads, 5 cold pull rounds"
    )
    parser.add_argument("--workers", type=int, default=1, help="pullthrough worker processes")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder")
    parser.add_argument("--seconds", type=int, help="length of each load test (10, quick 4)")
    parser.add_argument("--reps", type=int, help="cold pull rounds (9, quick 5)")
    parser.add_argument("--small", type=int, default=200, help="small tagged images (200)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and clients")
    parser.add_argument(
        "--wait",
        type=float,
        default=900,
        help="seconds to wait for another benchmark run on this machine to end (900)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=300,
        help="seconds in all to wait, before measurements, for other processes to leave "
        "the CPUs alone (300; 0: never wait)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the warm figures, run their loads again under py-spy and keep the profiles",
    )
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 5 if args.quick else 9
    if args.workers < 1 or args.reps < 1 or args.small < 1:
        parser.error("--workers, --reps and --small must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not Path("tests/support").is_dir():
        print("bench: run it from the repository's root", file=sys.stderr)
        return 2
    others = wait_for_other_benchmarks(args.wait, say) if args.wait > 0 else []
    results = Results()
    whole = CpuSnapshot.take()
    if others:
        results.errors["machine"] = f"other benchmarks were running: {others}"
    began = time.monotonic()
    finished = False
    try:
        with exit_on_signals():
            execute(args, results)
        finished = True
    finally:
        results.elapsed = time.monotonic() - began
        results.load["whole run"] = whole.other_load()
        if not finished:
            results.errors["run"] = "interrupted: the figures shown are all there are"
        if results.machine:
            # An interrupted run leaves the last complete one in place.
            as_json, as_md = results.write(args.out, "latest" if finished else "interrupted")
            say("")
            say(as_md.read_text())
            say(f"wrote {as_json} and {as_md} ({results.elapsed:.0f} s)")
    return 1 if results.errors else 0

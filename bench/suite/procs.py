"""The processes a run starts: CPU pinning, process-tree RSS, nginx, clean-up on signals."""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from tests.support import httpclient
from tests.support.mirror import MirrorProcess, free_port
from tests.support.registry import Registry

MiB = 1 << 20
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# -- CPUs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cpus:
    """Which CPUs the servers under test and the load tools run on (``None``: any).

    The first CPU this process may use goes to the clients, the others to the
    servers; with fewer than two CPUs, or pinning turned off, nothing is pinned.
    """

    server: frozenset[int] | None
    client: frozenset[int] | None

    @classmethod
    def plan(cls, *, pin: bool) -> Cpus:
        available = sorted(os.sched_getaffinity(0))
        if not pin or len(available) < 2:
            return cls(None, None)
        return cls(frozenset(available[1:]), frozenset(available[:1]))

    def client_cmd(self, cmd: list[str]) -> list[str]:
        """``cmd`` run on the client CPUs (through ``taskset``)."""
        if self.client is None:
            return cmd
        return ["taskset", "-c", ",".join(map(str, sorted(self.client))), *cmd]

    def describe(self) -> dict[str, list[int] | None]:
        return {
            "server": None if self.server is None else sorted(self.server),
            "client": None if self.client is None else sorted(self.client),
        }


@contextlib.contextmanager
def born_on(cpus: frozenset[int] | None) -> Iterator[None]:
    """Processes started inside run on ``cpus`` from their first instruction.

    Linux applies ``sched_setaffinity(0, ...)`` to the calling thread only, and a
    child inherits the mask of the thread that forked it; so only what this thread
    starts here is affected. Starting pinned matters for Go: the runtime sizes
    ``GOMAXPROCS`` from the mask it finds at start-up.
    """
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        tree.append(current)
        queue.extend(children.get(current, []))
    return tree


def pin_tree(pid: int, cpus: frozenset[int] | None) -> None:
    """Move every thread of ``pid`` and its descendants to ``cpus`` (``None``: all CPUs)."""
    target = cpus if cpus is not None else frozenset(range(os.cpu_count() or 1))
    for process in process_tree(pid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{process}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), target)


# -- memory -------------------------------------------------------------------------------


def rss_bytes(pids: list[int]) -> int:
    """The summed resident set size of ``pids`` (``VmRSS``, from ``/proc/PID/statm``)."""
    total = 0
    for pid in pids:
        try:
            resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        total += resident * PAGE_SIZE
    return total


def pss_bytes(pids: list[int]) -> int:
    """The summed proportional set size of ``pids``: shared pages (the interpreter,
    libraries) split between the processes sharing them, so workers add up fairly."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            continue
    return total


class PeakRss:
    """Samples the RSS (and PSS) of a process tree every ``interval`` seconds while in a
    ``with``.

    The tree (the server and its workers) is listed again every second, not at
    every sample, to keep the sampler's own CPU use small; the sampling thread runs
    on the client CPUs, away from the server it watches.
    """

    def __init__(
        self, pid: int, *, interval: float = 0.05, cpus: frozenset[int] | None = None
    ) -> None:
        self.pid = pid
        self.interval = interval
        self.cpus = cpus
        self.peak = 0
        self.peak_pss = 0
        self.processes = 0
        self.samples = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    @property
    def peak_mib(self) -> float:
        return self.peak / MiB

    @property
    def peak_pss_mib(self) -> float:
        return self.peak_pss / MiB

    def _sample(self, pids: list[int]) -> None:
        self.peak = max(self.peak, rss_bytes(pids))
        self.peak_pss = max(self.peak_pss, pss_bytes(pids))
        self.processes = max(self.processes, len(pids))
        self.samples += 1

    def _run(self) -> None:
        if self.cpus is not None:
            os.sched_setaffinity(0, self.cpus)
        pids, listed = process_tree(self.pid), time.monotonic()
        while not self._done.wait(self.interval):
            if time.monotonic() - listed > 1.0:
                pids, listed = process_tree(self.pid), time.monotonic()
            self._sample(pids)

    def __enter__(self) -> Self:
        self._sample(process_tree(self.pid))
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join()
        self._sample(process_tree(self.pid))


# -- the servers --------------------------------------------------------------------------


class QuietRegistry(Registry):
    """``docker-registry`` without its per-request access log and info lines.

    Used for the peer, so that it, like pullthrough (run at ``WARNING``), is not
    measured writing a log line for every request. The upstream keeps its access
    log: the benchmark counts what reached it there.
    """

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["log"] = {"level": "error", "formatter": "text", "accesslog": {"disabled": True}}
        return cfg


def server_pid(server: MirrorProcess | Registry) -> int:
    """The process to watch (and pin) for a server: the top of its process tree."""
    pid = server.proc.pid if isinstance(server, MirrorProcess) and server.proc else None
    if isinstance(server, Registry):
        pid = server.pid
    if pid is None:
        raise RuntimeError("the server is not running")
    return pid


_LIVE: set[subprocess.Popen[bytes]] = set()


def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    _LIVE.clear()


atexit.register(_kill_leftovers)


class Nginx:
    """nginx serving one file with ``sendfile``: the practical ceiling for a cache hit."""

    def __init__(self, binary: str, workdir: Path, served: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.root = workdir / "www"
        self.conf = workdir / "nginx.conf"
        self.url = f"http://127.0.0.1:{self.port}/blob"
        self.proc: subprocess.Popen[bytes] | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        (workdir / "tmp").mkdir(exist_ok=True)
        target = self.root / "blob"
        if not target.exists():
            try:
                target.hardlink_to(served)  # the very same file (and page cache) the others use
            except OSError:
                target.symlink_to(served)

    def config(self) -> str:
        w = self.workdir
        # As root, workers would switch to an unprivileged user that cannot read
        # our 0700 temporary directory: keep them as the current user.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
        return f"""{user}daemon off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {w}/tmp/client;
    proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi;
    uwsgi_temp_path {w}/tmp/uwsgi;
    scgi_temp_path {w}/tmp/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
    }}
}}
"""

    def start(self, cpus: frozenset[int] | None = None) -> None:
        self.conf.write_text(self.config())
        with born_on(cpus), (self.workdir / "stderr.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf), "-e", str(self.workdir / "error.log")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _LIVE.add(self.proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.workdir / 'error.log').read_text()}")
            try:
                if httpclient.request("HEAD", self.url, timeout=2).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not answer")

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("nginx is not running")
        return self.proc.pid

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        _LIVE.discard(proc)


# -- signals and the machine --------------------------------------------------------------


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind the run like Ctrl-C does, so every ``finally`` and
    clean-up callback runs; a second signal during the clean-up is ignored."""
    fired: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        if fired:
            return
        fired.append(signum)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def other_benchmarks() -> list[str]:
    """Command lines of other benchmark runs on this machine (``python -m bench...``)."""
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        for i, word in enumerate(words[:-1]):
            if word == "-m" and words[i + 1].split(".")[0] == "bench" and "python" in words[0]:
                found.append(f"{entry.name}: {' '.join(words)}")
                break
    return found


def wait_for_other_benchmarks(limit: float, say: Callable[[str], None]) -> list[str]:
    """Wait (up to ``limit`` seconds) while another benchmark runs here: two runs on
    the same cores measure each other. Returns what was still running at the end."""
    deadline = time.monotonic() + limit
    announced = 0.0
    while (others := other_benchmarks()) and time.monotonic() < deadline:
        if time.monotonic() - announced > 30:
            say("another benchmark is running on this machine; waiting for it:")
            for line in others:
                say(f"  {line}")
            announced = time.monotonic()
        time.sleep(2)
    return others


# -- other work on the machine ------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _machine_ticks() -> tuple[int, int]:
    """CPU time of the whole machine in process context (user, nice, system), and steal."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[0] + fields[1] + fields[2], fields[7] if len(fields) > 7 else 0


def _task_ticks(pid: int) -> int:
    """utime + stime of ``pid`` and of its children it has waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(x) for x in fields[11:15])


def _all_ticks() -> dict[int, tuple[str, int]]:
    """Every process: its name and utime + stime (its own, not its children's)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry.name)] = (name, int(fields[11]) + int(fields[12]))
    return out


def _own_ticks() -> int:
    """CPU time of this process and everything it started, alive or gone."""
    # A child that exited and was waited for is in our cutime/cstime; the live ones
    # (servers) are counted one by one. A process counted live at one snapshot and
    # waited for by the next one moves from one term to the other without a jump.
    return sum(_task_ticks(pid) for pid in process_tree(os.getpid()))


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float
    machine: int
    steal: int
    own: int
    own_pids: frozenset[int]
    processes: dict[int, tuple[str, int]]

    @classmethod
    def take(cls) -> CpuSnapshot:
        machine, steal = _machine_ticks()
        own_pids = frozenset(process_tree(os.getpid()))
        own = sum(_task_ticks(pid) for pid in own_pids)
        return cls(time.monotonic(), machine, steal, own, own_pids, _all_ticks())

    def other_load(self, later: CpuSnapshot | None = None) -> dict[str, Any]:
        """Cores' worth of CPU used by other processes (and stolen by the hypervisor)
        between this snapshot and ``later`` (now), and the busiest of them."""
        end = later or CpuSnapshot.take()
        wall = max(end.wall - self.wall, 1e-6)
        other = (end.machine - self.machine) - (end.own - self.own)
        mine = self.own_pids | end.own_pids
        used: dict[str, int] = {}
        for pid, (name, ticks) in end.processes.items():
            if pid not in mine:
                delta = ticks - self.processes.get(pid, (name, 0))[1]
                if delta > 0:
                    used[name] = used.get(name, 0) + delta
        busiest = sorted(used.items(), key=lambda item: -item[1])[:3]
        return {
            "seconds": round(wall, 2),
            "other_cores": round(max(other, 0) / CLOCK_TICKS / wall, 3),
            "steal_cores": round((end.steal - self.steal) / CLOCK_TICKS / wall, 3),
            "busiest_others": {name: round(t / CLOCK_TICKS / wall, 3) for name, t in busiest},
        }


def wait_until_quiet(
    limit: float, say: Callable[[str], None], *, threshold: float = 0.15, window: float = 2.0
) -> dict[str, Any]:
    """Wait (up to ``limit`` seconds) until other processes use under ``threshold``
    cores for ``window`` seconds; returns the last window's figures."""
    deadline = time.monotonic() + limit
    announced = False
    while True:
        before = CpuSnapshot.take()
        time.sleep(window)
        load = before.other_load()
        if load["other_cores"] < threshold or time.monotonic() >= deadline:
            if announced:
                say(f"  ...other processes now use {load['other_cores']:.2f} cores; going on")
            return load
        if not announced:
            say(
                f"  other processes use {load['other_cores']:.2f} cores of this machine; "
                f"waiting up to {limit:.0f} s for them to calm down "
                f"(busiest: {load['busiest_others']})"
            )
            announced = True


def tree_cpu_seconds(pid: int) -> float:
    """CPU time used so far by ``pid`` and its live descendants."""
    return sum(_task_ticks(p) for p in process_tree(pid)) / CLOCK_TICKS

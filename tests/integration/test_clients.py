"""Real clients pulling through a mirror process: containerd (ctr), podman and dockerd.

Each test starts its client (and daemon, if any) in temporary directories with its
own sockets, pulls images from the seeded upstream through a fresh mirror, checks
that the client ended up with the upstream's exact manifests and configs, removes
the image, pulls again, and checks that the second pull sent no blob (and no
manifest) GET upstream.

Nothing here may leave loopback: every client gets ``HTTP(S)_PROXY`` pointing at a
closed local port, so a client that gives up on the mirror and falls back to
``registry-1.docker.io`` fails loudly instead of quietly trying the Internet.

The daemons need root (mounts, namespaces, cgroups); the tests skip otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.binaries import require_binary
from tests.support.images import Image, make_image
from tests.support.mirror import MirrorProcess
from tests.support.processes import Service
from tests.support.registry import AccessLogEntry, Registry, RegistryFactory

PLATFORM = "linux/amd64"
ALPINE = "library/alpine:3.19"
HELLO = "library/hello:latest"
OCIAPP = "library/ociapp:v1"
# A port nothing listens on (RFC 863 discard): the clients' way out of loopback.
NO_EGRESS = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "no_proxy": "127.0.0.1,localhost",
}
# dockerd 20.10 creates these whatever its exec-root (the plugin socket directory).
DOCKER_PLUGIN_DIRS = (Path("/run/docker/plugins"), Path("/run/docker"))
COMMAND_TIMEOUT = 30.0
START_TIMEOUT = 20.0


# ------------------------------------------------------------------------ helpers


class CommandError(AssertionError):
    def __init__(self, result: subprocess.CompletedProcess[bytes]) -> None:
        super().__init__(
            f"{' '.join(map(str, result.args))} exited with {result.returncode}\n"
            f"stdout:\n{result.stdout.decode(errors='replace')}\n"
            f"stderr:\n{result.stderr.decode(errors='replace')}"
        )


def run(argv: Sequence[str | Path], env: Mapping[str, str]) -> str:
    """Run a client command to completion; its stdout, or CommandError."""
    result = subprocess.run(
        [str(a) for a in argv],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        raise CommandError(result)
    return result.stdout.decode()


def base_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        **NO_EGRESS,
    }


def require_root(client: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(
            f"{client} needs root here (it mounts, unshares and manages cgroups); "
            "run the tests as root to cover it"
        )


class Daemon(Service):
    """A daemon in its own session; leaving the ``with`` block stops the whole group."""

    def __init__(
        self, name: str, argv: Sequence[str | Path], log: Path, env: Mapping[str, str]
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log = log
        self.env = dict(env)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return  # never started, or already reaped (its group id may be reused)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        # The leader is a zombie at most, so its group id is still ours: whatever
        # is left of the group (children that outlived it) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(
                    f"{self.name} exited with {self.proc.returncode} before {what}:\n"
                    + self.log_tail()
                )
            if ready():
                return
            time.sleep(0.1)
        pytest.fail(f"{self.name}: no {what} after {START_TIMEOUT}s:\n" + self.log_tail())


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def unix_http_ok(path: Path, request_path: str) -> bool:
    """Whether ``GET request_path`` on the unix socket ``path`` answers 200."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(path))
            sock.sendall(f"GET {request_path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            status = sock.recv(64)
    except OSError:
        return False
    return status.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))


def unix_listening(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(path))
    except OSError:
        return False
    return True


def mounts_under(path: Path) -> list[str]:
    prefix = str(path)
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        target = fields[1].encode().decode("unicode_escape")  # "\040" is a space
        if target == prefix or target.startswith(prefix + "/"):
            found.append(target)
    return found


def remove_if_new(dirs: Sequence[Path]) -> Callable[[], None]:
    """Note which of ``dirs`` are missing now; the returned function removes those
    of them that exist but are empty by then (what a daemon we ran left behind)."""
    missing = [d for d in dirs if not d.exists()]

    def remove() -> None:
        for d in missing:
            with contextlib.suppress(OSError):
                d.rmdir()

    return remove


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix sockets live here (108-byte limit).

    Removed afterwards, with anything a daemon killed mid-way left mounted in it.
    """
    path = Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp" if Path("/tmp").is_dir() else None))
    try:
        yield path
    finally:
        for target in sorted(mounts_under(path), key=len, reverse=True):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mirror(upstream: Registry, tmp_path: Path) -> Iterator[MirrorProcess]:
    process = MirrorProcess(tmp_path / "cache", upstream.url)
    try:
        process.start()  # stop() below also ends a mirror that failed to start
        yield process
    finally:
        process.stop()


def host(mirror: MirrorProcess) -> str:
    return mirror.url.removeprefix("http://")


def blob_gets(entries: list[AccessLogEntry]) -> list[str]:
    """Digests of the blobs the upstream sent (a 401 challenge carries none)."""
    return [
        e.route.rsplit("/", 1)[1]
        for e in entries
        if e.method == "GET" and "/blobs/" in e.route and e.status < 300
    ]


def manifest_gets(entries: list[AccessLogEntry]) -> list[AccessLogEntry]:
    return [e for e in entries if e.method == "GET" and "/manifests/" in e.route]


def platform_blobs(image: Image) -> list[str]:
    """Config and layer digests of ``image``'s instance for PLATFORM."""
    return [b.digest for b in image.blobs_of(image.for_platform(PLATFORM))]


def config_digest(image: Image) -> str:
    digest = image.for_platform(PLATFORM).config_digest
    assert digest is not None
    return digest


def assert_cold_pull(entries: list[AccessLogEntry], image: Image) -> None:
    """Each blob of the platform's image crossed the upstream exactly once."""
    assert sorted(blob_gets(entries)) == sorted(platform_blobs(image)), image.ref


def assert_warm_pull(entries: list[AccessLogEntry]) -> None:
    assert blob_gets(entries) == [], "a warm pull fetched blobs upstream"
    assert manifest_gets(entries) == [], "a warm pull fetched manifests upstream"


def containerd_config(root: Path, socket_path: Path) -> str:
    """A containerd of our own: own root, state, sockets and opt dir, no CRI."""
    return (
        "version = 2\n"
        f'root = "{root / "root"}"\n'
        f'state = "{root / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        "[grpc]\n"
        f'  address = "{socket_path}"\n'
        "[ttrpc]\n"
        f'  address = "{socket_path}.ttrpc"\n'
        '[plugins."io.containerd.internal.v1.opt"]\n'
        f'  path = "{root / "opt"}"\n'
    )


def start_containerd(stack: contextlib.ExitStack, root: Path, log: Path) -> Path:
    """Start containerd under ``root``; its socket (stopped when ``stack`` closes)."""
    binary = require_binary("containerd")
    root.mkdir(parents=True, exist_ok=True)
    sock = root / "c.sock"
    config = root / "config.toml"
    config.write_text(containerd_config(root, sock))
    daemon = stack.enter_context(
        Daemon("containerd", [binary, "--config", config], log, base_env(root / "home"))
    )
    daemon.wait_until(lambda: unix_listening(sock), f"socket {sock}")
    return sock


# ------------------------------------------------------------------------ containerd


def test_containerd_ctr_pulls_through_the_mirror(
    upstream: Registry, mirror: MirrorProcess, short_dir: Path, tmp_path: Path
) -> None:
    ctr = require_binary("ctr")
    require_root("containerd")
    image = upstream.images[ALPINE]
    ref = "docker.io/library/alpine:3.19"
    hosts = tmp_path / "hosts"
    (hosts / "docker.io").mkdir(parents=True)
    (hosts / "docker.io" / "hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n\n'
        f'[host."{mirror.url}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    # ctr itself talks to the registry; the daemon stores content and unpacks.
    env = base_env(tmp_path / "home")

    with contextlib.ExitStack() as stack:
        sock = start_containerd(stack, short_dir / "containerd", tmp_path / "containerd.log")
        ctr_ = [ctr, "--address", str(sock)]
        # The native snapshotter unpacks by copying: no overlay mounts needed.
        pull = [
            *ctr_,
            "images",
            "pull",
            "--hosts-dir",
            str(hosts),
            "--plain-http",
            "--platform",
            PLATFORM,
            "--snapshotter",
            "native",
            ref,
        ]
        wanted = {image.digest, image.for_platform(PLATFORM).digest, *platform_blobs(image)}

        def content() -> set[str]:
            return set(run([*ctr_, "content", "ls", "--quiet"], env).split())

        def image_digest() -> str:
            for line in run([*ctr_, "images", "ls"], env).splitlines()[1:]:
                fields = line.split()
                if fields and fields[0] == ref:
                    return fields[2]
            raise AssertionError(f"{ref} not in ctr images ls")

        mark = upstream.mark()
        run(pull, env)
        assert_cold_pull(upstream.requests_since(mark), image)
        assert image_digest() == image.digest
        assert wanted <= content()

        run([*ctr_, "images", "rm", "--sync", ref], env)
        assert not wanted & content(), "content survived the image's removal"

        mark = upstream.mark()
        run(pull, env)
        assert_warm_pull(upstream.requests_since(mark))
        assert image_digest() == image.digest
        assert wanted <= content()  # back, and only the mirror could have sent it


# ------------------------------------------------------------------------ podman


def podman_sandbox(
    podman: str, tmp_path: Path, store: Path, registries: str = ""
) -> tuple[Path, dict[str, str], list[str]]:
    """podman isolated from the machine: its config folder, its environment and
    the start of its command line, with vfs storage under ``store`` (a short
    path: podman's sockets live there) and ``registries`` in registries.conf."""
    conf = tmp_path / "podman"
    conf.mkdir()
    (conf / "registries.conf").write_text("unqualified-search-registries = []\n\n" + registries)
    (conf / "storage.conf").write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{store / "root"}"\nrunroot = "{store / "run"}"\n'
    )
    # No journald, no systemd, and the CNI backend: netavark would create
    # /run/containers/networks whatever we configure.
    (conf / "containers.conf").write_text(
        '[engine]\nevents_logger = "none"\ncgroup_manager = "cgroupfs"\n'
        '[network]\nnetwork_backend = "cni"\n'
    )
    (conf / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
    (conf / "auth.json").write_text('{"auths": {}}\n')
    (store / "tmp").mkdir(parents=True)
    env = {
        **base_env(tmp_path / "home"),
        "TMPDIR": str(store / "tmp"),
        "CONTAINERS_REGISTRIES_CONF": str(conf / "registries.conf"),
        "CONTAINERS_STORAGE_CONF": str(conf / "storage.conf"),
        "CONTAINERS_CONF": str(conf / "containers.conf"),
    }
    argv = [
        podman,
        "--root",
        str(store / "root"),
        "--runroot",
        str(store / "run"),
        "--storage-driver",
        "vfs",
        "--tmpdir",
        str(store / "libpod"),
        "--network-config-dir",
        str(store / "networks"),
    ]
    return conf, env, argv


def test_podman_pulls_through_the_mirror(
    upstream: Registry, mirror: MirrorProcess, short_dir: Path, tmp_path: Path
) -> None:
    podman = require_binary("podman")
    require_root("podman")
    image = upstream.images[ALPINE]
    ref = "docker.io/library/alpine:3.19"
    conf, env, podman_ = podman_sandbox(
        podman,
        tmp_path,
        short_dir / "podman",
        "[[registry]]\n"
        'prefix = "docker.io"\n'
        'location = "docker.io"\n\n'
        "[[registry.mirror]]\n"
        f'location = "{host(mirror)}"\n'
        "insecure = true\n",
    )
    pull = [
        *podman_,
        "pull",
        "--quiet",
        "--platform",
        PLATFORM,
        "--authfile",
        str(conf / "auth.json"),
        "--signature-policy",
        str(conf / "policy.json"),
        ref,
    ]

    def inspect() -> dict[str, Any]:
        (info,) = json.loads(run([*podman_, "image", "inspect", ref], env))
        assert isinstance(info, dict)
        return info

    mark = upstream.mark()
    image_id = run(pull, env).strip()
    assert_cold_pull(upstream.requests_since(mark), image)
    assert f"sha256:{image_id}" == config_digest(image)
    info = inspect()
    assert info["Digest"] == image.digest
    assert f"{ref.rsplit(':', 1)[0]}@{image.digest}" in info["RepoDigests"]

    run([*podman_, "rmi", ref], env)
    assert run([*podman_, "images", "--quiet"], env).strip() == ""

    mark = upstream.mark()
    assert run(pull, env).strip() == image_id
    assert_warm_pull(upstream.requests_since(mark))
    assert inspect()["Digest"] == image.digest


# ------------------------------------------------------------------------ dockerd


def start_dockerd(
    stack: contextlib.ExitStack,
    dockerd: str,
    short: Path,
    tmp_path: Path,
    settings: dict[str, Any] | None = None,
) -> dict[str, str]:
    """dockerd isolated from the machine (its own root under ``short``, vfs, no
    networking, our containerd), with ``settings`` added to its daemon.json;
    returns the environment a docker CLI talks to it with."""
    root = short / "docker"
    root.mkdir(parents=True)
    sock = root / "d.sock"
    stack.callback(remove_if_new(DOCKER_PLUGIN_DIRS))
    # dockerd's own containerd would write /opt/containerd: give it ours.
    containerd_sock = start_containerd(stack, short / "containerd", tmp_path / "containerd.log")
    config = {
        **(settings or {}),
        "storage-driver": "vfs",
        "iptables": False,
        "ip6tables": False,
        "ip-masq": False,
        "bridge": "none",
        "data-root": str(root / "data"),
        "exec-root": str(root / "exec"),
        "pidfile": str(root / "docker.pid"),
        "hosts": [f"unix://{sock}"],
        "exec-opts": ["native.cgroupdriver=cgroupfs"],
        "containerd": str(containerd_sock),
        "deprecated-key-path": str(root / "key.json"),  # not /etc/docker/key.json
    }
    (root / "daemon.json").write_text(json.dumps(config, indent=2))
    daemon = stack.enter_context(
        Daemon(
            "dockerd",
            [dockerd, "--config-file", root / "daemon.json"],
            tmp_path / "dockerd.log",
            base_env(root / "home"),
        )
    )
    daemon.wait_until(lambda: unix_http_ok(sock, "/_ping"), f"API on {sock}")
    return {
        **base_env(tmp_path / "home"),
        "DOCKER_HOST": f"unix://{sock}",
        "DOCKER_CONFIG": str(tmp_path / "docker-cli"),
    }


def test_dockerd_pulls_through_the_mirror(
    upstream: Registry, mirror: MirrorProcess, short_dir: Path, tmp_path: Path
) -> None:
    dockerd = require_binary("dockerd")
    docker = require_binary("docker")
    require_root("dockerd")
    # What users type, and the seeded image each one means.
    pulls = {"alpine:3.19": ALPINE, "hello": HELLO, "ociapp:v1": OCIAPP}

    with contextlib.ExitStack() as stack:
        env = start_dockerd(stack, dockerd, short_dir, tmp_path, {"registry-mirrors": [mirror.url]})

        def pull(name: str) -> None:
            run([docker, "pull", "--quiet", "--platform", PLATFORM, name], env)

        def check(name: str, image: Image) -> None:
            (info,) = json.loads(run([docker, "image", "inspect", name], env))
            assert info["Id"] == config_digest(image), name
            repo_digests = [d.rsplit("@", 1)[1] for d in info["RepoDigests"]]
            assert image.digest in repo_digests, name

        for name, ref in pulls.items():
            image = upstream.images[ref]
            mark = upstream.mark()
            pull(name)
            assert_cold_pull(upstream.requests_since(mark), image)
            check(name, image)

        run([docker, "rmi", *pulls], env)
        assert run([docker, "images", "--all", "--quiet"], env).strip() == ""

        mark = upstream.mark()
        for name in pulls:
            pull(name)
        assert_warm_pull(upstream.requests_since(mark))
        for name, ref in pulls.items():
            check(name, upstream.images[ref])


def test_containerd_default_hosts_reach_a_second_registry_by_ns(
    upstream: Registry,
    make_registry: RegistryFactory,
    short_dir: Path,
    tmp_path: Path,
) -> None:
    """One `_default` hosts.toml sends every registry to the mirror with ?ns=<host>."""
    ctr = require_binary("ctr")
    require_root("containerd")
    image = make_image("team/app", "1", seed="beta via containerd")
    beta = make_registry(seed=[image])
    config = tmp_path / "pullthrough.toml"
    config.write_text(f'[upstreams."beta.example"]\nurl = "{beta.url}"\n')
    mirror = MirrorProcess(tmp_path / "cache", upstream.url, config=config)
    mirror.start()
    hosts = tmp_path / "hosts"
    (hosts / "_default").mkdir(parents=True)
    (hosts / "_default" / "hosts.toml").write_text(
        f'[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    env = base_env(tmp_path / "home")
    ref = "beta.example/team/app:1"
    try:
        with contextlib.ExitStack() as stack:
            sock = start_containerd(stack, short_dir / "containerd", tmp_path / "containerd.log")
            ctr_ = [ctr, "--address", str(sock)]
            hub_mark, beta_mark = upstream.mark(), beta.mark()
            pull = ["images", "pull", "--hosts-dir", str(hosts), "--plain-http"]
            run([*ctr_, *pull, "--platform", PLATFORM, "--snapshotter", "native", ref], env)
            listed = run([*ctr_, "images", "ls"], env).splitlines()[1:]
            assert any(line.split()[:1] == [ref] and image.digest in line for line in listed)
            assert upstream.requests_since(hub_mark) == []
            fetched = blob_gets(beta.requests_since(beta_mark))
            assert sorted(fetched) == sorted(b.digest for b in image.blobs_of(image.top))
    finally:
        mirror.stop()

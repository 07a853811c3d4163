"""deploy/fleet/nginx.conf in front of three nodes sharing one Redis: pulls go
through it, and keep going when nodes are killed.

The config is the one the fleet Compose file mounts, with the nodes' host names
and the listen port replaced by this test's loopback ports. The nodes keep blobs
and manifests in cache folders of their own here (no S3): what is shared is the
tag index, so a tag one node checked is fresh on the others.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.binaries import require_binary
from tests.support.images import make_image
from tests.support.mirror import MirrorProcess
from tests.support.processes import free_port
from tests.support.redis import RedisServer
from tests.support.registry import RegistryFactory
from tests.support.skopeo import Skopeo

NGINX_CONF = Path(__file__).resolve().parents[2] / "deploy" / "fleet" / "nginx.conf"


def local_nginx_conf(work: Path, port: int, nodes: list[int]) -> str:
    text = NGINX_CONF.read_text()
    for n, node_port in enumerate(nodes, start=1):
        text, count = re.subn(rf"\bpullthrough-{n}:5000\b", f"127.0.0.1:{node_port}", text)
        assert count == 1, f"pullthrough-{n} is not in {NGINX_CONF.name} once"
    text, count = re.subn(r"listen 5000;", f"listen 127.0.0.1:{port};", text)
    assert count == 1
    temp = " ".join(
        f"{kind}_temp_path {work}/tmp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {", "http {\n    " + temp, 1)
    return f"user root;\ndaemon off;\npid {work}/nginx.pid;\nerror_log {work}/error.log;\n" + text


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with RedisServer(tmp_path / "redis") as server:
        yield server.url


@contextlib.contextmanager
def nginx_in_front(work: Path, nodes: list[MirrorProcess]) -> Iterator[int]:
    """deploy/fleet/nginx.conf balancing over ``nodes``; yields its port."""
    nginx = require_binary("nginx")
    port = free_port()
    (work / "tmp").mkdir(parents=True)
    (work / "nginx.conf").write_text(local_nginx_conf(work, port, [n.port for n in nodes]))
    front = subprocess.Popen(
        [nginx, "-c", str(work / "nginx.conf"), "-e", str(work / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            time.sleep(0.05)
        yield port
    finally:
        front.terminate()
        front.wait(10)


def test_pulls_through_nginx_keep_working_when_nodes_are_killed(
    redis_url: str, make_registry: RegistryFactory, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    first, second = (make_image("team/lb", tag, seed=f"lb-{tag}") for tag in ("1", "2"))
    origin = make_registry(seed=[first, second])
    env = {"PULLTHROUGH_REDIS_URL": redis_url}
    nodes = [MirrorProcess(tmp_path / f"node{i}", origin.url, env=env) for i in (1, 2, 3)]
    try:
        for node in nodes:
            node.start()
        with nginx_in_front(tmp_path / "nginx", nodes) as port:
            lb = f"docker://127.0.0.1:{port}"
            for n in range(3):  # least_conn over idle nodes: each may answer some
                skopeo_cli.copy(f"{lb}/{first.ref}", f"dir:{tmp_path / f'first{n}'}")
                assert (tmp_path / f"first{n}" / "manifest.json").read_bytes() == first.top.data
            mark = origin.mark()
            nodes[0].kill()
            nodes[1].kill()
            skopeo_cli.copy(f"{lb}/{first.ref}", f"dir:{tmp_path / 'again'}")
            skopeo_cli.copy(f"{lb}/{second.ref}", f"dir:{tmp_path / 'second'}")
            seen = origin.requests_since(mark)
    finally:
        for node in nodes:
            node.stop()
    assert (tmp_path / "again" / "manifest.json").read_bytes() == first.top.data
    assert (tmp_path / "second" / "manifest.json").read_bytes() == second.top.data
    # The survivor knew the first tag from the shared index: not asked again.
    assert [r for r in seen if r.route.endswith(f"/manifests/{first.tag}")] == []

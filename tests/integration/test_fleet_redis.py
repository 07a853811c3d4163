"""Several nodes sharing one Redis (redis_url): what one node learns of a tag, and
the pins set on one, hold on every node; a Redis that is not there stops the
server and the tools with one line.

The nodes here have cache folders of their own (the blob and manifest stores
are not shared): only the tag index is, on a real redis-server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pullthrough.cache.coordination import LocalLocks
from pullthrough.proxy.resources import fetch_locks
from tests.support.images import make_image
from tests.support.mirror import MirrorProcess, run_cli, settings_for
from tests.support.processes import free_port
from tests.support.redis import RedisServer
from tests.support.registry import RegistryFactory
from tests.support.skopeo import Skopeo


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A Redis of this test's own: the nodes use the default key prefix."""
    with RedisServer(tmp_path / "redis") as server:
        yield server.url


def test_a_tag_checked_on_one_node_is_fresh_on_the_other_and_pins_are_shared(
    redis_url: str, make_registry: RegistryFactory, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    image = make_image("team/fleet", "1", seed="fleet-tags")
    origin = make_registry(seed=[image])
    env = {"PULLTHROUGH_REDIS_URL": redis_url}
    # The second node with two worker processes: each opens its own clients.
    nodes = [MirrorProcess(tmp_path / f"node{i}", origin.url, env=env, workers=i) for i in (1, 2)]
    for node in nodes:
        node.start()
    try:
        one, two = (node.url.removeprefix("http://") for node in nodes)
        skopeo_cli.copy(f"docker://{one}/{image.ref}", f"dir:{tmp_path / 'one'}")
        mark = origin.mark()
        skopeo_cli.copy(f"docker://{two}/{image.ref}", f"dir:{tmp_path / 'two'}")
        seen = origin.requests_since(mark)
    finally:
        for node in nodes:
            node.stop()
    by_tag = [r for r in seen if r.route.endswith(f"/manifests/{image.tag}")]
    assert by_tag == []  # node 1's check counts for node 2 within tag_ttl
    by_digest = [r for r in seen if r.route.endswith(f"/manifests/{image.digest}")]
    assert [r.method for r in by_digest] == ["GET"]  # its own store had no copy
    assert (tmp_path / "two" / "manifest.json").read_bytes() == (
        tmp_path / "one" / "manifest.json"
    ).read_bytes()

    def tool(*args: str, node: int) -> str:
        result = run_cli(*args, cache=tmp_path / f"node{node}", upstream=origin.url, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    assert "pinned" not in tool("cache", "ls", node=2)
    tool("cache", "pin", image.ref, node=1)
    listing = tool("cache", "ls", node=2)
    assert f"docker.io/{image.ref}" in listing
    assert "pinned" in listing
    tool("cache", "unpin", image.ref, node=2)
    assert "pinned" not in tool("cache", "ls", node=1)


def test_an_unreachable_redis_stops_the_server_and_the_tools_with_one_line(
    tmp_path: Path,
) -> None:
    closed = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    env = {"PULLTHROUGH_REDIS_URL": closed}
    cache = tmp_path / "cache"
    served = run_cli(
        "serve", "--port", str(free_port()), cache=cache, upstream="http://127.0.0.1:9", env=env
    )
    pinned = run_cli(
        "cache", "pin", "alpine:3.19", cache=cache, upstream="http://127.0.0.1:9", env=env
    )
    warmed = run_cli("warm", "alpine:3.19", cache=cache, upstream="http://127.0.0.1:9", env=env)
    for result in (served, pinned, warmed):
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "redis_url redis://:***@127.0.0.1" in lines[0]
        assert "hunter2" not in result.stderr
        assert "Traceback" not in result.stderr


def test_a_node_whose_redis_goes_away_still_serves_pulls(
    make_registry: RegistryFactory, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    first, second = (make_image("team/gone", tag, seed=f"gone-{tag}") for tag in ("1", "2"))
    origin = make_registry(seed=[first, second])
    with RedisServer(tmp_path / "redis") as server:
        node = MirrorProcess(
            tmp_path / "node", origin.url, env={"PULLTHROUGH_REDIS_URL": server.url}
        )
        node.start()
    try:  # Redis has stopped: tags are asked of the upstream, pulls still work
        host = node.url.removeprefix("http://")
        for image in (first, second):
            skopeo_cli.copy(f"docker://{host}/{image.ref}", f"dir:{tmp_path / image.tag}")
            assert (tmp_path / image.tag / "manifest.json").read_bytes() == image.top.data
        log = node.log.read_text()
    finally:
        node.stop()
    assert "Traceback" not in log
    assert "Redis: reading the tag team/gone:1 failed" in log


async def test_fetch_locks_are_shared_through_redis_url_and_local_without(
    redis_url: str, tmp_path: Path
) -> None:
    key = "sha256:" + "f" * 64
    alone = fetch_locks(settings_for(tmp_path / "c", "http://127.0.0.1:9"))
    assert isinstance(alone, LocalLocks)
    await alone.close()
    shared = settings_for(tmp_path / "c", "http://127.0.0.1:9", redis_url=redis_url)
    one, two = fetch_locks(shared), fetch_locks(shared)
    try:
        lease = await one.acquire(key)
        assert lease is not None
        assert await two.acquire(key) is None  # another node's handle
        await lease.release(committed=True)
        again = await two.acquire(key)
        assert again is not None
        await again.release(committed=False)
    finally:
        await one.close()
        await two.close()

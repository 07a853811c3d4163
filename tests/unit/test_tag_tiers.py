"""How the mirror answers a tag: memory, then the tag index, then the upstream
(a HEAD to revalidate), and the cached answer when the upstream cannot say."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from pullthrough.cache.blobs import BlobStore
from pullthrough.cache.digests import Digest
from pullthrough.cache.index import TagEntry, TagIndex
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore
from pullthrough.cache.mediatypes import DOCKER_MANIFEST, OCI_INDEX
from pullthrough.metrics import Metrics
from pullthrough.proxy.config import UpstreamSettings
from pullthrough.proxy.errors import ManifestUnknown, UpstreamUnavailable
from pullthrough.proxy.mirror import ManifestAnswer, Mirror
from pullthrough.proxy.names import Reference
from pullthrough.proxy.upstream import UpstreamClient
from tests.support.faults import FaultRegistry

Server = Callable[[web.Application], Awaitable[TestServer]]
REPO = "team/app"
FIRST = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "layers": []}
SECOND = {**FIRST, "layers": [{"size": 1}]}


class CountedIndex(TagIndex):
    """The real tag index, counting its reads."""

    reads = 0

    async def get(self, upstream: str, repository: str, tag: str, accept: str) -> TagEntry | None:
        self.reads += 1
        return await super().get(upstream, repository, tag, accept)


class World:
    """One upstream fake and one cache; ``mirror()`` is a worker on them."""

    def __init__(self, fault: FaultRegistry, upstream: UpstreamClient, root: Path) -> None:
        self.fault = fault
        self.upstream = upstream
        layout = Layout(root)
        layout.create()
        self.blobs = BlobStore(layout)
        self.manifests = ManifestStore(layout)
        self.tags = CountedIndex(root / "index")
        self.metrics = Metrics()

    def mirror(self, tag_ttl: float, *, offline: bool = False) -> Mirror:
        return Mirror(
            self.upstream,
            self.blobs,
            self.manifests,
            self.tags,
            self.metrics,
            tag_ttl=tag_ttl,
            offline=offline,
        )

    def upstream_requests(self, method: str) -> int:
        return self.fault.count(method, "manifests")

    def stale(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "pullthrough_stale_served_total", {"reason": reason}
        )
        return value or 0.0


@pytest.fixture
async def world(aiohttp_server: Server, tmp_path: Path) -> AsyncIterator[World]:
    fault = FaultRegistry()
    fault.add_manifest("1.0", FIRST)
    server = await aiohttp_server(fault.app())
    async with aiohttp.ClientSession() as session:
        url = URL(str(server.make_url("/")))
        made = World(
            fault, UpstreamClient(UpstreamSettings("registry.test", url), session), tmp_path
        )
        yield made
        await made.blobs.close()
        made.tags.close()


async def get(mirror: Mirror, tag: str = "1.0", accept: tuple[str, ...] = ()) -> ManifestAnswer:
    return await mirror.manifest(REPO, Reference.parse(tag), accept, head=False)


async def test_a_fresh_tag_is_answered_from_memory(world: World) -> None:
    mirror = world.mirror(300)
    first = await get(mirror)
    assert first.source == "upstream"
    reads = world.tags.reads
    again = await get(mirror)
    assert (again.source, again.digest) == ("cache", first.digest)
    assert world.tags.reads == reads  # not even the index was asked
    assert world.upstream_requests("GET") == 1
    assert world.upstream_requests("HEAD") == 0


async def test_another_worker_answers_a_fresh_tag_from_the_index(world: World) -> None:
    first = await get(world.mirror(300))
    other = world.mirror(300)  # its memory is empty
    reads = world.tags.reads
    answer = await get(other)
    assert (answer.source, answer.digest) == ("cache", first.digest)
    # Two keys: this client's Accept set, and the entry for any client.
    assert world.tags.reads == reads + 2
    assert world.upstream_requests("GET") == 1
    assert world.upstream_requests("HEAD") == 0
    await get(other)
    assert world.tags.reads == reads + 2  # then from its memory


async def test_an_old_tag_is_revalidated_with_a_head(world: World) -> None:
    mirror = world.mirror(0)
    first = await get(mirror)
    answer = await get(mirror)
    assert (answer.source, answer.digest) == ("cache", first.digest)
    assert world.upstream_requests("HEAD") == 1
    assert world.upstream_requests("GET") == 1
    moved = world.fault.add_manifest("1.0", SECOND)
    answer = await get(mirror)
    assert (answer.source, answer.digest) == ("upstream", moved)
    assert world.upstream_requests("HEAD") == 2
    assert world.upstream_requests("GET") == 2  # the new content, by digest
    assert world.fault.seen[-1].path.endswith(f"/manifests/{moved}")


@pytest.mark.parametrize(("status", "reason"), [(503, "unavailable"), (429, "ratelimited")])
async def test_an_old_tag_is_served_stale_when_the_upstream_cannot_say(
    world: World, status: int, reason: str
) -> None:
    mirror = world.mirror(0)
    first = await get(mirror)
    world.fault.mode, world.fault.status = "status", status
    answer = await get(mirror)
    assert (answer.source, answer.digest, answer.data) == ("stale", first.digest, first.data)
    assert world.stale(reason) == 1


async def test_without_a_cached_answer_the_upstream_failure_stands(world: World) -> None:
    world.fault.mode, world.fault.status = "status", 503
    with pytest.raises(UpstreamUnavailable):
        await get(world.mirror(0))
    assert world.stale("unavailable") == 0


async def test_offline_serves_an_old_tag_without_asking(world: World) -> None:
    first = await get(world.mirror(0))
    seen = len(world.fault.seen)
    answer = await get(world.mirror(0, offline=True))
    assert (answer.source, answer.digest) == ("cache", first.digest)
    assert len(world.fault.seen) == seen


async def test_a_tag_recorded_for_everyone_serves_clients_that_accept_it(world: World) -> None:
    warmed = world.mirror(300)
    stored = await get(warmed, accept=(DOCKER_MANIFEST,))
    manifest = await world.manifests.get(Digest.parse(stored.digest))
    assert manifest is not None
    await warmed.remember_for_everyone(REPO, "2.0", manifest)
    fresh = world.mirror(300)
    answer = await get(fresh, "2.0", accept=(DOCKER_MANIFEST,))
    assert (answer.source, answer.digest) == ("cache", stored.digest)
    assert world.upstream_requests("GET") == 1
    # A client that takes only indexes is not given a single manifest from it.
    with pytest.raises(ManifestUnknown):
        await get(fresh, "2.0", accept=(OCI_INDEX,))
    assert world.upstream_requests("GET") == 2


async def test_a_tag_recorded_for_everyone_later_wins_over_an_older_pull(world: World) -> None:
    """An import (or warm) after clients pulled the tag moves it for them too."""
    world.fault.add_manifest("2.0", SECOND)
    puller = world.mirror(300)
    one = await get(puller, "1.0", accept=(DOCKER_MANIFEST,))
    two = await get(puller, "2.0", accept=(DOCKER_MANIFEST,))
    manifest = await world.manifests.get(Digest.parse(two.digest))
    assert manifest is not None
    assert one.digest != two.digest
    await puller.remember_for_everyone(REPO, "1.0", manifest)  # "1.0" now names 2.0's
    answer = await get(world.mirror(300, offline=True), "1.0", accept=(DOCKER_MANIFEST,))
    assert (answer.source, answer.digest) == ("cache", two.digest)

"""What the Redis tag index does beyond the contract: tag list pages are a cache
with a size bound (the least recently stored go), and a Redis that stops answering
costs lookups, never an error."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis

from pullthrough.cache.index import Listing, TagEntry
from pullthrough.cache.redis_client import MAX_CONNECTIONS
from pullthrough.cache.redis_tags import SCAN_BATCH, RedisTags
from pullthrough.cache.space import WriteFailures
from tests.support.processes import free_port
from tests.support.redis import RedisServer

ENTRY = TagEntry("sha256:" + "a" * 64, "application/vnd.oci.image.index.v1+json", 1.0)


async def test_tag_list_pages_past_the_bound_drop_the_least_recently_stored(
    redis_server: RedisServer,
) -> None:
    tags = RedisTags(redis_server.url, prefix=redis_server.prefix(), listings_limit=3500)
    try:
        page = Listing(b"x" * 1000, None, 1.0)
        for n in range(3):
            await tags.put_listing("docker.io", f"r{n}", "", page)
        assert all([await tags.get_listing("docker.io", f"r{n}", "") for n in range(3)])
        await tags.put_listing("docker.io", "r0", "", page)  # stored again: newest now
        await tags.put_listing("docker.io", "r3", "", page)  # over 4000 bytes: one must go
        assert await tags.get_listing("docker.io", "r1", "") is None
        for n in (0, 2, 3):
            assert await tags.get_listing("docker.io", f"r{n}", "") == page
        await tags.put("docker.io", "r1", "1", "*", ENTRY)  # tag entries are not bounded
        for n in range(8):
            await tags.put_listing("docker.io", f"more{n}", "", page)
        assert await tags.get("docker.io", "r1", "1", "*") == ENTRY
        # Small pages under long keys (?last= a long tag): the keys count too.
        tiny = Listing(b"{}", None, 1.0)
        for n in range(50):
            await tags.put_listing("docker.io", "r", f"last={'t' * 120}{n}&n=1", tiny)
        kept = [
            await tags.get_listing("docker.io", "r", f"last={'t' * 120}{n}&n=1") for n in range(50)
        ]
        assert 0 < sum(page is not None for page in kept) < 10
    finally:
        await tags.aclose()


async def test_a_redis_that_does_not_answer_costs_lookups_not_errors(tmp_path: Path) -> None:
    failed: list[str] = []
    with RedisServer(tmp_path / "redis") as server:
        tags = RedisTags(server.url, failures=WriteFailures(failed.append))
        await tags.put("docker.io", "library/alpine", "3.19", "*", ENTRY)
        assert await tags.get("docker.io", "library/alpine", "3.19", "*") == ENTRY
    try:  # the server is gone now
        assert await tags.get("docker.io", "library/alpine", "3.19", "*") is None
        assert await tags.get_listing("docker.io", "library/alpine", "") is None
        await tags.put("docker.io", "library/alpine", "3.19", "*", ENTRY)
        await tags.put_listing("docker.io", "library/alpine", "", Listing(b"{}", None, 1.0))
        assert len(failed) == 2
    finally:
        await tags.aclose()
    never = RedisTags(f"redis://127.0.0.1:{free_port()}/0")
    try:
        assert await never.get("docker.io", "library/alpine", "3.19", "*") is None
    finally:
        await never.aclose()


async def test_walking_the_index_reads_every_entry_in_batches(redis_server: RedisServer) -> None:
    tags = RedisTags(redis_server.url, prefix=redis_server.prefix())
    try:
        count = 2 * SCAN_BATCH + 7
        for n in range(count):
            await tags.put("docker.io", f"team/app{n}", "1", "*", ENTRY)
        await tags.put("docker.io", "team/app0", "1", "x", ENTRY)  # two Accept keys, one tag
        walked = sorted(tags.tags())
        assert len(walked) == count + 1
        assert walked[0] == ("docker.io", "team/app0", "1", "*", ENTRY)
        assert walked[1] == ("docker.io", "team/app0", "1", "x", ENTRY)
    finally:
        await tags.aclose()


def test_two_nodes_pinning_at_once_both_keep_their_pin(redis_server: RedisServer) -> None:
    prefix = redis_server.prefix()
    one, two = (RedisTags(redis_server.url, prefix=prefix) for _ in range(2))
    try:
        one.set_pins({"docker.io/library/base:1"})
        # Both read the pins, then both write what they read plus their own.
        seen_one, seen_two = one.pins(), two.pins()
        one.set_pins(seen_one | {"docker.io/library/a:1"})
        two.set_pins(seen_two | {"docker.io/library/b:1"})
        assert one.pins() == {
            "docker.io/library/base:1",
            "docker.io/library/a:1",
            "docker.io/library/b:1",
        }
        seen_one, seen_two = one.pins(), two.pins()
        one.set_pins(seen_one - {"docker.io/library/a:1"})  # unpin a
        two.set_pins(seen_two | {"docker.io/library/c:1"})  # meanwhile pin c
        assert two.pins() == {
            "docker.io/library/base:1",
            "docker.io/library/b:1",
            "docker.io/library/c:1",
        }
    finally:
        one.close()
        two.close()


async def test_many_lookups_at_once_share_a_bounded_pool_of_connections(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        tags = RedisTags(server.url)
        admin = redis.Redis.from_url(server.url)
        try:
            await tags.put("docker.io", "library/alpine", "3.19", "*", ENTRY)
            found = await asyncio.gather(
                *(tags.get("docker.io", "library/alpine", "3.19", "*") for _ in range(500))
            )
            assert found == [ENTRY] * 500
            clients = admin.client_list()
            assert len(clients) <= MAX_CONNECTIONS + 1  # the pool's, and admin's own
        finally:
            admin.close()
            await tags.aclose()

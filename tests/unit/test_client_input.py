"""What clients send cannot grow what the mirror keeps: Accept keys, the in-memory
tag cache, the tag index, the log."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import pytest

from pullthrough.cache.index import Listing, TagEntry, TagIndex
from pullthrough.cache.mediatypes import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX
from pullthrough.proxy.logs import RateLimit
from pullthrough.proxy.mirror import (
    KNOWN_TYPES,
    RecentTags,
    accept_key,
    accepted_types,
    accepts,
)


def test_the_accept_key_is_the_set_of_known_types() -> None:
    a = accept_key([f"{DOCKER_LIST}, {OCI_INDEX};q=0.9", "x-junk/1", "text/html"])
    b = accept_key([OCI_INDEX.upper(), f"{DOCKER_LIST} ; q=0.5", OCI_INDEX, "x-junk/2"])
    assert a == b == f"{DOCKER_LIST},{OCI_INDEX}"
    assert accept_key(["x-junk/1"]) == accept_key([]) == ""
    assert accepted_types(["*/*"]) == accepted_types(["application/*"]) == ("*/*",)


def test_the_accept_key_space_is_small_and_fixed() -> None:
    junk = [f"application/x-{i}" for i in range(5000)]
    keys = {accept_key([DOCKER_LIST, j]) for j in junk}
    assert keys == {DOCKER_LIST}
    # Every subset of the known types, with or without a wildcard.
    assert len(KNOWN_TYPES) == 6


def test_accepts() -> None:
    assert accepts([DOCKER_MANIFEST], DOCKER_MANIFEST)
    assert not accepts([DOCKER_MANIFEST], OCI_INDEX)
    assert accepts(["*/*"], OCI_INDEX)
    assert accepts(["x-junk/1"], OCI_INDEX)  # no known type: a client of old


def entry(digest: str = "sha256:" + "a" * 64) -> TagEntry:
    return TagEntry(digest, DOCKER_LIST, time.time())


def test_recent_tags_are_bounded_and_expire() -> None:
    recent = RecentTags(capacity=100)
    for i in range(1000):
        recent.set(f"repo\0{i}\0", entry(), ttl=60)
    assert len(recent) == 100
    assert recent.get("repo\x000\x00") is None
    assert recent.get("repo\x00999\x00") is not None
    recent.set("gone", entry(), ttl=0)
    assert recent.get("gone") is None


async def test_listings_are_evicted_but_tags_and_pins_never(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pullthrough.cache.index.LISTINGS_SIZE_LIMIT", 1 << 20)
    index = TagIndex(tmp_path / "index")
    try:
        index.set_pins({"docker.io/library/alpine:3.19"})
        index.put_sync("u", "library/alpine", "3.19", "*", entry())
        before = index.volume()
        page = Listing(b"x" * 40_000, None, time.time())
        for i in range(200):  # 8 MB of pages asked for with ?last=<anything>
            await index.put_listing("u", "library/alpine", f"n=1&last=t{i}", page)
        assert index.volume() - before < 3 << 20
        assert await index.get_listing("u", "library/alpine", "n=1&last=t199") == page
        assert index.pins() == {"docker.io/library/alpine:3.19"}
        assert index.get_sync("u", "library/alpine", "3.19", "*") is not None
    finally:
        index.close()


def test_repeated_messages_are_rate_limited_with_a_summary() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    limit = RateLimit(handler, burst=3, interval=0.2)
    handler.addFilter(limit)
    logger = logging.getLogger("test.ratelimit")
    logger.propagate = False
    logger.addHandler(handler)
    access = logging.getLogger("pullthrough.access")
    access.propagate = False
    access.setLevel(logging.INFO)
    access.addHandler(handler)
    try:
        for i in range(1000):
            logger.warning("cannot accept: %s", i)
            access.info("GET /v2/ %d", i)
        logger.warning("something else")
        time.sleep(0.25)
        logger.warning("cannot accept: %s", "again")
    finally:
        logger.removeHandler(handler)
        access.removeHandler(handler)
        access.setLevel(logging.NOTSET)
        access.propagate = True
        logger.propagate = True
    lines = stream.getvalue().splitlines()
    assert [line for line in lines if "cannot accept" in line and "suppressed" not in line] == [
        "WARNING test.ratelimit cannot accept: 0",
        "WARNING test.ratelimit cannot accept: 1",
        "WARNING test.ratelimit cannot accept: 2",
        "WARNING test.ratelimit cannot accept: again",
    ]
    assert (
        "WARNING test.ratelimit suppressed 997 similar messages in 0.2 s: 'cannot accept: %s'"
        in (lines)
    )
    assert sum("GET /v2/" in line for line in lines) == 1000  # request lines are exempt
    assert "WARNING test.ratelimit something else" in lines


def test_distinct_messages_have_a_total_budget() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    limit = RateLimit(handler, burst=3, total=50, interval=60)
    handler.addFilter(limit)
    logger = logging.getLogger("test.ratelimit.total")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(1000):
            logger.warning(f"unique message {i}")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    assert len(stream.getvalue().splitlines()) == 50
    limit.interval = 0
    logger.addHandler(handler)
    logger.warning("one more")
    logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    # Per message kind up to 10 summaries, the rest summed into one line.
    assert len(lines) == 50 + 10 + 1 + 1
    assert "suppressed 940 similar messages in 0 s: '940 other messages'" in lines

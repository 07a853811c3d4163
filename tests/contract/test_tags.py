"""Tag index contract: entries per (upstream, repository, tag, Accept), listings, pins."""

from __future__ import annotations

from pullthrough.cache.index import Listing, TagEntry
from tests.contract.conftest import Backend

A = TagEntry("sha256:" + "a" * 64, "application/vnd.oci.image.index.v1+json", 1000.0)
B = TagEntry("sha256:" + "b" * 64, "application/vnd.oci.image.manifest.v1+json", 2000.0)


async def test_entries_are_kept_per_upstream_repository_tag_and_accept(backend: Backend) -> None:
    tags = backend.tags()
    assert await tags.get("docker.io", "library/alpine", "3.19", "*") is None
    await tags.put("docker.io", "library/alpine", "3.19", "*", A)
    await tags.put("docker.io", "library/alpine", "3.19", "x", B)
    assert await tags.get("docker.io", "library/alpine", "3.19", "*") == A
    assert await tags.get("docker.io", "library/alpine", "3.19", "x") == B
    assert await tags.get("ghcr.io", "library/alpine", "3.19", "*") is None
    assert await tags.get("docker.io", "library/alpine", "3.20", "*") is None
    await tags.put("docker.io", "library/alpine", "3.19", "*", B)  # a tag moves
    assert await backend.tags().get("docker.io", "library/alpine", "3.19", "*") == B
    assert sorted(backend.tags().tags()) == [
        ("docker.io", "library/alpine", "3.19", "*", B),
        ("docker.io", "library/alpine", "3.19", "x", B),
    ]


async def test_listings_are_kept_per_query(backend: Backend) -> None:
    tags = backend.tags()
    page = Listing(b'{"tags":["a"]}', '</v2/x/tags/list?n=1&last=a>; rel="next"', 5.0)
    await tags.put_listing("docker.io", "x", "n=1", page)
    assert await tags.get_listing("docker.io", "x", "n=1") == page
    assert await tags.get_listing("docker.io", "x", "") is None
    assert await backend.tags().get_listing("docker.io", "x", "n=1") == page
    assert list(tags.tags()) == []  # listings are not tag entries


def test_pins_are_a_set(backend: Backend) -> None:
    tags = backend.tags()
    assert tags.pins() == set()
    tags.set_pins({"docker.io/library/alpine:3.19", "ghcr.io/o/app@sha256:" + "c" * 64})
    assert backend.tags().pins() == {
        "docker.io/library/alpine:3.19",
        "ghcr.io/o/app@sha256:" + "c" * 64,
    }
    tags.set_pins(set())
    assert backend.tags().pins() == set()


async def test_rekey_moves_entries_from_a_url_to_a_name_and_the_name_wins(
    backend: Backend,
) -> None:
    tags = backend.tags()
    url = "https://registry-1.docker.io"
    await tags.put(url, "library/alpine", "3.19", "*", A)
    await tags.put(url, "library/hello", "latest", "*", A)
    await tags.put("docker.io", "library/hello", "latest", "*", B)  # newer, by name
    await tags.put(url + "x", "team/app", "1", "*", A)  # another upstream: untouched
    await tags.put_listing(url, "library/alpine", "", Listing(b"{}", None, 1.0))
    assert tags.rekey({url: "docker.io"}) == 3
    assert await tags.get("docker.io", "library/alpine", "3.19", "*") == A
    assert await tags.get("docker.io", "library/hello", "latest", "*") == B
    assert await tags.get(url, "library/alpine", "3.19", "*") is None
    assert await tags.get(url + "x", "team/app", "1", "*") == A
    assert await tags.get_listing("docker.io", "library/alpine", "") is not None
    assert tags.rekey({url: "docker.io"}) == 0

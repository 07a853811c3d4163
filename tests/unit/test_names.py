from __future__ import annotations

import pytest

from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import InvalidDigest, UnsupportedDigest
from pullthrough.proxy.errors import NameInvalid, TagInvalid
from pullthrough.proxy.names import Reference, repository

HEX = "a" * 64


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("alpine", "library/alpine"),
        ("library/alpine", "library/alpine"),
        ("bitnami/redis", "bitnami/redis"),
        ("a/b/c-d__e.f", "a/b/c-d__e.f"),
    ],
)
def test_valid_names(raw: str, expected: str) -> None:
    assert repository(raw, docker_hub_rules=True) == expected


@pytest.mark.parametrize(
    "raw",
    ["", "..", "../etc", "a/../b", "A", "a//b", "/a", "a/", "a b", "a%2fb", "-a", "x" * 256],
)
def test_invalid_names(raw: str) -> None:
    with pytest.raises(NameInvalid):
        repository(raw, docker_hub_rules=True)


def test_references() -> None:
    assert Reference.parse("3.19").tag == "3.19"
    assert Reference.parse(f"sha256:{HEX}").digest == Digest("sha256", HEX)
    for bad in ("..", ".hidden", "-x", "a" * 129, "a/b"):
        with pytest.raises(TagInvalid):
            Reference.parse(bad)


@pytest.mark.parametrize(
    "raw",
    [f"sha256:{HEX[:-1]}", f"sha256:{HEX.upper()}", "sha256:../../etc", f"sha256:{HEX}/x", ":"],
)
def test_invalid_digests(raw: str) -> None:
    with pytest.raises(InvalidDigest):
        Digest.parse(raw)


def test_unverifiable_algorithm_is_refused() -> None:
    with pytest.raises(UnsupportedDigest):
        Digest.parse("md5:" + "a" * 32)

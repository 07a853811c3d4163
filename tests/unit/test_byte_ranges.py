"""Byte ranges of a blob streamed from the upstream: the range a client gets."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from pullthrough.proxy.errors import RangeInvalid
from pullthrough.proxy.routes import _byte_range

SIZE = 100


def byte_range(value: str, size: int = SIZE) -> tuple[int, int]:
    return _byte_range(make_mocked_request("GET", "/", headers={"Range": value}), size)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes=0-9", (0, 10)),
        ("bytes=0-0", (0, 1)),
        ("bytes=10-", (10, SIZE)),
        ("bytes=99-", (99, SIZE)),
        ("bytes=90-1000", (90, SIZE)),  # past the end: up to the end
        ("bytes=-5", (SIZE - 5, SIZE)),  # the last five
        ("bytes=-1000", (0, SIZE)),  # a suffix longer than the blob: all of it
    ],
)
def test_satisfiable_ranges(value: str, expected: tuple[int, int]) -> None:
    assert byte_range(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "bytes=100-",  # starts at the end
        "bytes=500-600",
        "bytes=5-3",  # backwards
        "bytes=0-1,3-4",  # several ranges: not served
        "items=1-2",
        "bytes=x-",
    ],
)
def test_unsatisfiable_or_malformed_ranges_are_416_with_the_size(value: str) -> None:
    with pytest.raises(RangeInvalid) as raised:
        byte_range(value)
    assert raised.value.status == 416
    assert raised.value.headers == {"Content-Range": f"bytes */{SIZE}"}

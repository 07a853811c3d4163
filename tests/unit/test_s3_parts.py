"""Multipart part sizes: every blob fits S3's 10,000 parts."""

from __future__ import annotations

import pytest

from pullthrough.cache.s3 import MAX_PARTS, PART_BYTES, part_size

GIB = 1 << 30


@pytest.mark.parametrize("size", [None, 0, 1, PART_BYTES, PART_BYTES * MAX_PARTS])
def test_ordinary_blobs_go_up_in_8_mib_parts(size: int | None) -> None:
    assert part_size(size) == PART_BYTES


@pytest.mark.parametrize("size", [PART_BYTES * MAX_PARTS + 1, 100 * GIB, 4096 * GIB])
def test_huge_blobs_get_parts_large_enough_for_10000(size: int) -> None:
    part = part_size(size)
    assert part % (1 << 20) == 0
    assert -(-size // part) <= MAX_PARTS

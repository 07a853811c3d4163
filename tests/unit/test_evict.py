"""Which objects an eviction pass removes: least recently used first, down to 90%
of the cap; never a pinned digest nor anything used within the grace period;
everything past the age limit; enough to free what a full disk needs."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from pullthrough.cache.digests import Digest
from pullthrough.cache.evict import GRACE_SECONDS, LOW_WATER, Eviction, evict
from pullthrough.cache.layout import Layout

NOW = 1_000_000_000.0
HOUR = 3600.0


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path)
    layout.create()
    return layout


def put(layout: Layout, name: str, *, size: int, age: float, kind: str = "blob") -> Digest:
    """A committed blob (or manifest) of ``size`` bytes last used ``age`` seconds before NOW."""
    data = name.encode().ljust(size, b".")
    digest = Digest.of(data)
    path = layout.blob(digest) if kind == "blob" else layout.manifest(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (NOW - age, NOW - age))
    return digest


def run(
    layout: Layout,
    *,
    max_size: int | None = None,
    max_age: float | None = None,
    protected: frozenset[Digest] = frozenset(),
    dry_run: bool = False,
    free_bytes: int = 0,
) -> Eviction:
    result = evict(
        [layout],
        max_size=max_size,
        max_age_seconds=max_age,
        protected=set(protected),
        dry_run=dry_run,
        now=NOW,
        free_bytes=free_bytes,
    )
    assert result is not None
    return result


def removed(result: Eviction) -> list[Digest]:
    return [entry.digest for entry in result.removed]


def test_least_recently_used_go_first_until_under_the_low_water_mark(layout: Layout) -> None:
    # Ten objects of 100 bytes, object i last used i hours ago.
    by_age = [put(layout, f"o{i}", size=100, age=i * HOUR) for i in range(10)]
    result = run(layout, max_size=950)  # low water: 855 bytes
    assert removed(result) == [by_age[9], by_age[8]]
    assert (result.total_before, result.total_after, result.freed) == (1000, 800, 200)
    assert int(950 * LOW_WATER) == 855
    for digest in by_age[:8]:
        assert layout.blob(digest).exists()
    for digest in by_age[8:]:
        assert not layout.blob(digest).exists()


def test_a_cache_at_the_low_water_mark_is_left_alone(layout: Layout) -> None:
    for i in range(9):
        put(layout, f"o{i}", size=100, age=i * HOUR)
    assert removed(run(layout, max_size=1000)) == []  # 900 bytes is not above 90%


def test_under_the_cap_but_over_low_water_evicts_down_to_it(layout: Layout) -> None:
    by_age = [put(layout, f"o{i}", size=100, age=i * HOUR) for i in range(10)]
    # 1000 bytes under a 1000-byte cap: at the cap, above low water (900).
    assert removed(run(layout, max_size=1000)) == [by_age[9]]


def test_pinned_digests_are_never_removed_even_when_oldest(layout: Layout) -> None:
    by_age = [put(layout, f"o{i}", size=100, age=i * HOUR) for i in range(10)]
    pinned = frozenset({by_age[9], by_age[8]})
    result = run(layout, max_size=500, protected=pinned)  # low water: 450
    assert removed(result) == [by_age[7], by_age[6], by_age[5], by_age[4], by_age[3], by_age[2]]
    assert result.total_after == 400
    assert all(layout.blob(d).exists() for d in pinned)


def test_nothing_used_within_the_grace_period_is_removed(layout: Layout) -> None:
    fresh = [put(layout, f"new{i}", size=100, age=GRACE_SECONDS - 1) for i in range(5)]
    old = put(layout, "old", size=100, age=GRACE_SECONDS)
    result = run(layout, max_size=100)  # far over the cap
    assert removed(result) == [old]
    assert result.total_after == 500
    assert all(layout.blob(d).exists() for d in fresh)


def test_max_age_removes_the_old_even_under_the_size_cap(layout: Layout) -> None:
    young = put(layout, "young", size=100, age=23 * HOUR)
    old = put(layout, "old", size=100, age=25 * HOUR)
    older = put(layout, "older", size=100, age=48 * HOUR)
    result = run(layout, max_size=10_000, max_age=24 * HOUR)
    assert removed(result) == [older, old]
    assert layout.blob(young).exists()


def test_max_age_alone_and_no_limits_at_all(layout: Layout) -> None:
    put(layout, "a", size=10, age=2 * HOUR)
    assert removed(run(layout)) == []  # no cap, no age limit: nothing is evicted
    assert len(run(layout, max_age=HOUR).removed) == 1


def test_a_pinned_digest_survives_the_age_limit(layout: Layout) -> None:
    pinned = put(layout, "pinned", size=10, age=100 * HOUR)
    assert removed(run(layout, max_age=HOUR, protected=frozenset({pinned}))) == []


def test_manifests_are_evicted_with_blobs_by_last_use(layout: Layout) -> None:
    blob = put(layout, "blob", size=100, age=1 * HOUR)
    manifest = put(layout, "manifest", size=100, age=2 * HOUR, kind="manifest")
    result = run(layout, max_size=150)  # low water 135: one must go, the older
    assert removed(result) == [manifest]
    assert [entry.kind for entry in result.removed] == ["manifest"]
    assert layout.blob(blob).exists()


def test_free_bytes_frees_at_least_that_much_under_the_cap(layout: Layout) -> None:
    by_age = [put(layout, f"o{i}", size=100, age=i * HOUR) for i in range(5)]
    result = run(layout, max_size=10_000, free_bytes=150)
    assert removed(result) == [by_age[4], by_age[3]]
    assert result.freed == 200


def test_a_dry_run_reports_the_same_choice_and_removes_nothing(layout: Layout) -> None:
    by_age = [put(layout, f"o{i}", size=100, age=i * HOUR) for i in range(10)]
    dry = run(layout, max_size=950, dry_run=True)
    assert removed(dry) == [by_age[9], by_age[8]]
    assert all(layout.blob(d).exists() for d in by_age)
    assert removed(run(layout, max_size=950)) == removed(dry)


def test_a_second_evictor_steps_aside(layout: Layout) -> None:
    put(layout, "a", size=100, age=HOUR)
    fd = os.open(layout.root / "evict.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = evict([layout], max_size=1, max_age_seconds=None, protected=set(), now=NOW)
        assert result is None
    finally:
        os.close(fd)

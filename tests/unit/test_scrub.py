"""Verifying what is on disk: manifests on read, blobs by the scrub and by verify."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from pullthrough.cache.digests import Digest
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore, StoredManifest
from pullthrough.cache.quarantine import quarantine
from pullthrough.cache.scrub import Scrubber, Throttle, verify_all
from pullthrough.proxy.config import ConfigError, load_settings

MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "cache")
    layout.create()
    return layout


def put_blob(layout: Layout, data: bytes) -> Digest:
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    path = layout.blob(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def put_manifest(layout: Layout, data: bytes = MANIFEST) -> Digest:
    digest = Digest.of(data)
    ManifestStore(layout).write(StoredManifest(digest, MEDIA_TYPE, data))
    return digest


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x04
    path.write_bytes(bytes(data))


def test_a_corrupt_manifest_reads_as_absent_is_quarantined_logged_and_counted(
    layout: Layout, caplog: pytest.LogCaptureFixture
) -> None:
    digest = put_manifest(layout)
    corrupt = []
    store = ManifestStore(layout, on_corrupt=lambda: corrupt.append(1))
    assert store.read(digest) == StoredManifest(digest, MEDIA_TYPE, MANIFEST)
    flip(layout.manifest(digest), len(MEDIA_TYPE) + 5)
    with caplog.at_level(logging.WARNING):
        assert store.read(digest) is None
    assert not layout.manifest(digest).exists()
    assert layout.quarantined("manifest", digest).exists()
    assert corrupt == [1]
    assert f"corrupt manifest {digest}" in caplog.text
    assert "Traceback" not in caplog.text
    assert store.read(digest) is None  # simply not cached now
    assert corrupt == [1]


@pytest.mark.parametrize(
    "record",
    [
        MANIFEST,  # the newline went: no media type line
        b"application/vnd.oci.image.manifest.v1+j\x00on\n" + MANIFEST,
        b"application\xaevnd.oci.image.manifest.v1+json\n" + MANIFEST,
    ],
)
def test_a_damaged_media_type_line_is_corruption_too(layout: Layout, record: bytes) -> None:
    digest = put_manifest(layout)
    layout.manifest(digest).write_bytes(record)
    assert ManifestStore(layout).read(digest) is None
    assert layout.quarantined("manifest", digest).read_bytes() == record


def test_quarantine_moves_only_the_file_that_was_hashed(layout: Layout) -> None:
    digest = put_blob(layout, b"rotten")
    path = layout.blob(digest)
    hashed = path.stat().st_ino
    # Meanwhile it was evicted and downloaded again: a new file at the same path.
    fresh = layout.tmp / "fresh"
    fresh.write_bytes(b"good")
    fresh.replace(path)
    assert quarantine(layout, "blob", digest, path, hashed) is None
    assert path.read_bytes() == b"good"
    assert not layout.quarantined("blob", digest).exists()

    moved = quarantine(layout, "blob", digest, path, path.stat().st_ino)
    assert moved == layout.quarantined("blob", digest)
    assert moved.read_bytes() == b"good"
    assert not path.exists()


def test_a_reader_with_the_file_open_keeps_reading_after_quarantine(layout: Layout) -> None:
    digest = put_blob(layout, b"x" * 4096)
    path = layout.blob(digest)
    with path.open("rb") as being_served:
        flip(path, 10)  # rewritten in place, same inode
        verify_all([layout])
        assert not path.exists()
        assert len(being_served.read()) == 4096


def test_verify_reports_every_corrupt_object_and_keeps_the_rest(layout: Layout) -> None:
    good = put_blob(layout, os.urandom(3 * 1024 * 1024))
    bad = put_blob(layout, os.urandom(100_000))
    manifest = put_manifest(layout)
    flip(layout.blob(bad), 99_999)
    flip(layout.manifest(manifest), len(MEDIA_TYPE) + 3)
    seen: list[int] = []
    report = verify_all([layout], progress=seen.append)
    assert (report.blobs, report.manifests) == (2, 1)
    assert sorted((c.kind, c.digest) for c in report.corrupt) == [
        ("blob", bad),
        ("manifest", manifest),
    ]
    blob = next(c for c in report.corrupt if c.kind == "blob")
    assert blob.moved_to == layout.quarantined("blob", bad)
    assert layout.blob(good).exists()
    assert not layout.blob(bad).exists()
    assert sum(seen) == report.bytes >= 3 * 1024 * 1024 + 100_000
    assert verify_all([layout]).corrupt == []


def scrubber(layout: Layout, counts: dict[str, int], recheck: float = 3600.0) -> Scrubber:
    def add(key: str, n: int = 1) -> None:
        counts[key] = counts.get(key, 0) + n

    return Scrubber(
        [layout],
        layout.scrub_lock,
        rate=0,
        recheck_seconds=recheck,
        on_bytes=lambda n: add("bytes", n),
        on_corrupt=add,
    )


def test_the_scrub_skips_what_it_verified_recently_and_not_a_new_copy(layout: Layout) -> None:
    data = os.urandom(200_000)
    digest = put_blob(layout, data)
    manifest = put_manifest(layout)
    counts: dict[str, int] = {}
    scrub = scrubber(layout, counts)
    scrub.scrub_once(Throttle(0))
    assert counts["bytes"] == len(data) + layout.manifest(manifest).stat().st_size
    counts.clear()
    scrub.scrub_once(Throttle(0))
    assert counts == {}  # all verified within the hour

    # Evicted and downloaded again (a new inode), then rotted: due at once.
    replacement = layout.tmp / "again"
    replacement.write_bytes(data)
    replacement.replace(layout.blob(digest))
    flip(layout.blob(digest), 7)
    scrub.scrub_once(Throttle(0))
    assert counts == {"bytes": len(data), "blob": 1}
    assert not layout.blob(digest).exists()


def test_with_no_recheck_interval_every_pass_reads_everything(layout: Layout) -> None:
    data = os.urandom(50_000)
    put_blob(layout, data)
    counts: dict[str, int] = {}
    scrub = scrubber(layout, counts, recheck=0.0)
    scrub.scrub_once(Throttle(0))
    scrub.scrub_once(Throttle(0))
    assert counts == {"bytes": 2 * len(data)}


def test_the_scrub_finds_a_corrupt_manifest_nobody_asked_for(
    layout: Layout, caplog: pytest.LogCaptureFixture
) -> None:
    digest = put_manifest(layout)
    flip(layout.manifest(digest), len(MEDIA_TYPE) + 8)
    counts: dict[str, int] = {}
    with caplog.at_level(logging.WARNING):
        scrubber(layout, counts).scrub_once(Throttle(0))
    assert counts["manifest"] == 1
    assert layout.quarantined("manifest", digest).exists()
    assert caplog.text.count(f"corrupt manifest {digest}") == 1


@pytest.mark.parametrize(
    ("raw", "rate"),
    [("20MiB", 20 * 1024 * 1024), ("20MiB/s", 20 * 1024 * 1024), ("0", 0), ("1000", 1000)],
)
def test_scrub_rate_setting(raw: str, rate: int) -> None:
    assert load_settings(environ={"PULLTHROUGH_SCRUB_RATE": raw}).scrub_rate == rate


@pytest.mark.parametrize("raw", ["-1", "fast", "20 furlongs"])
def test_a_bad_scrub_rate_stops_start_up(raw: str) -> None:
    with pytest.raises(ConfigError, match="scrub_rate"):
        load_settings(environ={"PULLTHROUGH_SCRUB_RATE": raw})


def in_page_cache(path: Path) -> bool:
    """Whether the first page of ``path`` is in the page cache (a read that may
    not wait for the disk succeeds)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_the_scrub_leaves_a_hot_blob_in_the_page_cache_and_drops_a_cold_one(
    layout: Layout,
) -> None:
    hot, cold = put_blob(layout, os.urandom(1 << 20)), put_blob(layout, os.urandom(1 << 20))
    for digest in (hot, cold):
        path = layout.blob(digest)
        with path.open("rb+") as f:
            os.fsync(f.fileno())  # dirty pages cannot be dropped
        path.read_bytes()  # in the page cache, as a served blob is
    hour_ago = layout.blob(cold).stat().st_mtime - 7200
    os.utime(layout.blob(cold), (hour_ago, hour_ago))
    assert in_page_cache(layout.blob(hot))
    assert in_page_cache(layout.blob(cold))
    counts: dict[str, int] = {}
    scrubber(layout, counts).scrub_once(Throttle(0))
    assert counts["bytes"] == 2 << 20
    assert in_page_cache(layout.blob(hot))
    assert not in_page_cache(layout.blob(cold))

"""OCI image layout archives: round trips, platform filters, and every way to tamper."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from cache.archive import ArchiveError, ExportImage, export_archive, import_archive
from cache.digests import Digest
from cache.layout import Layout
from cache.manifests import ManifestStore, StoredManifest
from tests.support.images import Image, seed_images

ALPINE = "library/alpine:3.19"
OCIAPP = "library/ociapp:v1"


def stored(image: Image) -> StoredManifest:
    top = image.top
    return StoredManifest(Digest.parse(top.digest), top.media_type, top.data)


def fill(layout: Layout, image: Image) -> None:
    layout.create()
    for blob in image.blobs:
        path = layout.blob(Digest.parse(blob.digest))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob.data)
    store = ManifestStore(layout)
    for m in image.manifests:
        store.write(StoredManifest(Digest.parse(m.digest), m.media_type, m.data))


def files(layout: Layout) -> dict[str, bytes]:
    return {
        str(p.relative_to(layout.root)): p.read_bytes()
        for folder in ("blobs", "manifests")
        for p in (layout.root / folder).rglob("*")
        if p.is_file()
    }


def assert_untouched(layout: Layout) -> None:
    assert files(layout) == {}
    assert list(layout.tmp.iterdir()) == []


@pytest.fixture
def source(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "source")
    images = seed_images()
    fill(layout, images[ALPINE])
    fill(layout, images[OCIAPP])
    return layout


@pytest.fixture
def bundle(source: Layout, tmp_path: Path) -> Path:
    images = seed_images()
    out = tmp_path / "bundle.tar"
    export_archive(
        out,
        [
            ExportImage("docker.io/library/alpine:3.19", stored(images[ALPINE])),
            ExportImage("docker.io/library/ociapp:v1", stored(images[OCIAPP])),
        ],
        source,
    )
    return out


def test_round_trip_gives_the_same_files(source: Layout, bundle: Path, tmp_path: Path) -> None:
    target = Layout(tmp_path / "target")
    summary = import_archive(bundle, target)
    assert files(target) == files(source)
    assert [(i.ref_name, str(i.digest)) for i in summary.images] == [
        ("docker.io/library/alpine:3.19", seed_images()[ALPINE].digest),
        ("docker.io/library/ociapp:v1", seed_images()[OCIAPP].digest),
    ]
    assert list(target.tmp.iterdir()) == []
    again = import_archive(bundle, target)  # a second import adds nothing
    assert (again.blobs_added, again.manifests_added) == (0, 0)
    assert again.blobs_present == summary.blobs_added


def test_platform_filter_exports_only_that_platform(source: Layout, tmp_path: Path) -> None:
    image = seed_images()[ALPINE]
    out = tmp_path / "amd64.tar"
    export_archive(
        out,
        [ExportImage("alpine:3.19", stored(image), frozenset({"linux/amd64"}))],
        source,
    )
    with tarfile.open(out) as tar:
        names = {m.name.rsplit("/", 1)[-1] for m in tar if m.name.startswith("blobs/")}
    amd64 = image.for_platform("linux/amd64")
    arm64 = image.for_platform("linux/arm64")
    wanted = {image.digest, amd64.digest, *(b.digest for b in image.blobs_of(amd64))}
    assert names == {d.removeprefix("sha256:") for d in wanted}
    only_arm = {b.digest for b in image.blobs_of(arm64)} - {b.digest for b in image.blobs_of(amd64)}
    assert only_arm  # the platforms do differ
    assert not names & {d.removeprefix("sha256:") for d in only_arm}


def test_export_of_an_incomplete_image_fails_before_writing(source: Layout, tmp_path: Path) -> None:
    image = seed_images()[ALPINE]
    source.blob(Digest.parse(image.blobs_of(image.for_platform("linux/amd64"))[-1].digest)).unlink()
    out = tmp_path / "never.tar"
    with pytest.raises(ArchiveError, match="pullthrough warm"):
        export_archive(out, [ExportImage("alpine:3.19", stored(image))], source)
    assert not out.exists()
    assert not out.with_name("never.tar.partial").exists()


Tamper = Callable[[Path, Path], None]


def rewrite(
    src: Path,
    dst: Path,
    change: Callable[[tarfile.TarInfo, bytes], list[tuple[tarfile.TarInfo, bytes]]],
) -> None:
    with tarfile.open(src) as old, tarfile.open(dst, "w") as new:
        for member in old:
            f = old.extractfile(member)
            data = f.read() if f else b""
            for info, body in change(member, data):
                new.addfile(info, io.BytesIO(body) if info.isfile() else None)


def flip_a_layer_byte(src: Path, dst: Path) -> None:
    def change(m: tarfile.TarInfo, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
        if m.size > 1000 and m.name.startswith("blobs/"):
            data = data[:500] + bytes([data[500] ^ 1]) + data[501:]
        return [(m, data)]

    rewrite(src, dst, change)


def rename_a_blob(src: Path, dst: Path) -> None:
    def change(m: tarfile.TarInfo, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
        if m.size > 1000 and m.name.startswith("blobs/"):
            m.name = "blobs/sha256/" + "0" * 64
        return [(m, data)]

    rewrite(src, dst, change)


def truncate(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) * 2 // 3])


def add_member(name: str, kind: bytes = tarfile.REGTYPE) -> Tamper:
    def tamper(src: Path, dst: Path) -> None:
        def change(m: tarfile.TarInfo, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
            if m.name != "oci-layout":
                return [(m, data)]
            extra = tarfile.TarInfo(name)
            extra.type = kind
            extra.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            extra.size = 4 if kind == tarfile.REGTYPE else 0
            return [(m, data), (extra, b"evil")]

        rewrite(src, dst, change)

    return tamper


def drop(pick: Callable[[dict[str, object]], str]) -> Tamper:
    """Remove the archive member that ``pick`` names from index.json's first image."""

    def tamper(src: Path, dst: Path) -> None:
        with tarfile.open(src) as tar:
            member = tar.extractfile("index.json")
            assert member is not None
            index = json.loads(member.read())
        victim = pick(index)

        def change(m: tarfile.TarInfo, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
            return [] if m.name.endswith(victim) else [(m, data)]

        rewrite(src, dst, change)

    return tamper


def first_child(index: dict[str, object]) -> str:
    image = seed_images()[ALPINE]
    return image.for_platform("linux/amd64").digest.removeprefix("sha256:")


def first_layer(index: dict[str, object]) -> str:
    image = seed_images()[ALPINE]
    return image.blobs_of(image.for_platform("linux/amd64"))[-1].digest.removeprefix("sha256:")


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (flip_a_layer_byte, "altered or damaged"),
        (rename_a_blob, "altered or damaged"),
        (truncate, "damaged or truncated"),
        (add_member("../../evil"), "not a plain relative path"),
        (add_member("/etc/evil"), "not a plain relative path"),
        (add_member("blobs/sha256/link", tarfile.SYMTYPE), "not a regular file"),
        (add_member("extra.txt"), "unexpected"),
        (drop(first_child), "incomplete"),
        (drop(first_layer), "incomplete"),
    ],
)
def test_tampered_archives_are_refused_and_nothing_is_kept(
    tamper: Tamper, message: str, bundle: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.tar"
    tamper(bundle, bad)
    target = Layout(tmp_path / "target")
    with pytest.raises(ArchiveError, match=message):
        import_archive(bad, target)
    assert_untouched(target)


def test_not_a_tar_at_all(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not an archive" * 100)
    target = Layout(tmp_path / "target")
    with pytest.raises(ArchiveError):
        import_archive(junk, target)
    assert_untouched(target)

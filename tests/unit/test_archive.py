"""OCI image layout archives: round trips, platform filters, and every way to tamper."""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pullthrough.cache import archive
from pullthrough.cache.archive import (
    PLATFORMS,
    REF_NAME,
    ArchiveError,
    ExportImage,
    export_archive,
    import_archive,
)
from pullthrough.cache.digests import Digest
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore, StoredManifest
from tests.support.images import OCI_INDEX, Image, Manifest, seed_images

ALPINE = "library/alpine:3.19"  # a Docker manifest list: linux/amd64, linux/arm64
OCIAPP = "library/ociapp:v1"  # an OCI index: linux/amd64 and its attestation
HELLO = "library/hello:latest"  # a single Docker schema 2 image
ALPINE_REF = "docker.io/library/alpine:3.19"
OCIAPP_REF = "docker.io/library/ociapp:v1"


def image(ref: str) -> Image:
    return seed_images()[ref]


def stored(manifest: Manifest) -> StoredManifest:
    return StoredManifest(Digest.parse(manifest.digest), manifest.media_type, manifest.data)


def hex_of(digest: str) -> str:
    return digest.removeprefix("sha256:")


def content(img: Image) -> dict[str, bytes]:
    """Every manifest and blob of an image: digest -> bytes."""
    found = {m.digest: m.data for m in img.manifests}
    found.update((b.digest, b.data) for b in img.blobs)
    return found


def fill(layout: Layout, img: Image) -> None:
    """Put an image into a cache the way the mirror does: blob files, stored manifests."""
    layout.create()
    for blob in img.blobs:
        path = layout.blob(Digest.parse(blob.digest))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob.data)
    store = ManifestStore(layout)
    for m in img.manifests:
        store.write(stored(m))


def snapshot(layout: Layout) -> dict[str, bytes]:
    """Every committed file of a cache, by path."""
    return {
        str(p.relative_to(layout.root)): p.read_bytes()
        for folder in ("blobs", "manifests")
        for p in (layout.root / folder).rglob("*")
        if p.is_file()
    }


def assert_as_before(layout: Layout, before: dict[str, bytes]) -> None:
    assert snapshot(layout) == before
    assert list(layout.tmp.iterdir()) == []


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        found = {}
        for m in tar:
            f = tar.extractfile(m)
            assert m.name not in found
            found[m.name] = f.read() if f is not None else b""
        return found


def index_of(path: Path) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(members(path)["index.json"])
    return parsed


@pytest.fixture
def source(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "source")
    fill(layout, image(ALPINE))
    fill(layout, image(OCIAPP))
    return layout


@pytest.fixture
def bundle(source: Layout, tmp_path: Path) -> Path:
    out = tmp_path / "bundle.tar"
    export_archive(
        out,
        [
            ExportImage(ALPINE_REF, stored(image(ALPINE).top)),
            ExportImage(OCIAPP_REF, stored(image(OCIAPP).top)),
        ],
        source,
    )
    return out


@pytest.fixture
def target(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "target")


# -- export ---------------------------------------------------------------------------


def test_export_writes_an_oci_image_layout(source: Layout, tmp_path: Path) -> None:
    out = tmp_path / "out.tar"
    summary = export_archive(
        out,
        [
            ExportImage(ALPINE_REF, stored(image(ALPINE).top)),
            ExportImage(OCIAPP_REF, stored(image(OCIAPP).top)),
            # The same image under a second name: named twice, stored once.
            ExportImage("docker.io/library/alpine:latest", stored(image(ALPINE).top)),
        ],
        source,
    )
    with tarfile.open(out) as tar:
        infos = tar.getmembers()
    assert [m.name for m in infos[:2]] == ["oci-layout", "index.json"]
    assert all(m.isreg() and m.mtime == 0 for m in infos)
    found = members(out)
    assert json.loads(found["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(found["index.json"])
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == OCI_INDEX
    assert index["manifests"] == [
        {
            "mediaType": m.media_type,
            "digest": m.digest,
            "size": m.size,
            "annotations": {REF_NAME: name},
        }
        for name, m in [
            (ALPINE_REF, image(ALPINE).top),
            (OCIAPP_REF, image(OCIAPP).top),
            ("docker.io/library/alpine:latest", image(ALPINE).top),
        ]
    ]
    both = content(image(ALPINE)) | content(image(OCIAPP))
    blobs = {name: data for name, data in found.items() if name.startswith("blobs/")}
    assert blobs == {f"blobs/sha256/{hex_of(d)}": data for d, data in both.items()}
    # The base layer both alpine platforms share is in there once (members() checks).
    assert (summary.images, summary.manifests, summary.blobs) == (3, 6, len(both) - 6)
    assert summary.bytes == sum(len(data) for data in both.values())


def test_export_reports_progress_as_it_writes(source: Layout, tmp_path: Path) -> None:
    seen: list[int] = []
    summary = export_archive(
        tmp_path / "out.tar",
        [ExportImage(ALPINE_REF, stored(image(ALPINE).top))],
        source,
        progress=seen.append,
    )
    assert len(seen) > 1
    assert sum(seen) == summary.bytes


def test_platform_filter_exports_only_that_platform(
    source: Layout, target: Layout, tmp_path: Path
) -> None:
    alpine = image(ALPINE)
    amd64, arm64 = alpine.for_platform("linux/amd64"), alpine.for_platform("linux/arm64")
    out = tmp_path / "amd64.tar"
    summary = export_archive(
        out, [ExportImage(ALPINE_REF, stored(alpine.top), frozenset({"linux/amd64"}))], source
    )
    found = members(out)
    wanted = [alpine.digest, amd64.digest, *(b.digest for b in alpine.blobs_of(amd64))]
    assert {n for n in found if n.startswith("blobs/")} == {
        f"blobs/sha256/{hex_of(d)}" for d in wanted
    }
    only_arm = {b.digest for b in alpine.blobs_of(arm64)} - {
        b.digest for b in alpine.blobs_of(amd64)
    }
    assert only_arm  # the platforms do differ
    # The index is exported as it is, so its digest holds; it still lists arm64.
    assert found[f"blobs/sha256/{hex_of(alpine.digest)}"] == alpine.top.data
    assert index_of(out)["manifests"][0]["annotations"] == {
        REF_NAME: ALPINE_REF,
        PLATFORMS: "linux/amd64",
    }
    assert (summary.manifests, summary.blobs) == (2, len(alpine.blobs_of(amd64)))

    # Such an archive imports: the arm64 children are absent on purpose.
    imported = import_archive(out, target)
    assert [(i.ref_name, str(i.digest)) for i in imported.images] == [(ALPINE_REF, alpine.digest)]
    store = ManifestStore(target)
    assert store.read(Digest.parse(alpine.digest)) == stored(alpine.top)
    assert store.read(Digest.parse(amd64.digest)) == stored(amd64)
    assert store.read(Digest.parse(arm64.digest)) is None
    for digest in only_arm:
        assert not target.blob(Digest.parse(digest)).exists()


def test_platform_filter_keeps_attestations(source: Layout, tmp_path: Path) -> None:
    ociapp = image(OCIAPP)
    out = tmp_path / "ociapp.tar"
    export_archive(
        out, [ExportImage(OCIAPP_REF, stored(ociapp.top), frozenset({"linux/amd64"}))], source
    )
    attestation = next(m for m in ociapp.children if m.platform == "unknown/unknown")
    names = set(members(out))
    for digest in (attestation.digest, *(b.digest for b in ociapp.blobs_of(attestation))):
        assert f"blobs/sha256/{hex_of(digest)}" in names


def test_a_platform_the_image_lacks_is_an_error(source: Layout, tmp_path: Path) -> None:
    out = tmp_path / "none.tar"
    with pytest.raises(ArchiveError, match=r"no image for linux/s390x; it has linux/amd64"):
        export_archive(
            out,
            [ExportImage(ALPINE_REF, stored(image(ALPINE).top), frozenset({"linux/s390x"}))],
            source,
        )
    assert not out.exists()


def remove_layer(layout: Layout) -> str:
    alpine = image(ALPINE)
    digest = alpine.layers_of(alpine.for_platform("linux/arm64"))[-1].digest
    layout.blob(Digest.parse(digest)).unlink()
    return digest


def remove_child(layout: Layout) -> str:
    digest = image(ALPINE).for_platform("linux/arm64").digest
    layout.manifest(Digest.parse(digest)).unlink()
    return digest


@pytest.mark.parametrize("lose", [remove_layer, remove_child])
def test_export_of_an_incomplete_image_fails_before_writing(
    lose: Callable[[Layout], str], source: Layout, tmp_path: Path
) -> None:
    missing = lose(source)
    out = tmp_path / "never.tar"
    with pytest.raises(ArchiveError) as caught:
        export_archive(
            out,
            [
                ExportImage(OCIAPP_REF, stored(image(OCIAPP).top)),
                ExportImage(ALPINE_REF, stored(image(ALPINE).top)),
            ],
            source,
        )
    message = str(caught.value)
    assert ALPINE_REF in message
    assert OCIAPP_REF not in message.partition("`")[0]  # ociapp is complete
    assert missing in message
    assert f"`pullthrough warm {ALPINE_REF}`" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_an_incomplete_platform_filtered_export_suggests_the_same_filter(
    source: Layout, tmp_path: Path
) -> None:
    alpine = image(ALPINE)
    layer = alpine.layers_of(alpine.for_platform("linux/amd64"))[-1].digest
    source.blob(Digest.parse(layer)).unlink()
    with pytest.raises(ArchiveError, match=f"warm --platform linux/amd64 {ALPINE_REF}`"):
        export_archive(
            tmp_path / "x.tar",
            [ExportImage(ALPINE_REF, stored(alpine.top), frozenset({"linux/amd64"}))],
            source,
        )
    # Only the platform asked for matters: the arm64 layers may go.
    source.blob(Digest.parse(layer)).write_bytes(alpine.blob(layer).data)
    arm_only = alpine.layers_of(alpine.for_platform("linux/arm64"))[-1].digest
    source.blob(Digest.parse(arm_only)).unlink()
    export_archive(
        tmp_path / "x.tar",
        [ExportImage(ALPINE_REF, stored(alpine.top), frozenset({"linux/amd64"}))],
        source,
    )


def test_a_failed_export_leaves_no_partial_file(source: Layout, tmp_path: Path) -> None:
    out = tmp_path / "out.tar"
    out.write_bytes(b"an older export")

    def fail(n: int) -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        export_archive(
            out, [ExportImage(ALPINE_REF, stored(image(ALPINE).top))], source, progress=fail
        )
    assert out.read_bytes() == b"an older export"
    assert not (tmp_path / "out.tar.partial").exists()


def test_a_rotten_blob_is_never_exported(source: Layout, tmp_path: Path) -> None:
    """A byte flipped on disk since the download: no archive, the blob quarantined."""
    alpine = image(ALPINE)
    digest = Digest.parse(alpine.layers_of(alpine.for_platform("linux/amd64"))[-1].digest)
    path = source.blob(digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    out = tmp_path / "out.tar"
    with pytest.raises(ArchiveError, match=f"blob {digest} .* is corrupt in the cache"):
        export_archive(out, [ExportImage(ALPINE_REF, stored(alpine.top))], source)
    assert not out.exists()
    assert not (tmp_path / "out.tar.partial").exists()
    assert not path.exists()
    assert source.quarantined("blob", digest).read_bytes() == bytes(data)


def test_an_unwritable_destination_is_an_archive_error(source: Layout, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="cannot write"):
        export_archive(
            tmp_path / "no" / "such" / "dir.tar",
            [ExportImage(ALPINE_REF, stored(image(ALPINE).top))],
            source,
        )


# -- import ---------------------------------------------------------------------------


def test_round_trip_gives_the_same_files(source: Layout, bundle: Path, target: Layout) -> None:
    summary = import_archive(bundle, target)
    assert snapshot(target) == snapshot(source)
    assert [(i.ref_name, str(i.digest), i.media_type) for i in summary.images] == [
        (ALPINE_REF, image(ALPINE).digest, image(ALPINE).top.media_type),
        (OCIAPP_REF, image(OCIAPP).digest, image(OCIAPP).top.media_type),
    ]
    all_blobs = {b.digest: b for ref in (ALPINE, OCIAPP) for b in image(ref).blobs}
    assert summary.manifests_added == 6
    assert summary.blobs_added == len(all_blobs)
    assert summary.blobs_present == 0
    manifest_bytes = sum(m.size for ref in (ALPINE, OCIAPP) for m in image(ref).manifests)
    assert summary.bytes_added == sum(b.size for b in all_blobs.values()) + manifest_bytes
    assert list(target.tmp.iterdir()) == []

    again = import_archive(bundle, target)  # a second import adds nothing
    assert (again.manifests_added, again.blobs_added, again.bytes_added) == (0, 0, 0)
    assert again.blobs_present == summary.blobs_added
    assert snapshot(target) == snapshot(source)


def test_import_reports_progress_up_to_the_archive_size(bundle: Path, target: Layout) -> None:
    seen: list[int] = []
    import_archive(bundle, target, progress=seen.append)
    assert all(n > 0 for n in seen)
    assert sum(seen) == bundle.stat().st_size


def layout_tar(
    dst: Path,
    entries: list[tuple[str, bytes | None]],
) -> None:
    """A tar of ``entries`` in that order: (name, bytes) files, (name, None) folders."""
    with tarfile.open(dst, "w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))


def skopeo_style(img: Image, ref_name: str | None, *, prefix: str = "") -> list[Any]:
    """What ``skopeo copy ... oci-archive:FILE:NAME`` writes: folders, blobs first,
    index.json and oci-layout last, an index.json with no mediaType of its own."""
    annotations = {} if ref_name is None else {"annotations": {REF_NAME: ref_name}}
    index = {"schemaVersion": 2, "manifests": [img.top.descriptor(**annotations)]}
    return [
        *([(prefix, None)] if prefix else []),
        (f"{prefix}blobs/", None),
        (f"{prefix}blobs/sha256/", None),
        *((f"{prefix}blobs/sha256/{hex_of(d)}", data) for d, data in sorted(content(img).items())),
        (f"{prefix}index.json", json.dumps(index, separators=(",", ":")).encode()),
        (f"{prefix}oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
    ]


@pytest.mark.parametrize("prefix", ["", "./"])
def test_imports_skopeo_style_archives(prefix: str, tmp_path: Path, target: Layout) -> None:
    ociapp = image(OCIAPP)
    src = tmp_path / "skopeo.tar"
    layout_tar(src, skopeo_style(ociapp, "ociapp", prefix=prefix))
    summary = import_archive(src, target)
    assert [(i.ref_name, str(i.digest), i.media_type) for i in summary.images] == [
        ("ociapp", ociapp.digest, ociapp.top.media_type)
    ]
    reference = Layout(tmp_path / "reference")
    fill(reference, ociapp)
    assert snapshot(target) == snapshot(reference)


def test_media_types_come_from_descriptors_else_the_manifest(
    tmp_path: Path, target: Layout
) -> None:
    alpine = image(ALPINE)
    entries = skopeo_style(alpine, None)
    index = {"schemaVersion": 2, "manifests": [{"digest": alpine.digest, "size": alpine.top.size}]}
    entries = [(n, json.dumps(index).encode()) if n == "index.json" else (n, d) for n, d in entries]
    src = tmp_path / "untyped.tar"
    layout_tar(src, entries)
    summary = import_archive(src, target)
    # No ref name, no mediaType in index.json: the manifest list's own field.
    assert [(i.ref_name, i.media_type) for i in summary.images] == [(None, alpine.top.media_type)]
    store = ManifestStore(target)
    for m in alpine.manifests:
        assert store.read(Digest.parse(m.digest)) == stored(m)


def test_blobs_already_cached_need_not_be_in_the_archive(tmp_path: Path, target: Layout) -> None:
    alpine = image(ALPINE)
    fill(target, alpine)
    for m in alpine.manifests:  # the layers are cached, the manifests are not
        target.manifest(Digest.parse(m.digest)).unlink()
    manifests_only = [
        (n, d)
        for n, d in skopeo_style(alpine, "alpine")
        if not any(n.endswith(hex_of(b.digest)) for b in alpine.blobs)
    ]
    src = tmp_path / "thin.tar"
    layout_tar(src, manifests_only)
    summary = import_archive(src, target)
    assert (summary.manifests_added, summary.blobs_added) == (3, 0)
    assert summary.blobs_present == len(alpine.blobs)
    reference = Layout(tmp_path / "reference")
    fill(reference, alpine)
    assert snapshot(target) == snapshot(reference)


# -- tampering: each archive is refused and the cache is as it was ---------------------

Tamper = Callable[[Path, Path], None]
Change = Callable[[tarfile.TarInfo, bytes], list[tuple[tarfile.TarInfo, bytes]]]


def rewrite(src: Path, dst: Path, change: Change) -> None:
    with tarfile.open(src) as old, tarfile.open(dst, "w") as new:
        for member in old:
            f = old.extractfile(member)
            data = f.read() if f else b""
            for info, body in change(member, data):
                new.addfile(info, io.BytesIO(body) if info.isreg() else None)


def largest_layer() -> str:
    alpine = image(ALPINE)
    return hex_of(alpine.layers_of(alpine.for_platform("linux/amd64"))[-1].digest)


def flip_a_layer_byte(src: Path, dst: Path) -> None:
    def change(m: tarfile.TarInfo, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
        if m.name.endswith(largest_layer()):
            data = data[:500] + bytes([data[500] ^ 1]) + data[501:]
        return [(m, data)]

    rewrite(src, dst, change)


WRONG = "0" * 64


def rename_a_blob(src: Path, dst: Path) -> None:
    def change(m: tarfile.TarInfo, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
        if m.name.endswith(largest_layer()):
            m.name = f"blobs/sha256/{WRONG}"
        return [(m, data)]

    rewrite(src, dst, change)


def cut(where: Callable[[Path], int]) -> Tamper:
    def tamper(src: Path, dst: Path) -> None:
        dst.write_bytes(src.read_bytes()[: where(src)])

    return tamper


def in_a_layer(src: Path) -> int:
    with tarfile.open(src) as tar:
        member = next(m for m in tar if m.name.endswith(largest_layer()))
        return member.offset_data + member.size // 2


def after_the_last_member(src: Path) -> int:
    """Everything is there, only the end-of-archive marker is not."""
    with tarfile.open(src) as tar:
        last = tar.getmembers()[-1]
        return last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def break_a_header(src: Path, dst: Path) -> None:
    """A damaged header in the middle: tarfile alone would take it for the end."""
    with tarfile.open(src) as tar:
        victim = tar.getmembers()[-3]
    data = bytearray(src.read_bytes())
    data[victim.offset + 10] ^= 0xFF
    dst.write_bytes(bytes(data))


def add_member(name: str, kind: bytes = tarfile.REGTYPE) -> Tamper:
    def tamper(src: Path, dst: Path) -> None:
        def change(m: tarfile.TarInfo, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
            if m.name != "oci-layout":
                return [(m, data)]
            extra = tarfile.TarInfo(name)
            extra.type = kind
            extra.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            extra.size = 4 if kind == tarfile.REGTYPE else 0
            return [(m, data), (extra, b"evil")]

        rewrite(src, dst, change)

    return tamper


def drop(victim: Callable[[], str]) -> Tamper:
    def tamper(src: Path, dst: Path) -> None:
        rewrite(src, dst, lambda m, data: [] if m.name.endswith(victim()) else [(m, data)])

    return tamper


def amd64_manifest() -> str:
    return hex_of(image(ALPINE).for_platform("linux/amd64").digest)


def edit_index(edit: Callable[[dict[str, Any]], object]) -> Tamper:
    def tamper(src: Path, dst: Path) -> None:
        def change(m: tarfile.TarInfo, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
            if m.name != "index.json":
                return [(m, data)]
            new = edit(json.loads(data))
            body = new if isinstance(new, bytes) else json.dumps(new).encode()
            m.size = len(body)
            return [(m, body)]

        rewrite(src, dst, change)

    return tamper


def name_a_missing_manifest(index: dict[str, Any]) -> dict[str, Any]:
    index["manifests"].append(
        {"mediaType": OCI_INDEX, "digest": f"sha256:{WRONG}", "size": 2, "annotations": {}}
    )
    return index


def lie_about_a_size(index: dict[str, Any]) -> dict[str, Any]:
    index["manifests"][0]["size"] += 1
    return index


def call_a_layer_a_manifest(index: dict[str, Any]) -> dict[str, Any]:
    index["manifests"][0]["digest"] = f"sha256:{largest_layer()}"
    del index["manifests"][0]["size"]
    return index


def break_media_type(index: dict[str, Any]) -> dict[str, Any]:
    index["manifests"][0]["mediaType"] = "text/plain\nX-Evil: 1"
    return index


def duplicate_index(src: Path, dst: Path) -> None:
    def change(m: tarfile.TarInfo, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
        if m.name != "index.json":
            return [(m, data)]
        other = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
        second = tarfile.TarInfo("./index.json")
        second.size = len(other)
        return [(m, data), (second, other)]

    rewrite(src, dst, change)


def compress(src: Path, dst: Path) -> None:
    dst.write_bytes(gzip.compress(src.read_bytes()))


def not_a_tar(src: Path, dst: Path) -> None:
    dst.write_bytes(b"this is not an archive\n" * 100)


def huge_index(src: Path, dst: Path) -> None:
    edit_index(lambda index: b" " * (5 << 20) + json.dumps(index).encode())(src, dst)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        pytest.param(
            flip_a_layer_byte, r"blob sha256:\w{64} in the archive has content sha256:", id="flip"
        ),
        pytest.param(
            rename_a_blob,
            f"blob sha256:{WRONG} in the archive has content sha256:{largest_layer()}",
            id="rename",
        ),
        pytest.param(cut(in_a_layer), "damaged or truncated", id="truncated-mid-blob"),
        pytest.param(
            cut(after_the_last_member), "no end-of-archive marker", id="truncated-at-boundary"
        ),
        pytest.param(cut(lambda src: 700), "damaged or truncated", id="truncated-early"),
        pytest.param(break_a_header, "damaged or truncated", id="broken-header"),
        pytest.param(add_member("../../evil"), "not a plain relative path", id="dotdot"),
        pytest.param(add_member("blobs/../../evil"), "not a plain relative path", id="dotdot-in"),
        pytest.param(add_member("/etc/evil"), "not a plain relative path", id="absolute"),
        pytest.param(
            add_member("blobs/sha256/link", tarfile.SYMTYPE), "symbolic link", id="symlink"
        ),
        pytest.param(add_member("blobs/sha256/hard", tarfile.LNKTYPE), "hard link", id="hardlink"),
        pytest.param(add_member("blobs/dev", tarfile.CHRTYPE), "character device", id="device"),
        pytest.param(add_member("blobs/fifo", tarfile.FIFOTYPE), "FIFO", id="fifo"),
        pytest.param(add_member("extra.txt"), "unexpected archive member", id="extra-file"),
        pytest.param(
            add_member("blobs/sha256/sub", tarfile.DIRTYPE), "unexpected folder", id="extra-folder"
        ),
        pytest.param(add_member("blobs/sha256/abc"), "not named by a digest", id="bad-digest"),
        pytest.param(add_member(f"blobs/md5/{'a' * 32}"), "not named by a digest", id="md5"),
        pytest.param(duplicate_index, "appears twice", id="duplicate"),
        pytest.param(drop(amd64_manifest), "incomplete.*manifest sha256:", id="missing-manifest"),
        pytest.param(drop(largest_layer), "incomplete.*blob sha256:", id="missing-layer"),
        pytest.param(
            edit_index(name_a_missing_manifest),
            f"incomplete.*manifest sha256:{WRONG}",
            id="index-names-absent",
        ),
        pytest.param(edit_index(lie_about_a_size), "described as", id="wrong-size"),
        pytest.param(edit_index(call_a_layer_a_manifest), "not a manifest", id="layer-as-manifest"),
        pytest.param(edit_index(break_media_type), "invalid media type", id="bad-media-type"),
        pytest.param(edit_index(lambda index: b"{nope"), "not JSON", id="index-not-json"),
        pytest.param(edit_index(lambda index: {"a": 1}), "not an OCI index", id="not-an-index"),
        pytest.param(edit_index(lambda index: [index]), "not an OCI index", id="index-a-list"),
        pytest.param(huge_index, "at most", id="huge-index"),
        pytest.param(drop(lambda: "oci-layout"), "not an OCI image layout", id="no-oci-layout"),
        pytest.param(compress, "gzip-compressed", id="gzip"),
        pytest.param(not_a_tar, "not a tar archive", id="not-a-tar"),
    ],
)
def test_tampered_archives_are_refused_and_nothing_is_kept(
    tamper: Tamper, message: str, bundle: Path, target: Layout, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.tar"
    tamper(bundle, bad)
    with pytest.raises(ArchiveError, match=message):
        import_archive(bad, target)
    assert_as_before(target, {})


def test_a_refused_import_leaves_a_cache_exactly_as_it_was(
    bundle: Path, target: Layout, tmp_path: Path
) -> None:
    fill(target, image(HELLO))
    alpine = image(ALPINE)
    shared = alpine.layers_of(alpine.for_platform("linux/amd64"))[0].digest
    path = target.blob(Digest.parse(shared))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(alpine.blob(shared).data)  # also in the archive
    before = snapshot(target)
    bad = tmp_path / "bad.tar"
    drop(largest_layer)(bundle, bad)
    with pytest.raises(ArchiveError, match="incomplete"):
        import_archive(bad, target)
    assert_as_before(target, before)


# -- failures while writing: nothing is kept -----------------------------------------


def disk_full(*args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_staging_keeps_nothing(
    bundle: Path, target: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged = archive._stage_blob
    calls = 0

    def stage(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 4:
            disk_full()
        staged(*args)

    monkeypatch.setattr(archive, "_stage_blob", stage)
    with pytest.raises(ArchiveError, match="disk full"):
        import_archive(bundle, target)
    assert_as_before(target, {})


def test_disk_full_while_committing_undoes_what_was_committed(
    bundle: Path, target: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(target, image(HELLO))
    before = snapshot(target)
    write = ManifestStore.write
    calls = 0

    def store(self: ManifestStore, manifest: StoredManifest) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # every blob and two manifests are in place by now
            assert len(snapshot(target)) > len(before)
            disk_full()
        write(self, manifest)

    monkeypatch.setattr(ManifestStore, "write", store)
    with pytest.raises(ArchiveError, match="disk full"):
        import_archive(bundle, target)
    assert_as_before(target, before)


def test_an_interrupted_import_keeps_nothing(bundle: Path, target: Layout) -> None:
    seen = 0

    def interrupt(n: int) -> None:
        nonlocal seen
        seen += n
        if seen > bundle.stat().st_size // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_archive(bundle, target, progress=interrupt)
    assert_as_before(target, {})


@pytest.fixture
def locked(target: Layout) -> Iterator[Path]:
    """A staging folder whose import is alive (its lock is held)."""
    target.create()
    path = target.tmp / "import-alive"
    path.mkdir()
    fd = os.open(path / archive.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield path
    finally:
        os.close(fd)


def test_folders_of_killed_imports_are_removed(bundle: Path, target: Layout, locked: Path) -> None:
    # Killed just now: no age guard, an import-* folder with a free lock is dead.
    dead = target.tmp / "import-dead"
    dead.mkdir()
    (dead / archive.LOCK_NAME).touch()
    (dead / "sha256-abc").write_bytes(b"left over")
    never_locked = target.tmp / "import-early"
    never_locked.mkdir()
    # Killed between making and locking its folder: old ones go, a new one may be alive.
    stale_start = target.tmp / f"{archive.STARTING_PREFIX}old"
    stale_start.mkdir()
    old = 1_000_000_000.0
    os.utime(stale_start, (old, old))
    starting = target.tmp / f"{archive.STARTING_PREFIX}now"
    starting.mkdir()
    import_archive(bundle, target)
    assert sorted(p.name for p in target.tmp.iterdir()) == [
        "import-alive",
        f"{archive.STARTING_PREFIX}now",
    ]
    assert archive.remove_abandoned_imports(target) == 0


def test_blob_digests_of_an_export_match_their_content(bundle: Path) -> None:
    for name, data in members(bundle).items():
        if name.startswith("blobs/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]

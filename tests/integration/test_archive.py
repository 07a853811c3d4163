"""Air-gapped transfer: export on one mirror, import on another that is offline.

The CLI end to end, then ``cache.archive`` against skopeo 1.9 directly: skopeo
reads our archives, we read its ``oci-archive:`` ones.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from pullthrough.cache.archive import ExportImage, export_archive, import_archive
from pullthrough.cache.digests import Digest
from pullthrough.cache.graph import children
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore, StoredManifest
from tests.support.images import OCI_INDEX, OCI_MANIFEST, Image, Manifest, seed_images
from tests.support.mirror import MirrorProcess, blob_files, run_cli
from tests.support.registry import Registry, RegistryFactory
from tests.support.skopeo import Skopeo, dir_blob_digests, dir_manifest

ALPINE = "library/alpine:3.19"


def cli(*args: str, cache: Path, upstream: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cache=cache, upstream=upstream)


def test_export_then_offline_import_then_pull_gives_the_original_digests(
    make_registry: RegistryFactory, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    images = seed_images()
    origin = make_registry(seed=[images[ALPINE], images["library/ociapp:v1"]])
    site_a, site_b = tmp_path / "a", tmp_path / "b"
    warmed = cli("warm", "alpine:3.19", "ociapp:v1", cache=site_a, upstream=origin.url)
    assert warmed.returncode == 0, warmed.stdout + warmed.stderr
    bundle = tmp_path / "bundle.tar"
    exported = cli(
        "export", "alpine:3.19", "ociapp:v1", "-o", str(bundle), cache=site_a, upstream=origin.url
    )
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert "2 image(s)" in exported.stdout

    origin.stop()  # the air gap: nothing upstream from here on
    imported = cli("import", str(bundle), cache=site_b, upstream=origin.url)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert "every digest verified" in imported.stdout

    mirror = MirrorProcess(site_b, origin.url, env={"PULLTHROUGH_OFFLINE": "true"})
    mirror.start()
    try:
        host = mirror.url.removeprefix("http://")
        for ref, name in ((ALPINE, "alpine:3.19"), ("library/ociapp:v1", "ociapp:v1")):
            image = images[ref]
            dest = tmp_path / name.replace(":", "-")
            skopeo_cli.copy(f"docker://{host}/{name}", f"dir:{dest}", all_images=True)
            assert dir_manifest(dest) == image.top.data
            for child in image.children:
                assert dir_manifest(dest, child.digest) == child.data
            assert dir_blob_digests(dest) == {b.digest for b in image.blobs}
    finally:
        mirror.stop()


def test_skopeo_reads_our_export_and_we_read_skopeos(
    upstream: Registry, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    assert cli("warm", "hello", cache=cache, upstream=upstream.url).returncode == 0
    ours = tmp_path / "ours.tar"
    assert (
        cli("export", "hello", "-o", str(ours), cache=cache, upstream=upstream.url).returncode == 0
    )
    image = upstream.images["library/hello:latest"]
    # skopeo 1.9 finds an image in an archive by ref name only when it is typed as
    # an OCI image manifest; with one image in the archive it needs no name.
    skopeo_cli.run("copy", f"oci-archive:{ours}", f"dir:{tmp_path / 'x'}")
    assert dir_manifest(tmp_path / "x") == image.top.data

    theirs = tmp_path / "theirs.tar"
    skopeo_cli.copy(f"docker://{upstream.host}/{ALPINE}", f"oci-archive:{theirs}:alpine:3.19")
    fresh = tmp_path / "fresh"
    loaded = cli("import", str(theirs), cache=fresh, upstream=upstream.url)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "docker.io/library/alpine:3.19" in loaded.stdout  # its ref name became a tag
    assert blob_files(fresh)


def test_a_tampered_bundle_is_rejected_and_nothing_is_kept(
    upstream: Registry, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    assert cli("warm", "hello", cache=cache, upstream=upstream.url).returncode == 0
    bundle = tmp_path / "bundle.tar"
    assert (
        cli("export", "hello", "-o", str(bundle), cache=cache, upstream=upstream.url).returncode
        == 0
    )
    layer = upstream.images["library/hello:latest"].layers_of(
        upstream.images["library/hello:latest"].top
    )[0]
    data = bytearray(bundle.read_bytes())
    at = data.find(layer.data[:64])
    assert at > 0
    data[at + 10] ^= 0xFF
    bundle.write_bytes(bytes(data))

    target = tmp_path / "target"
    result = cli("import", str(bundle), cache=target, upstream=upstream.url)
    assert result.returncode == 1
    assert "altered or damaged" in result.stderr
    assert blob_files(target) == []
    assert [p for p in (target / "manifests").rglob("*") if p.is_file()] == []


# -- cache.archive against skopeo 1.9 ---------------------------------------------------


def stored(manifest: Manifest) -> StoredManifest:
    return StoredManifest(Digest.parse(manifest.digest), manifest.media_type, manifest.data)


def filled(root: Path, *images: Image) -> Layout:
    """A cache holding ``images`` as the mirror stores them."""
    layout = Layout(root)
    layout.create()
    store = ManifestStore(layout)
    for image in images:
        for blob in image.blobs:
            path = layout.blob(Digest.parse(blob.digest))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob.data)
        for m in image.manifests:
            store.write(stored(m))
    return layout


def test_skopeo_reads_what_export_archive_writes(skopeo_cli: Skopeo, tmp_path: Path) -> None:
    images = seed_images()
    hello, ociapp, alpine = (
        images["library/hello:latest"],
        images["library/ociapp:v1"],
        images[ALPINE],
    )
    layout = filled(tmp_path / "cache", hello, ociapp, alpine)
    bundle = tmp_path / "bundle.tar"
    export_archive(
        bundle,
        [
            ExportImage("docker.io/library/hello:latest", stored(hello.top)),
            ExportImage("docker.io/library/ociapp:v1", stored(ociapp.top)),
            ExportImage("docker.io/library/alpine:3.19", stored(alpine.top)),
        ],
        layout,
    )
    # The path ends at the first ':', the rest is the ref name, ':' and '/' and all.
    # skopeo 1.9 looks names up among OCI-typed descriptors only: this works for
    # ociapp (an OCI index) and not for hello or alpine (Docker-typed).
    whole = tmp_path / "ociapp"
    skopeo_cli.run(
        "copy", "--all", f"oci-archive:{bundle}:docker.io/library/ociapp:v1", f"dir:{whole}"
    )
    assert dir_manifest(whole) == ociapp.top.data
    for child in ociapp.children:
        assert dir_manifest(whole, child.digest) == child.data
    assert dir_blob_digests(whole) == {b.digest for b in ociapp.blobs}

    # A Docker-typed image is found when it is the archive's only one.
    single = tmp_path / "hello.tar"
    export_archive(
        single, [ExportImage("docker.io/library/hello:latest", stored(hello.top))], layout
    )
    one = tmp_path / "hello"
    skopeo_cli.run("copy", f"oci-archive:{single}", f"dir:{one}")
    assert dir_manifest(one) == hello.top.data
    assert dir_blob_digests(one) == {b.digest for b in hello.blobs}


def test_skopeo_pulls_the_exported_platform_of_a_filtered_index(
    skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    alpine = seed_images()[ALPINE]
    amd64 = alpine.for_platform("linux/amd64")
    layout = filled(tmp_path / "cache", alpine)
    bundle = tmp_path / "amd64.tar"
    export_archive(
        bundle,
        [
            ExportImage(
                "docker.io/library/alpine:3.19", stored(alpine.top), frozenset({"linux/amd64"})
            )
        ],
        layout,
    )
    dest = tmp_path / "out"
    skopeo_cli.run("copy", f"oci-archive:{bundle}", f"dir:{dest}")  # skopeo_cli is linux/amd64
    assert dir_manifest(dest) == amd64.data
    assert dir_blob_digests(dest) == {b.digest for b in alpine.blobs_of(amd64)}


@pytest.mark.parametrize("all_images", [False, True], ids=["one-platform", "all"])
def test_import_archive_loads_what_skopeo_writes(
    all_images: bool, upstream: Registry, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    theirs = tmp_path / "theirs.tar"
    skopeo_cli.copy(
        f"docker://{upstream.host}/{ALPINE}", f"oci-archive:{theirs}:alpine", all_images=all_images
    )
    with tarfile.open(theirs) as tar:
        written = {
            m.name: f.read() for m in tar if m.isreg() and (f := tar.extractfile(m)) is not None
        }
    index = json.loads(written["index.json"])
    [top] = index["manifests"]
    # skopeo converts Docker manifests to OCI, so these digests are its own.
    assert top["mediaType"] == (OCI_INDEX if all_images else OCI_MANIFEST)

    layout = Layout(tmp_path / "cache")
    summary = import_archive(theirs, layout)
    assert [(i.ref_name, str(i.digest), i.media_type) for i in summary.images] == [
        ("alpine", top["digest"], top["mediaType"])
    ]
    store = ManifestStore(layout)
    manifests = {}
    pending = [Digest.parse(top["digest"])]
    while pending:
        found = store.read(pending.pop())
        assert found is not None
        manifests[found.digest] = found
        pending.extend(c.digest for c in children(found))
    assert len(manifests) == (3 if all_images else 1)
    blobs = {n: d for n, d in written.items() if n.startswith("blobs/")}
    for name, data in blobs.items():
        digest = Digest.parse(name.removeprefix("blobs/").replace("/", ":"))
        assert hashlib.sha256(data).hexdigest() == digest.hex
        if digest in manifests:
            assert manifests[digest].data == data
        else:
            assert layout.blob(digest).read_bytes() == data
    assert summary.manifests_added == len(manifests)
    assert summary.blobs_added == len(blobs) - len(manifests)
    assert list(layout.tmp.iterdir()) == []

    # And back: skopeo finds this one by name, as skopeo made it OCI-typed.
    again = tmp_path / "again.tar"
    top_manifest = store.read(Digest.parse(top["digest"]))
    assert top_manifest is not None
    export_archive(again, [ExportImage("alpine", top_manifest)], layout)
    dest = tmp_path / "dir"
    skopeo_cli.run("copy", f"oci-archive:{again}:alpine", f"dir:{dest}")
    if not all_images:
        assert dir_manifest(dest) == top_manifest.data

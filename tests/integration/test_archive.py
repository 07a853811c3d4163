"""Air-gapped transfer: export on one mirror, import on another that is offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.images import seed_images
from tests.support.mirror import MirrorProcess, blob_files
from tests.support.registry import Registry, RegistryFactory
from tests.support.skopeo import Skopeo, dir_blob_digests, dir_manifest

ALPINE = "library/alpine:3.19"


def cli(*args: str, cache: Path, upstream: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PULLTHROUGH_CACHE_DIR": str(cache), "PULLTHROUGH_UPSTREAM": upstream}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


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
    assert "altered or damaged" in result.stdout
    assert blob_files(target) == []
    assert [p for p in (target / "manifests").rglob("*") if p.is_file()] == []

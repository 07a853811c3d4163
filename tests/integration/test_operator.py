"""What an operator runs into: the tools on a server's cache with none of its flags,
imports into the right store, killed imports, configuration mistakes, typos.

Every command runs as a subprocess with no ``PULLTHROUGH_*`` variable but those a
test gives, the way an operator types it on the mirror's host.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from pullthrough.cache.digests import Digest
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore, StoredManifest
from pullthrough.proxy.console import human
from tests.support.images import Image, make_image
from tests.support.mirror import MirrorProcess, blob_files, run_cli
from tests.support.registry import Registry, RegistryFactory
from tests.support.skopeo import Skopeo
from tests.support.tokenserver import ALICE

MiB = 1024 * 1024


def tool(
    *args: str,
    cache: Path | None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """``pullthrough ARGS [--cache-dir CACHE]`` with no other setting. A command
    still running at ``timeout`` is killed with every process it started (a
    server that should have refused to start may have spawned workers)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PULLTHROUGH_")}
    argv = [
        sys.executable,
        "-m",
        "pullthrough",
        *args,
        *([f"--cache-dir={cache}"] if cache else []),
    ]
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**clean, **(env or {})},
        cwd=cwd,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def age_everything(cache: Path, seconds: float) -> None:
    for p in cache.rglob("*"):
        if p.is_file() and ("blobs" in p.parts or "manifests" in p.parts):
            st = p.stat()
            os.utime(p, (st.st_atime - seconds, st.st_mtime - seconds))


def files_of(cache: Path, image: Image) -> dict[str, bytes]:
    """The cached blob files of ``image``, by digest, with their bytes."""
    wanted = {b.digest.removeprefix("sha256:") for b in image.blobs_of(image.top)}
    return {p.name: p.read_bytes() for p in blob_files(cache) if p.name in wanted}


def test_tools_find_what_a_server_pulled_and_gc_keeps_pinned_content(
    make_registry: RegistryFactory, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    keep, drop = (
        make_image(f"team/{n}", "1", seed=f"op-{n}", layer_sizes=(MiB,), compresslevel=0)
        for n in ("keep", "drop")
    )
    origin = make_registry(seed=[keep, drop])
    cache = tmp_path / "cache"
    mirror = MirrorProcess(cache, origin.url)  # --upstream http://127.0.0.1:PORT
    mirror.start()
    try:
        host = mirror.url.removeprefix("http://")
        for image in (keep, drop):
            skopeo_cli.copy(f"docker://{host}/{image.ref}", f"dir:{tmp_path / image.tag}")
    finally:
        mirror.stop()

    # Only --cache-dir: the tools know docker.io from the cache, not the URL.
    listing = ok(tool("cache", "ls", cache=cache))
    assert "docker.io/team/keep:1" in listing
    assert "docker.io/team/drop:1" in listing
    bundle = tmp_path / "keep.tar"
    ok(tool("export", "team/keep:1", "-o", str(bundle), cache=cache))
    with tarfile.open(bundle) as tar:
        exported = {m.name.rsplit("/", 1)[-1] for m in tar.getmembers()}
    assert {b.digest.removeprefix("sha256:") for b in keep.blobs_of(keep.top)} <= exported

    # warm does go to the upstream its own settings name, and says so.
    elsewhere = tool(
        "warm", "team/keep:1", cache=cache, env={"PULLTHROUGH_UPSTREAM": "http://127.0.0.1:9"}
    )
    assert f"the server on this cache fetches docker.io from {origin.url}" in elsewhere.stderr

    ok(tool("cache", "pin", "team/keep:1", cache=cache))
    assert "pinned" in ok(tool("cache", "ls", cache=cache))
    before = files_of(cache, keep)
    assert len(before) == len(keep.blobs_of(keep.top))
    age_everything(cache, 86400)  # past every grace period
    out = ok(tool("gc", "--delete", "--max-size", "1", cache=cache))
    assert "removed" in out
    assert files_of(cache, keep) == before  # the pinned image's bytes, untouched
    for digest, data in before.items():
        assert hashlib.sha256(data).hexdigest() == digest
    assert files_of(cache, drop) == {}  # the rest was evicted: the cap was real


def test_import_goes_into_the_store_of_a_credentialed_upstream(
    upstream: Registry, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    image = upstream.images["library/hello:latest"]
    site_a = tmp_path / "a"
    assert run_cli("warm", "hello", cache=site_a, upstream=upstream.url).returncode == 0
    bundle = tmp_path / "hello.tar"
    ok(tool("export", "hello", "-o", str(bundle), cache=site_a))
    creds = {"PULLTHROUGH_UPSTREAM_USERNAME": ALICE[0], "PULLTHROUGH_UPSTREAM_PASSWORD": ALICE[1]}
    wanted = {b.digest.removeprefix("sha256:") for b in image.blobs_of(image.top)}

    # The server ran with credentials for docker.io; import is run without them.
    site_b = tmp_path / "b"
    server = MirrorProcess(site_b, upstream.url, env=creds)
    server.start()
    server.stop()
    private = site_b / "upstreams" / "docker.io"
    out = ok(tool("import", str(bundle), cache=site_b))
    assert str(private) in out
    assert {p.name for p in blob_files(private)} == wanted
    assert blob_files(site_b) == []  # nothing in the store anonymous upstreams share
    assert "docker.io/library/hello:latest" in ok(tool("cache", "ls", cache=site_b))

    # The server, credentials and offline, serves it from that store.
    offline = MirrorProcess(site_b, upstream.url, env={**creds, "PULLTHROUGH_OFFLINE": "true"})
    offline.start()
    try:
        host = offline.url.removeprefix("http://")
        skopeo_cli.copy(f"docker://{host}/hello:latest", f"dir:{tmp_path / 'pulled'}")
    finally:
        offline.stop()

    # With the credentials given to import itself, and no server record.
    site_c = tmp_path / "c"
    ok(tool("import", str(bundle), cache=site_c, env=creds))
    assert {p.name for p in blob_files(site_c / "upstreams" / "docker.io")} == wanted
    assert blob_files(site_c) == []


def _big_bundle(path: Path) -> None:
    """An OCI layout tar with three 32 MiB layers: an import of it takes a while."""
    layers = [os.urandom(32 * MiB) for _ in range(3)]
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()

    def desc(data: bytes, media_type: str) -> dict[str, object]:
        return {"mediaType": media_type, "digest": str(Digest.of(data)), "size": len(data)}

    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": desc(config, "application/vnd.oci.image.config.v1+json"),
            "layers": [desc(d, "application/vnd.oci.image.layer.v1.tar") for d in layers],
        }
    ).encode()
    top = desc(manifest, "application/vnd.oci.image.manifest.v1+json")
    top["annotations"] = {"org.opencontainers.image.ref.name": "docker.io/library/big:1"}
    index = json.dumps({"schemaVersion": 2, "manifests": [top]}).encode()
    with tarfile.open(path, "w") as tar:
        members = [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", index)]
        members += [(f"blobs/sha256/{Digest.of(d).hex}", d) for d in (manifest, config, *layers)]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _size(folder: Path) -> int:
    total = 0
    for p in folder.glob("sha256-*"):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


def _kill_an_import(bundle: Path, cache: Path) -> Path:
    """Start ``pullthrough import``, SIGKILL it while it stages; its staging folder.
    Tried a few times: a fast machine may finish the import before it is caught."""
    for _ in range(3):
        staging = _try_to_kill_an_import(bundle, cache)
        if staging is not None:
            return staging
    raise AssertionError("the import ended each time before it could be killed")


def _try_to_kill_an_import(bundle: Path, cache: Path) -> Path | None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PULLTHROUGH_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pullthrough", "import", str(bundle), f"--cache-dir={cache}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=clean,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            staging = sorted((cache / "tmp").glob("import-*")) if (cache / "tmp").is_dir() else []
            if staging and _size(staging[0]) >= 4 * MiB:
                os.kill(proc.pid, signal.SIGSTOP)  # frozen mid-import, then killed
                if staging[0].is_dir():
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return staging[0]
                os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.001)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return None


def test_a_killed_imports_staging_folder_is_counted_then_removed(
    upstream: Registry, tmp_path: Path
) -> None:
    bundle = tmp_path / "big.tar"
    _big_bundle(bundle)
    cache = tmp_path / "cache"

    staging = _kill_an_import(bundle, cache)
    staged = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    assert staged >= MiB
    usage = ok(tool("cache", "du", cache=cache))
    assert f"({human(staged)})" in usage, usage  # its real size, not a folder's 4 KiB

    mirror = MirrorProcess(cache, upstream.url)
    mirror.start()  # a server start removes it...
    mirror.stop()
    assert not staging.exists()

    again = _kill_an_import(bundle, cache)  # ...and so does the next import
    out = ok(tool("import", str(bundle), cache=cache))
    assert "imported 1 image(s)" in out
    assert not again.exists()
    assert sorted(p.name for p in (cache / "tmp").iterdir()) == []


def test_gc_keeps_blobs_when_it_cannot_read_a_manifest(upstream: Registry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert run_cli("warm", "hello", cache=cache, upstream=upstream.url).returncode == 0
    orphan = cache / "blobs" / "sha256" / "ab" / ("ab" * 32)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"maybe needed")
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    # A manifest of a type gc does not know: it may reference the orphan.
    data = json.dumps({"schemaVersion": 2, "blobz": [{"digest": f"sha256:{'ab' * 32}"}]}).encode()
    odd = StoredManifest(Digest.of(data), "application/vnd.example.thing+json", data)
    ManifestStore(Layout(cache)).write(odd)

    out = ok(tool("gc", "--delete", cache=cache))
    assert "removed 0 unreferenced blob(s)" in out
    assert "kept:" in out
    assert orphan.exists()

    Layout(cache).manifest(odd.digest).unlink()
    assert "removed 1 unreferenced blob(s)" in ok(tool("gc", "--delete", cache=cache))
    assert not orphan.exists()


# (arguments, environment, config file, the setting the message must name)
CONFIG_ERRORS = [
    (["--host", "999.1.1.1"], {}, None, "host"),
    (["--cache-dir", "/proc/nope"], {}, None, "cache_dir"),
    ([], {}, "port = [1]", "port"),
    ([], {}, "pinned = 5", "pinned"),
    ([], {}, "cache_dir = 5", "cache_dir"),
    ([], {}, "workers = 2.5", "workers"),
    ([], {}, 'port = "5000"', "port"),
    ([], {"PULLTHROUGH_TAG_TTL": "inf"}, None, "PULLTHROUGH_TAG_TTL"),
    ([], {}, "max_size = true", "max_size"),
    ([], {}, 'offline = "maybe"', "offline"),
    (
        [],
        {"PULLTHROUGH_UPSTREAM_USERNAME": "", "PULLTHROUGH_UPSTREAM_PASSWORD": "s3cret"},
        None,
        "PULLTHROUGH_UPSTREAM_USERNAME",
    ),
    (
        [],
        {"PULLTHROUGH_UPSTREAM_USERNAME": "bob", "PULLTHROUGH_UPSTREAM_PASSWORD": ""},
        None,
        "PULLTHROUGH_UPSTREAM_PASSWORD",
    ),
    ([], {}, '[upstreams."ghcr.io"]\nusername = "bot"\npassword = ""', "password"),
    ([], {"PULLTHROUGH_WORKERS": "2.5"}, None, "PULLTHROUGH_WORKERS"),
]


@pytest.mark.parametrize(("args", "env", "toml", "names"), CONFIG_ERRORS)
def test_configuration_mistakes_are_one_line_and_exit_2(
    args: list[str], env: dict[str, str], toml: str | None, names: str, tmp_path: Path
) -> None:
    if toml is not None:
        (tmp_path / "pullthrough.toml").write_text(toml + "\n")
        args = [*args, "--config", str(tmp_path / "pullthrough.toml")]
    result = tool("serve", *args, cache=None, env=env, cwd=tmp_path, timeout=20)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pullthrough: ")
    assert names in lines[0]
    assert not (tmp_path / "pullthrough-cache").exists()  # stopped before touching disk


def test_a_tool_with_an_unwritable_cache_dir_exits_2(tmp_path: Path) -> None:
    result = tool("warm", "alpine:3.19", cache=Path("/proc/nope"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "pullthrough: cache_dir /proc/nope cannot be created or written: No such file or directory"
    ]


@pytest.mark.parametrize(
    "command",
    [["cache", "ls"], ["cache", "du"], ["gc"], ["gc", "--delete"], ["export", "alpine", "-o"]],
)
def test_read_only_commands_never_create_a_cache(command: list[str], tmp_path: Path) -> None:
    typo = tmp_path / "pulltrough-cache"
    if command[0] == "export":
        command = [*command, str(tmp_path / "out.tar")]
    result = tool(*command, cache=typo)
    assert result.returncode == 1
    name = " ".join(command[:2]) if command[0] == "cache" else command[0]
    assert result.stderr.splitlines() == [
        f"pullthrough {name}: no cache at {typo} (check --cache-dir)"
    ]
    assert not typo.exists()
    assert not (tmp_path / "out.tar").exists()

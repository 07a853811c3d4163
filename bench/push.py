"""Pushes side by side: pullthrough's hosted repositories and distribution 2.8
(Debian's ``docker-registry``, plain registry, filesystem storage, no auth).

    python -m bench.push              # 1 GiB layer, 12-layer image of 8 MiB layers
    python -m bench.push --size-mib 256

Figures (wall time, best of ``--rounds``; the skopeo copy once): a monolithic upload of one large
incompressible layer (POST, then one PUT streaming the file), the same layer in
chunks (PATCH with Content-Range, 64 MiB each, then PUT), and ``skopeo copy`` of a
12-layer image from a local ``dir:`` into each registry. Everything on loopback.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from tests.support.mirror import MirrorProcess
from tests.support.processes import free_port, wait_ready

MiB = 1 << 20
CHUNK = 64 * MiB
LAYERS = 12
LAYER_SIZE = 8 * MiB


class Distribution:
    """``docker-registry serve`` as a plain registry (what registry:2 runs)."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        work.mkdir(parents=True)
        config = work / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {work / 'storage'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
        )
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_ready(
            self.proc,
            lambda: _ping(self.url),
            what="docker-registry",
            timeout=20,
            log=lambda: "",
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _ping(url: str) -> str | None:
    try:
        return None if _request(url, "GET", "/v2/")[0] == 200 else "not ready"
    except OSError as exc:
        return str(exc)


def _request(
    base: str, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str]]:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=600)
    try:
        conn.request(method, path, body=body, headers=headers or {})  # type: ignore[arg-type]
        resp = conn.getresponse()
        resp.read()
        return resp.status, dict(resp.headers)
    finally:
        conn.close()


class _Slice:
    """A file's bytes ``start`` to ``start + length``, read as http.client sends them."""

    def __init__(self, path: Path, start: int, length: int) -> None:
        self.f = path.open("rb")
        self.f.seek(start)
        self.left = length

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


def _location(headers: dict[str, str]) -> str:
    return headers["Location"].split("://", 1)[-1].partition("/")[2].join(["/", ""])


def push_monolithic(base: str, repo: str, layer: Path, digest: str) -> None:
    status, headers = _request(base, "POST", f"/v2/{repo}/blobs/uploads/")
    assert status == 202, status
    sep = "&" if "?" in _location(headers) else "?"
    size = layer.stat().st_size
    with layer.open("rb") as f:
        status, _ = _request(
            base,
            "PUT",
            f"{_location(headers)}{sep}digest={digest}",
            f,
            {"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )
    assert status == 201, status


def push_chunked(base: str, repo: str, layer: Path, digest: str) -> None:
    status, headers = _request(base, "POST", f"/v2/{repo}/blobs/uploads/")
    assert status == 202, status
    size = layer.stat().st_size
    for start in range(0, size, CHUNK):
        length = min(CHUNK, size - start)
        status, headers = _request(
            base,
            "PATCH",
            _location(headers),
            _Slice(layer, start, length),
            {
                "Content-Length": str(length),
                "Content-Range": f"{start}-{start + length - 1}",
                "Content-Type": "application/octet-stream",
            },
        )
        assert status == 202, status
    sep = "&" if "?" in _location(headers) else "?"
    status, _ = _request(base, "PUT", f"{_location(headers)}{sep}digest={digest}", b"")
    assert status == 201, status


def random_file(path: Path, size: int) -> str:
    hasher = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MiB))
            hasher.update(block)
            f.write(block)
            left -= len(block)
    return "sha256:" + hasher.hexdigest()


def image_dir(path: Path) -> None:
    """A 12-layer OCI image in skopeo's ``dir:`` layout."""
    path.mkdir()
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    (path / config_digest[7:]).write_bytes(config)
    layers = []
    for i in range(LAYERS):
        tmp = path / f"layer-{i}"
        digest = random_file(tmp, LAYER_SIZE)
        tmp.rename(path / digest[7:])
        layers.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": digest,
                "size": LAYER_SIZE,
            }
        )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config),
        },
        "layers": layers,
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "version").write_text("Directory Transport Version: 1.1\n")


def best(rounds: int, run: Callable[[int], None]) -> float:
    times = []
    for i in range(rounds):
        started = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - started)
    return min(times)


def measure(
    base: str, layer: Path, digest: str, image: Path, work: Path, rounds: int
) -> dict[str, float]:
    host = base.removeprefix("http://")
    return {
        "monolithic": best(rounds, lambda i: push_monolithic(base, f"bench/m{i}", layer, digest)),
        "chunked": best(rounds, lambda i: push_chunked(base, f"bench/c{i}", layer, digest)),
        # Once: a second copy of the same image would mount its layers.
        "skopeo": best(1, lambda i: _skopeo(image, f"docker://{host}/bench/image{i}:v1", work)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.push")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pt-bench-push-") as tmp:
        work = Path(tmp)
        layer = work / "layer"
        digest = random_file(layer, args.size_mib * MiB)
        image = work / "image"
        image_dir(image)
        (work / "pt").mkdir()
        mirror = MirrorProcess(
            work / "pt" / "cache",
            "http://127.0.0.1:9",
            env={"PULLTHROUGH_HOSTED": "bench/", "PULLTHROUGH_LOG_LEVEL": "WARNING"},
            args=("--offline",),
        )
        mirror.start()
        registry = Distribution(work / "distribution")
        results: dict[str, dict[str, float]] = {}
        try:
            for name, base in (("distribution", registry.url), ("pullthrough", mirror.url)):
                results[name] = measure(base, layer, digest, image, work, args.rounds)
                print(name, results[name], flush=True)
        finally:
            mirror.stop()
            registry.stop()
    print(f"push of a {args.size_mib} MiB layer and a {LAYERS}x{LAYER_SIZE // MiB} MiB image")
    print("| figure | distribution 2.8 | pullthrough | ratio (pullthrough / distribution) |")
    print("|---|---|---|---|")
    for figure in ("monolithic", "chunked", "skopeo"):
        d, p = results["distribution"][figure], results["pullthrough"][figure]
        print(f"| {figure} | {d:.2f} s | {p:.2f} s | {p / d:.2f} |")
    return 0


def _skopeo(image: Path, dest: str, work: Path) -> None:
    subprocess.run(
        ["skopeo", "--debug", "copy", "--dest-tls-verify=false", f"dir:{image}", dest],
        check=True,
        env={**os.environ, "TMPDIR": str(work)},
        stdout=subprocess.DEVNULL,
        stderr=(work / "skopeo.log").open("a"),
    )
    shutil.rmtree(work / "skopeo", ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

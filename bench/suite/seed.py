"""The content the upstream is seeded with, built here and pushed over HTTP.

- ``bench/ten:1``: ten layers of 512 KiB to 2 MiB (gzip level 1), the cold-pull image;
- ``bench/mid:1``: one 32 MiB layer, the blob 16 clients ask for at once;
- ``bench/big:1``: one layer of 1 GiB (256 MiB with ``--quick``): a real tar.gz
  (gzip level 0, so the random content costs no compression time), written to disk
  while both its digest and its diff_id are computed, and pushed by streaming the
  file; it is never held in memory;
- ``bench/small:t0`` ... ``t199``: small images sharing one layer; only their
  configs, and so their manifests, differ.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

from tests.support import httpclient
from tests.support.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    Blob,
    Image,
    Manifest,
    Pusher,
    build_image_manifest,
    make_image,
    make_layer,
)
from tests.support.tokenserver import DEFAULT_SERVICE, PUSHER, TokenServer

KiB, MiB = 1 << 10, 1 << 20
TEN_LAYER_SIZES = [512 * KiB + i * (1536 * KiB) // 9 for i in range(10)]  # 512 KiB .. 2 MiB
MID_LAYER_SIZE = 32 * MiB
CHUNK = 1 * MiB


@dataclass(frozen=True)
class BigImage:
    """The single-layer image whose layer lives only on disk."""

    name: str
    tag: str
    layer_digest: str
    layer_size: int
    layer_path: Path
    config: Blob
    manifest: Manifest

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"


@dataclass(frozen=True)
class Seeded:
    ten: Image
    mid: Image
    big: BigImage
    small: list[Image]

    @property
    def ten_bytes(self) -> int:
        """What a pull of ``ten`` downloads as blobs: its config and layers."""
        return sum(b.size for b in self.ten.blobs)

    @property
    def mid_digest(self) -> str:
        return self.mid.top.layer_digests[0]


class _Hashing:
    """A write-only file that hashes what goes through it to ``target``."""

    def __init__(self, target: BinaryIO | None) -> None:
        self.target = target
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        if self.target is not None:
            self.target.write(data)
        return len(data)

    def flush(self) -> None:
        if self.target is not None:
            self.target.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def write_big_layer(path: Path, payload_size: int) -> tuple[str, int, str]:
    """A gzip'ed (level 0) tar holding ``payload_size`` random bytes, written to
    ``path`` a MiB at a time; returns its digest, size and diff_id."""
    info = tarfile.TarInfo("bench/big.bin")
    info.size = payload_size
    info.mode = 0o644
    info.mtime = 1_704_067_200
    info.uname = info.gname = "root"
    with path.open("wb") as out:
        compressed = _Hashing(out)
        tar = _Hashing(None)
        with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=0, mtime=0) as gz:

            def put(data: bytes) -> None:
                tar.write(data)
                gz.write(data)

            put(info.tobuf(format=tarfile.USTAR_FORMAT))
            left = payload_size
            while left:
                chunk = os.urandom(min(CHUNK, left))
                put(chunk)
                left -= len(chunk)
            put(b"\0" * (-payload_size % tarfile.BLOCKSIZE))
            put(b"\0" * (2 * tarfile.BLOCKSIZE))  # end of archive
            put(b"\0" * (-tar.size % tarfile.RECORDSIZE))
    return compressed.digest, compressed.size, tar.digest


def push_blob_file(registry_url: str, token: str, name: str, path: Path, digest: str) -> None:
    """A monolithic upload (``POST``, then ``PUT ?digest=``) streamed from ``path``."""
    base = urlsplit(registry_url)
    if base.hostname not in httpclient.LOOPBACK_HOSTS:
        raise ValueError(f"refusing to contact {base.hostname}")
    auth = {"Authorization": f"Bearer {token}", "User-Agent": httpclient.USER_AGENT}
    conn = http.client.HTTPConnection(base.hostname, base.port, timeout=600, blocksize=CHUNK)
    try:
        conn.request("POST", f"/v2/{name}/blobs/uploads/", headers={**auth, "Content-Length": "0"})
        started = conn.getresponse()
        started.read()
        if started.status != 202:
            raise RuntimeError(f"starting the upload of {digest}: {started.status}")
        location = urlsplit(urljoin(registry_url + "/", started.getheader("Location", "")))
        query = urlencode([*parse_qsl(location.query), ("digest", digest)])
        with path.open("rb") as body:
            conn.request(
                "PUT",
                f"{location.path}?{query}",
                body=body,
                headers={
                    **auth,
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(path.stat().st_size),
                },
            )
        done = conn.getresponse()
        text = done.read()
        if done.status != 201:
            raise RuntimeError(f"uploading {digest}: {done.status} {text[:200]!r}")
    finally:
        conn.close()


def seed(
    registry_url: str, tokens: TokenServer, workdir: Path, big_size: int, small: int
) -> Seeded:
    pusher = Pusher(registry_url)

    ten = make_image(
        "bench/ten", "1", seed="bench-ten", layer_sizes=TEN_LAYER_SIZES, compresslevel=1
    )
    mid = make_image(
        "bench/mid", "1", seed="bench-mid", layer_sizes=[MID_LAYER_SIZE], compresslevel=0
    )
    pusher.push(ten)
    pusher.push(mid)

    layer_path = workdir / "big-layer.tar.gz"
    # The tar and gzip framing add a few KiB: the layer is the size asked for, give or take.
    digest, size, diff_id = write_big_layer(layer_path, big_size - 4 * tarfile.BLOCKSIZE)
    token = httpclient.fetch_token(
        tokens.realm,
        service=DEFAULT_SERVICE,
        scopes=["repository:bench/big:pull,push"],
        credentials=PUSHER,
    )
    push_blob_file(registry_url, token, "bench/big", layer_path, digest)
    config = Blob.of(
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            }
        ).encode(),
        DOCKER_CONFIG,
    )
    manifest = Manifest.of(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": config.descriptor(),
            "layers": [{"mediaType": DOCKER_LAYER, "size": size, "digest": digest}],
        }
    )
    pusher.push_blob("bench/big", config)
    pusher.push_manifest("bench/big", "1", manifest)
    big = BigImage("bench/big", "1", digest, size, layer_path, config, manifest)

    shared = make_layer("bench-small", 4096)
    images = []
    for i in range(small):
        top, cfg = build_image_manifest([shared], label=f"bench/small:t{i}")
        images.append(Image("bench/small", f"t{i}", (top,), (cfg, shared.blob), top))
    pusher.push(images[0])  # the shared layer once, before the parallel pushes

    def push_some(batch: list[Image]) -> None:
        own = Pusher(registry_url)
        for image in batch:
            own.push(image)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(push_some, [images[i::4] for i in range(4)]))
    return Seeded(ten=ten, mid=mid, big=big, small=images)

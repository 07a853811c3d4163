"""Where things live under the cache root.

The whole on-disk layout, in one place::

    <root>/
      blobs/<algorithm>/<hex[:2]>/<hex>        committed blob, verified against <hex>
      manifests/<algorithm>/<hex[:2]>/<hex>    committed manifest: one line holding its
                                               media type, then the manifest's bytes
      tmp/<algorithm>-<hex>.partial            a blob being downloaded; its writer holds
                                               an exclusive flock on it for as long as
                                               it runs, readers follow it as it grows
      tmp/<algorithm>-<hex>.size               the expected size of that download,
                                               written once the upstream has answered
      tmp/<random>.tmp                         a manifest or index file being written
      tmp/import-<random>/                     an import's staging folder, locked by it
      tmp/probe-<pid>-<random>.tmp             /readyz's write test, removed at once
                                               (also when the write failed)
      index/                                   diskcache: tag entries, (upstream name,
                                               repository, tag, accept) -> (digest,
                                               media type, time fetched), and the pins
      index/listings/                          diskcache: tag list pages, referrers (LRU)
      index.reserve                            16 MiB set aside, given back when a full
                                               disk keeps the index from opening
                                               (cache/space.py)
      upstreams.json, upstreams/<name>/        the upstreams a server ran with, and the
                                               stores of those with credentials
                                               (cache/stores.py)
      quarantine/<kind>-<algorithm>-<hex>      a blob or manifest found corrupt, moved
                                               out of the serving path (kind: blob or
                                               manifest; mtime: when); never served,
                                               never evicted, safe to delete any time
      scrub.sqlite                             when each blob and manifest was last
                                               re-hashed from disk: (kind, digest) ->
                                               (inode, size, time); the scrub skips
                                               what was verified recently
      scrub.lock                               flock held by the one process scrubbing

A file under ``blobs/`` or ``manifests/`` only ever appears by ``rename`` after its
bytes were verified and fsynced, so a reader never sees a half-written one. What
is on disk can still rot: manifests are re-hashed on every read from disk, blobs
by the background scrub and ``pullthrough cache verify`` (``cache/scrub.py``). Names
are built from validated digests only (``Digest.parse``): no request can name a
path outside the root.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import InvalidDigest


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def scrub_db(self) -> Path:
        return self.root / "scrub.sqlite"

    @property
    def scrub_lock(self) -> Path:
        return self.root / "scrub.lock"

    def quarantined(self, kind: str, digest: Digest) -> Path:
        return self.quarantine / f"{kind}-{digest.algorithm}-{digest.hex}"

    def blob(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex

    def manifest(self, digest: Digest) -> Path:
        return self.root / "manifests" / digest.algorithm / digest.hex[:2] / digest.hex

    def partial(self, digest: Digest) -> Path:
        return self.tmp / f"{digest.algorithm}-{digest.hex}.partial"

    def size_file(self, digest: Digest) -> Path:
        return self.tmp / f"{digest.algorithm}-{digest.hex}.size"

    def probe(self) -> str:
        """ "writable", "full" (no space or quota left) or "not writable": can we
        create, write and remove a file where downloads are written? The probe
        file is removed whatever happens, also when writing it failed."""
        probe = self.tmp / f"probe-{os.getpid()}-{os.urandom(4).hex()}.tmp"
        try:
            try:
                probe.write_bytes(b"ok")
            finally:
                probe.unlink(missing_ok=True)
        except OSError as exc:
            return "full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "not writable"
        return "writable"

    def writable(self) -> bool:
        return self.probe() == "writable"

    def walk(self) -> Iterator[tuple[str, Digest, Path, os.stat_result]]:
        """Every committed blob and manifest: (kind, digest, path, stat), kind
        being "blob" or "manifest". Walks the tree, so not for hot paths."""
        for kind, folder in (("blob", "blobs"), ("manifest", "manifests")):
            top = self.root / folder
            if not top.is_dir():
                continue
            for algorithm in top.iterdir():
                for shard in algorithm.iterdir() if algorithm.is_dir() else ():
                    for path in shard.iterdir() if shard.is_dir() else ():
                        try:
                            digest = Digest.parse(f"{algorithm.name}:{path.name}")
                            st = path.stat()
                        except (InvalidDigest, FileNotFoundError):
                            continue  # not ours, or removed while we looked
                        yield kind, digest, path, st

    def usage(self) -> tuple[int, int, int]:
        """(bytes, blobs, manifests) committed; walks the tree, so not for hot paths."""
        size = blobs = manifests = 0
        for kind, _, _, st in self.walk():
            size += st.st_size
            if kind == "blob":
                blobs += 1
            else:
                manifests += 1
        return size, blobs, manifests

    def create(self) -> None:
        for sub in ("blobs", "manifests", "tmp", "index"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(target: Path, tmp_dir: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``target`` so that readers see all of it or nothing.

    ``durable=False`` skips the fsyncs, for files a crash may lose.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{os.urandom(8).hex()}.tmp"
    try:
        with tmp.open("wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)

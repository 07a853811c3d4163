"""Which store holds an upstream's content, and the cache's record of its upstreams.

A cache root holds one content-addressed store shared by every anonymous
upstream (anyone who can reach the mirror can read all of them anyway, and base
layers are common), and one store per upstream with credentials, so that what
only its credentials can read is never answered under another upstream's name::

    <root>/                          the shared store (see layout.py)
    <root>/upstreams/<name>/         an upstream with credentials ("registry.local_5000")
    <root>/index/                    the tag index, one for all upstreams: its keys
                                     name the upstream ("docker.io", "ghcr.io")
    <root>/upstreams.json            the upstreams a server ran with: name -> url,
                                     credentials or not, store

The server writes ``upstreams.json`` at start-up. The command-line tools read
it, so ``pullthrough cache ls`` with no flags finds what a server configured
with ``--upstream http://...`` or a config file pulled, in the right store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pullthrough.cache.layout import Layout, write_atomic

RECORD = "upstreams.json"
PRIVATE = "upstreams"
# host[:port], as upstream names are validated in proxy/config.py: a name read
# back from the record builds a path, so it is checked again here.
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::[0-9]{1,5})?$")


@dataclass(frozen=True)
class KnownUpstream:
    name: str  # as clients write it: "docker.io", "ghcr.io"
    url: str  # where it was fetched from
    has_credentials: bool


def store_root(root: Path, name: str, has_credentials: bool) -> Path:
    return root / PRIVATE / name.replace(":", "_") if has_credentials else root


def layouts(root: Path, upstreams: Iterable[tuple[str, bool]]) -> dict[str, Layout]:
    """Each upstream's store, by name, from (name, has_credentials) pairs."""
    return {name: Layout(store_root(root, name, creds)) for name, creds in upstreams}


def index_dir(root: Path) -> Path:
    """The tag index, one for all upstreams (its keys name the upstream)."""
    return root / "index"


def private_stores(root: Path) -> list[Layout]:
    """Every store of an upstream with credentials found on disk, configured or not."""
    folder = root / PRIVATE
    if not folder.is_dir():
        return []
    return [Layout(p) for p in sorted(folder.iterdir()) if p.is_dir() and not p.is_symlink()]


def read_record(root: Path) -> dict[str, KnownUpstream]:
    """The upstreams servers on this cache ran with; empty when none was recorded.
    A damaged record is ignored (it only helps tools find content)."""
    try:
        doc = json.loads((root / RECORD).read_bytes())
    except (OSError, ValueError):
        return {}
    entries = doc.get("upstreams") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        return {}
    found = {}
    for name, entry in entries.items():
        if not (isinstance(name, str) and _NAME.match(name) and isinstance(entry, dict)):
            continue
        url, creds = entry.get("url"), entry.get("has_credentials")
        if isinstance(url, str) and isinstance(creds, bool):
            found[name] = KnownUpstream(name, url, creds)
    return found


def record_upstreams(root: Path, upstreams: Iterable[KnownUpstream]) -> None:
    """Add (or update) these upstreams in the record. Upstreams no longer
    configured stay in it: their content is still in the cache."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / f"{RECORD}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # workers start together: one merge at a time
        known = read_record(root)
        now = time.time()
        entries = {
            k.name: {"url": k.url, "has_credentials": k.has_credentials} for k in known.values()
        }
        for up in upstreams:
            entries[up.name] = {
                "url": up.url,
                "has_credentials": up.has_credentials,
                "store": str(store_root(Path(), up.name, up.has_credentials)),
                "recorded_at": now,
            }
        for name, entry in entries.items():
            entry.setdefault("store", str(store_root(Path(), name, bool(entry["has_credentials"]))))
        text = json.dumps({"version": 1, "upstreams": entries}, indent=2, sort_keys=True)
        tmp = root / "tmp"
        tmp.mkdir(exist_ok=True)
        write_atomic(root / RECORD, tmp, text.encode() + b"\n")
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)

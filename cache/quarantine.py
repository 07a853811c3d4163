"""Taking a corrupt file out of the serving path, without touching anyone else's.

A corrupt blob or manifest is moved to ``<root>/quarantine/`` rather than deleted:
the bad copy is what tells a bit flip on a failing disk from a truncation or a
tampered file, and a rename costs nothing (same file system). Nothing serves from
``quarantine/``; the mirror fetches the object again when it is next asked for.

Between hashing a file and moving it, the path may have come to name another file
(the corrupt one was evicted and the digest downloaded again): only the inode that
was hashed is ever moved.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pullthrough.cache.digests import Digest
from pullthrough.cache.layout import Layout

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Corrupt:
    """A blob or manifest whose bytes on disk do not hash to its name."""

    kind: str  # "blob" or "manifest"
    digest: Digest
    detail: str  # what was found instead, for the operator
    # Where it went (a path, or an s3:// URL); None: it had gone (or been
    # replaced) before we could move it.
    moved_to: Path | str | None


def quarantine(layout: Layout, kind: str, digest: Digest, path: Path, inode: int) -> Path | None:
    """Move ``path`` to the quarantine if it is still the file ``inode``.

    Returns where it went, or None when the path no longer names that file.
    """
    if _inode(path) != inode:
        return None
    layout.quarantine.mkdir(parents=True, exist_ok=True)
    # One copy per object: a digest that rots again replaces its older evidence.
    target = layout.quarantined(kind, digest)
    try:
        path.rename(target)
    except FileNotFoundError:
        return None
    if _inode(target) == inode:
        os.utime(target)  # when it was quarantined, for whoever cleans up
        return target
    # A new download replaced the file between our check and the rename: put the
    # good file back unless yet another one is there already (link never clobbers).
    with contextlib.suppress(FileExistsError):
        os.link(target, path)
    target.unlink(missing_ok=True)
    return None


def report(found: Corrupt) -> None:
    """The operator's WARNING for a corrupt object."""
    where = f"moved to {found.moved_to}" if found.moved_to else "already gone"
    log.warning(
        "corrupt %s %s on disk (%s): %s; a miss from now on, fetched again from the "
        "upstream when asked for",
        found.kind,
        found.digest,
        found.detail,
        where,
    )


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None

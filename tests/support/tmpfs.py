"""A small real disk for full-disk tests: a tmpfs of a given size, mounted as root."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.binaries import REQUIRE_ENV, binaries_required


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """``path`` with a tmpfs of ``size`` (``100m``) mounted on it, unmounted after.

    Mounting needs root (CI runs as root): elsewhere the test is skipped, with
    the reason, unless ``REQUIRE_TEST_BINARIES=1`` makes that a failure.
    """
    path.mkdir(parents=True, exist_ok=True)
    reason = ""
    if os.geteuid() != 0:
        reason = "mounting a tmpfs needs root"
    else:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            reason = f"mount -t tmpfs is not permitted here: {done.stderr.strip()}"
    if reason:
        if binaries_required():
            pytest.fail(f"{reason}; {REQUIRE_ENV}=1 makes this an error", pytrace=False)
        pytest.skip(reason)
    try:
        yield path
    finally:
        # Lazy: a process that still holds a file there must not fail the teardown.
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(path: Path) -> Path:
    """Fill the file system under ``path`` to the last byte; returns the filler."""
    filler = path / "filler"
    block = b"\0" * (1 << 20)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (len(block), 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block[:size])
    finally:
        os.close(fd)
    return filler


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize

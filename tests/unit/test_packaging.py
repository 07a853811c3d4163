"""What `pip install .` puts into site-packages: one `pullthrough` package, no
top-level `proxy`, `cache` or `metrics` to collide with anything of those names."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_one_top_level_package(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("pullthrough-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    version = metadata.version("pullthrough")
    assert top == {"pullthrough", f"pullthrough-{version}.dist-info"}
    # The linked folders went in as files, every module of them.
    for module in (
        "proxy/cli.py",
        "proxy/commands/warm.py",
        "cache/blobs.py",
        "metrics/__init__.py",
        # The status page's files, served by the mirror itself.
        "proxy/templates/status.html",
        "proxy/static/status.css",
        "proxy/static/status.js",
        "proxy/static/favicon.svg",
    ):
        assert f"pullthrough/{module}" in names
    entry_points = zipfile.ZipFile(wheel).read(f"pullthrough-{version}.dist-info/entry_points.txt")
    assert b"pullthrough = pullthrough.proxy.cli:main" in entry_points


def test_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pullthrough", "--version"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT / "cache",  # a folder named like a package must not shadow ours
    )
    assert done.stdout == f"pullthrough {metadata.version('pullthrough')}\n"

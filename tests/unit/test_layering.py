"""The import direction: cache/ and metrics/ never reach proxy/ nor aiohttp.web,
and the cache commands do not load the web app (they build paths with cache/)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def loaded_after(modules: list[str]) -> set[str]:
    """The modules a fresh interpreter has loaded after importing ``modules``."""
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print('\\n'.join(sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def package_modules(package: str) -> list[str]:
    return [package] + [
        f"{package}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / package.replace(".", "/"))])
    ]


@pytest.mark.parametrize("package", ["pullthrough.cache", "pullthrough.metrics"])
def test_storage_and_metrics_never_import_the_http_side(package: str) -> None:
    loaded = loaded_after(package_modules(package))
    assert package in loaded
    if package == "pullthrough.cache":  # every module of it, not just the package
        assert len([m for m in loaded if m.startswith(f"{package}.")]) >= 10
    assert not {m for m in loaded if m == "pullthrough.proxy" or m.startswith("pullthrough.proxy.")}
    assert "aiohttp.web" not in loaded


def test_the_cache_commands_do_not_load_the_web_app() -> None:
    loaded = loaded_after(package_modules("pullthrough.proxy.commands"))
    assert "pullthrough.proxy.app" not in loaded
    assert "pullthrough.proxy.routes" not in loaded

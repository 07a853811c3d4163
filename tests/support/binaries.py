"""Finding the external programs the integration tests drive."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_ENV = "REQUIRE_TEST_BINARIES"

_HINTS = {
    "docker-registry": "apt-get install docker-registry",
    "skopeo": "apt-get install skopeo",
    "chromium": "apt-get install chromium",
    "chromedriver": "apt-get install chromium-driver",
}


def binaries_required() -> bool:
    """Whether a missing binary is a failure (CI) rather than a skip (laptops)."""
    return os.environ.get(REQUIRE_ENV, "").strip() == "1"


def require_binary(name: str) -> str:
    """The absolute path of program ``name`` on PATH.

    When it is missing the calling test (or fixture) is skipped, unless
    ``REQUIRE_TEST_BINARIES=1`` is set, in which case it fails.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    hint = _HINTS.get(name)
    reason = f"{name!r} not found on PATH" + (f" (install it: {hint})" if hint else "")
    if binaries_required():
        pytest.fail(f"{reason}; {REQUIRE_ENV}=1 makes this an error", pytrace=False)
    pytest.skip(reason)

"""Debian's headless Chromium, driven by Selenium through Debian's chromedriver
(never a browser a tool downloads), and where its screenshots go."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.support.binaries import require_binary

# Without the network flags Chromium keeps calling out (updates, sync, QUIC probes).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)
ARTIFACTS_ENV = "PYTEST_ARTIFACTS"


def artifacts_dir() -> Path:
    """Where tests leave files for a person to look at: ``$PYTEST_ARTIFACTS``, else
    build/test-artifacts in the checkout (git-ignored)."""
    raw = os.environ.get(ARTIFACTS_ENV)
    root = Path(raw) if raw else Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def chromium(profile: Path, *, width: int = 1280, height: int = 900) -> Iterator[webdriver.Chrome]:
    browser = require_binary("chromium")
    driver_path = require_binary("chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        # --window-size has a floor (500 px wide) that this call has not.
        driver.set_window_size(width, height)
        yield driver
    finally:
        driver.quit()


def run_script(driver: webdriver.Chrome, script: str) -> object:
    """``execute_script``, typed (Selenium leaves it untyped)."""
    result: object = driver.execute_script(script)  # type: ignore[no-untyped-call]
    return result


def console_errors(driver: webdriver.Chrome) -> list[dict[str, object]]:
    """What the page logged at SEVERE: script errors, CSP refusals, failed loads."""
    entries: list[dict[str, object]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [e for e in entries if e.get("level") == "SEVERE"]

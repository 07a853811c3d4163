"""The status page at / in a real browser (Debian's headless Chromium), after
real pulls through a mirror with two workers: what it shows against /metrics."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.integration.test_metrics import scrape, value
from tests.support.browser import artifacts_dir, chromium, console_errors, run_script
from tests.support.mirror import MirrorProcess
from tests.support.registry import Registry
from tests.support.skopeo import Skopeo

# A phone's CSS pixels (a common 6.1" handset).
PHONE = (390, 844)
DESKTOP = (1280, 1000)


def metrics_hit_ratio(url: str) -> tuple[float, float]:
    """(hits, answered) from /metrics, counted here as the README defines them."""
    samples = scrape(url)
    hits = answered = 0.0
    for kind in ("manifest", "blob", "tags"):
        count = {
            r: value(samples, "pullthrough_requests_total", kind=kind, result=r)
            for r in ("hit", "miss", "prefetched", "stale")
        }
        hits += count["hit"] + count["stale"]
        answered += sum(count.values())
    return hits, answered


def status_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/status.json", timeout=10) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
        return doc


def visible_images(rows: list[WebElement]) -> list[str]:
    return [r.get_attribute("data-image") or "" for r in rows if r.is_displayed()]


def test_page_shows_the_pulled_images_and_the_metrics_figures(
    upstream: Registry, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    mirror = MirrorProcess(tmp_path / "cache", upstream.url, workers=2)
    mirror.start()
    try:
        host = mirror.url.removeprefix("http://")
        for name in ("hello:latest", "alpine:3.19", "hello:latest", "ociapp:v1"):
            skopeo_cli.copy(f"docker://{host}/{name}", f"dir:{tmp_path / name}")
        hits, answered = metrics_hit_ratio(mirror.url)
        assert 0 < hits < answered
        ratio = f"{100 * hits / answered:.1f}%"

        async def from_every_worker() -> list[dict[str, Any]]:
            connector = aiohttp.TCPConnector(force_close=True)  # spread over both workers
            async with aiohttp.ClientSession(connector=connector) as session:
                docs = []
                for _ in range(8):
                    async with session.get(f"{mirror.url}/status.json") as resp:
                        assert resp.status == 200
                        docs.append(await resp.json())
                return docs

        # The same figures whichever worker answers, and those of /metrics.
        for doc in asyncio.run(from_every_worker()):
            assert doc["since_start"]["hits"] == hits
            assert doc["since_start"]["answered"] == answered
        doc = status_json(mirror.url)
        images = {r["image"]: r for r in doc["images"]["rows"]}
        assert set(images) == {
            "docker.io/library/hello:latest",
            "docker.io/library/alpine:3.19",
            "docker.io/library/ociapp:v1",
        }
        assert images["docker.io/library/alpine:3.19"]["platforms"] == [
            "linux/amd64",
            "linux/arm64",
        ]
        assert images["docker.io/library/hello:latest"]["platforms"] == ["linux/amd64"]
        # skopeo took one platform: the index's other image was never fetched.
        assert images["docker.io/library/alpine:3.19"]["partial"]
        assert not images["docker.io/library/hello:latest"]["partial"]
        assert not any(r["pinned"] for r in images.values())
        assert doc["upstreams"][0]["state"] == "reachable"
        saved = value(scrape(mirror.url), "pullthrough_served_bytes_total", source="cache")
        assert doc["since_start"]["saved_bytes"] == saved > 0

        stats = subprocess.run(
            [sys.executable, "-m", "pullthrough", "stats", "--url", mirror.url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"hit ratio     {ratio} ({hits:.0f} of {answered:.0f}" in stats

        shots = artifacts_dir()
        with chromium(tmp_path / "chromium", width=DESKTOP[0], height=DESKTOP[1]) as browser:
            browser.get(mirror.url + "/")
            assert browser.find_element(By.ID, "hit-ratio").text == ratio
            rows = browser.find_elements(By.CSS_SELECTOR, "#images tbody tr")
            assert sorted(visible_images(rows)) == sorted(images)
            browser.save_screenshot(str(shots / "status-desktop.png"))

            browser.find_element(By.ID, "search").send_keys("alp")
            assert visible_images(rows) == ["docker.io/library/alpine:3.19"]
            browser.find_element(By.ID, "search").send_keys("x")
            assert visible_images(rows) == []
            assert browser.find_element(By.ID, "no-match").is_displayed()
            browser.find_element(By.ID, "search").clear()
            browser.find_element(By.ID, "search").send_keys(" ")  # an input event: all again
            assert len(visible_images(rows)) == 3

            # Sorted by size, largest first on the second click.
            size = browser.find_element(By.CSS_SELECTOR, "button[data-sort=size]")
            size.click()
            size.click()
            rows = browser.find_elements(By.CSS_SELECTOR, "#images tbody tr")
            sizes = [int(r.get_attribute("data-size") or 0) for r in rows]
            assert sizes == sorted(sizes, reverse=True)

            browser.set_window_size(*PHONE)
            browser.get(mirror.url + "/")
            # Nothing wider than the phone's screen but the tables' own scroll boxes.
            assert run_script(
                browser, "return document.documentElement.scrollWidth <= window.innerWidth"
            )
            browser.save_screenshot(str(shots / "status-phone.png"))
            # Full height, for a person reading the artifact.
            height = run_script(browser, "return document.documentElement.scrollHeight")
            assert isinstance(height, int)
            browser.set_window_size(PHONE[0], height + 120)
            browser.save_screenshot(str(shots / "status-phone-full.png"))

            # CSP violations and script errors land in the console.
            assert console_errors(browser) == []
            html = browser.page_source
        # Every fetched resource is this mirror's own; the only absolute URL is
        # the upstream's address, shown as text.
        refs = re.findall(r"""(?:src|href|action)\s*=\s*["']?([^"'\s>]+)""", html)
        assert len(refs) >= 5  # the icon, style, script and the two links
        assert [r for r in refs if not r.startswith("/") or r.startswith("//")] == []
        assert set(re.findall(r"[a-z][a-z0-9+.-]*://[^\s<\"']+", html)) == {upstream.url}
        for asset in ("status.css", "status.js"):
            with urllib.request.urlopen(f"{mirror.url}/static/{asset}", timeout=10) as resp:
                assert b"://" not in resp.read()
        with urllib.request.urlopen(mirror.url + "/", timeout=10) as resp:
            csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp
        assert "script-src 'self';" in csp
        assert "unsafe-inline" not in csp
    finally:
        mirror.stop()

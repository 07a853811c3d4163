"""The status page at / in a real browser (Debian's headless Chromium), after
real pulls through a mirror with two workers: what it shows against /metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
from aiohttp.test_utils import TestClient
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from pullthrough.cache import stores
from pullthrough.cache.index import TagEntry, TagIndex
from pullthrough.proxy.app import create_app
from pullthrough.proxy.config import AccessRule
from pullthrough.proxy.keys import METRICS
from pullthrough.proxy.mirror import ANY_CLIENT
from tests.integration.test_metrics import scrape, value
from tests.support.browser import artifacts_dir, chromium, console_errors, run_script
from tests.support.faults import FaultRegistry
from tests.support.images import ACCEPT_ALL_MANIFESTS
from tests.support.mirror import MirrorProcess, settings_for
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
    mirror = MirrorProcess(tmp_path / "cache", upstream.url, workers=2, args=("--max-size=64KiB",))
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
        docs = asyncio.run(from_every_worker())
        for doc in docs:
            assert doc["since_start"]["hits"] == hits
            assert doc["since_start"]["answered"] == answered
            # The last hour too: one history, sampled by one worker for all.
            assert (doc["last_hour"]["hits"], doc["last_hour"]["answered"]) == (hits, answered)
            steps = [(p["hits"], p["answered"]) for p in doc["history"]["points"]]
            assert steps == [(p["hits"], p["answered"]) for p in docs[0]["history"]["points"]]
            assert doc["cache"] == docs[0]["cache"]
            # Probed by one worker for all (at most every 30 s).
            assert doc["upstreams"] == docs[0]["upstreams"]
            assert doc["upstreams_checked_at"] == docs[0]["upstreams_checked_at"]
            assert doc["images"]["rows"] == docs[0]["images"]["rows"]
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
        assert doc["cache"]["max_size"] == 64 * 1024
        assert doc["cache"]["used"] == doc["cache"]["bytes"] / (64 * 1024)
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
            shown = {
                k: browser.find_element(By.ID, k).text
                for k in ("hit-ratio", "saved", "cache-bytes")
            }
            now = scrape(mirror.url)
            from_cache = value(now, "pullthrough_served_bytes_total", source="cache")
            print(
                f"page: {shown}; /metrics: hits {hits:.0f} of {answered:.0f} = {ratio}, "
                f"served from cache {from_cache:.0f} B, "
                f"cache {value(now, 'pullthrough_cache_size_bytes'):.0f} B; "
                f"stats: {stats.splitlines()[1]!r}"
            )
            rows = browser.find_elements(By.CSS_SELECTOR, "#images tbody tr")
            assert sorted(visible_images(rows)) == sorted(images)
            browser.save_screenshot(str(shots / "status-desktop.png"))
            height = run_script(browser, "return document.documentElement.scrollHeight")
            assert isinstance(height, int)
            browser.set_window_size(DESKTOP[0], height + 120)
            browser.save_screenshot(str(shots / "status-desktop-full.png"))

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

            # Another pull; the script's refresh shows it without a reload.
            skopeo_cli.copy(f"docker://{host}/hello:latest", f"dir:{tmp_path / 'again'}")
            hits, answered = metrics_hit_ratio(mirror.url)
            ratio = f"{100 * hits / answered:.1f}%"
            browser.execute_async_script("window.pullthroughRefresh().then(arguments[0])")
            assert browser.find_element(By.ID, "hit-ratio").text == ratio
            counts = browser.find_element(By.ID, "hit-counts").text
            assert counts.startswith(f"{hits:.0f} of {answered:.0f} ")
            assert browser.find_element(By.ID, "search").get_attribute("value") == " "

            browser.set_window_size(*PHONE)
            browser.get(mirror.url + "/")
            # Nothing wider than the phone's screen but the tables' own scroll boxes.
            assert run_script(
                browser, "return document.documentElement.scrollWidth <= window.innerWidth"
            )
            assert browser.find_element(By.ID, "hit-ratio").text == ratio
            print(
                f"phone page: {browser.find_element(By.ID, 'hit-ratio').text}, "
                f"{browser.find_element(By.ID, 'hit-counts').text!r}; "
                f"/metrics: {hits:.0f} of {answered:.0f}"
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


def entry(user: str, password: str) -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{user}:{hashed}"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


HOSTILE = "x/<img src=x onerror=alert(1)>"


async def test_the_page_is_behind_the_pull_rules_and_escapes_what_it_shows(
    aiohttp_client: Any, upstream: Registry, tmp_path: Path
) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(
        "".join(f"{entry(u, u)}\n" for u in ("carol", "dave", "eve")), encoding="utf-8"
    )
    rules = (
        AccessRule(repository="library/hello", pull=("carol",)),
        AccessRule(repository="*", pull=("carol", "dave")),
    )
    cache = tmp_path / "cache"
    app = create_app(settings_for(cache, upstream.url, htpasswd=htpasswd, access=rules))
    client: TestClient[Any, Any] = await aiohttp_client(app)
    for name in ("hello/manifests/latest", "alpine/manifests/3.19"):
        headers = {**basic("carol", "carol"), "Accept": ACCEPT_ALL_MANIFESTS}
        resp = await client.get(f"/v2/library/{name}", headers=headers)
        assert resp.status == 200
    # What no client can pull, but a damaged or hostile index could hold.
    hello = upstream.images["library/hello:latest"]
    tags = TagIndex(stores.index_dir(cache.resolve()))
    try:
        fresh = TagEntry(hello.digest, hello.top.media_type, time.time())
        tags.put_sync("docker.io", HOSTILE, "t", ANY_CLIENT, fresh)
    finally:
        tags.close()
    app[METRICS].activity.error("warning", "upstream said <script>alert(2)</script>")

    # Anonymous clients may pull nothing here: a browser is asked to log in.
    for path in ("/", "/status.json"):
        resp = await client.get(path)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Basic ")
        assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
    # A wrong password: asked again (a Bearer challenge would leave a browser stuck).
    resp = await client.get("/", headers=basic("carol", "wrong"))
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Basic ")
    # A user without any pull right is refused, as a pull of theirs would be.
    resp = await client.get("/", headers=basic("eve", "eve"))
    assert resp.status == 403
    assert (await resp.json())["errors"][0]["code"] == "DENIED"

    # Each user sees the images they may pull, and nothing of the others.
    for user, expected in (
        ("carol", {"library/hello:latest", "library/alpine:3.19", HOSTILE + ":t"}),
        ("dave", {"library/alpine:3.19", HOSTILE + ":t"}),
    ):
        resp = await client.get("/status.json", headers=basic(user, user))
        assert resp.status == 200
        doc = await resp.json()
        assert {r["image"].removeprefix("docker.io/") for r in doc["images"]["rows"]} == expected
        page = await client.get("/", headers=basic(user, user))
        assert page.status == 200
        assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
        html = await page.text()
        assert ("library/hello:latest" in html) == (user == "carol")
        # Shown, and only as text.
        assert "x/&lt;img src=x onerror=alert(1)&gt;:t" in html
        assert "<img" not in html
        assert "upstream said &lt;script&gt;alert(2)&lt;/script&gt;" in html
        assert "<script>" not in html


async def test_anonymous_viewers_see_what_anonymous_pulls_get(
    aiohttp_client: Any, upstream: Registry, tmp_path: Path
) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"{entry('carol', 'carol')}\n", encoding="utf-8")
    app = create_app(settings_for(tmp_path / "cache", upstream.url, htpasswd=htpasswd))
    client: TestClient[Any, Any] = await aiohttp_client(app)
    accept = {"Accept": ACCEPT_ALL_MANIFESTS}
    resp = await client.get("/v2/library/hello/manifests/latest", headers=accept)
    assert resp.status == 200  # the default rule: anonymous clients pull public content
    app[METRICS].activity.error("warning", "something about a private repository")
    resp = await client.get("/status.json")
    assert resp.status == 200
    doc = await resp.json()
    assert [r["image"] for r in doc["images"]["rows"]] == ["docker.io/library/hello:latest"]
    assert doc["errors"] is None  # log lines may name any repository: users only
    html = await (await client.get("/")).text()
    assert "something about a private repository" not in html
    resp = await client.get("/status.json", headers=basic("carol", "carol"))
    assert [e["message"] for e in (await resp.json())["errors"]] == [
        "something about a private repository"
    ]


def screenshot_download(url: str, profile: Path) -> None:
    with chromium(profile, width=PHONE[0], height=PHONE[1]) as browser:
        browser.get(url + "/")
        bar = browser.find_element(By.CSS_SELECTOR, ".downloads progress")
        assert (bar.get_attribute("value"), bar.get_attribute("max")) == ("300000", "1024000")
        browser.execute_script("arguments[0].scrollIntoView()", bar)  # type: ignore[no-untyped-call]
        browser.save_screenshot(str(artifacts_dir() / "status-phone-download.png"))
        assert console_errors(browser) == []


async def test_every_worker_shows_a_download_in_flight_with_its_progress(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    # An upstream that holds a blob half-sent: a download in flight for as
    # long as the test needs (a real registry sends it all at once).
    release = asyncio.Event()
    fault = FaultRegistry(stall=release, stall_after=300_000)
    # Docker Hub's allowance, as it sends it with every pull.
    fault.extra_headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "42;w=21600"}
    blob = bytes(range(256)) * 4000
    digest = fault.add_blob(blob)
    server = await aiohttp_server(fault.app())
    mirror = MirrorProcess(tmp_path / "cache", str(server.make_url("")).rstrip("/"), workers=2)
    await asyncio.to_thread(mirror.start)
    connector = aiohttp.TCPConnector(force_close=True)  # spread over both workers
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            pull = asyncio.create_task(session.get(f"{mirror.url}/v2/app/blobs/{digest}"))

            async def downloads() -> list[dict[str, Any]]:
                async with session.get(f"{mirror.url}/status.json") as resp:
                    shown: list[dict[str, Any]] = (await resp.json())["downloads"]
                    return shown

            deadline = time.monotonic() + 10
            while [d["received"] for d in await downloads()] != [300_000]:
                assert time.monotonic() < deadline, "the download was never shown"
                await asyncio.sleep(0.1)
            # Published within a second by whichever worker runs it, read by both.
            await asyncio.sleep(1.5)
            for _ in range(8):
                [shown] = await downloads()
                assert (shown["digest"], shown["repository"]) == (digest, "library/app")
                assert (shown["received"], shown["size"]) == (300_000, len(blob))
            # The pulls left, as the worker that saw them recorded them, on every page.
            for _ in range(4):
                async with session.get(f"{mirror.url}/status.json") as resp:
                    [up] = (await resp.json())["upstreams"]
                assert (up["ratelimit_remaining"], up["ratelimit_limit"]) == (42, 100)
                async with session.get(f"{mirror.url}/") as resp:
                    assert "42 of 100" in await resp.text()
            await asyncio.to_thread(screenshot_download, mirror.url, tmp_path / "chromium")
            release.set()
            resp = await pull
            assert await resp.read() == blob
            deadline = time.monotonic() + 10
            while any([await downloads() for _ in range(4)]):
                assert time.monotonic() < deadline, "a finished download is still shown"
                await asyncio.sleep(0.2)
    finally:
        await asyncio.to_thread(mirror.stop)

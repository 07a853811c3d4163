"""Metrics, stats, health and request logs after known traffic on a real upstream."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pullthrough.proxy.app import create_app
from tests.support.mirror import MirrorProcess, settings_for
from tests.support.registry import Registry
from tests.support.skopeo import Skopeo

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_cold_then_warm_pull_counts_hits_misses_and_bytes(
    upstream: Registry, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    image = upstream.images["library/hello:latest"]
    blobs = image.blobs_of(image.top)
    blob_bytes = sum(b.size for b in blobs)
    mirror = MirrorProcess(tmp_path / "cache", upstream.url)
    mirror.start()
    try:
        ref = f"docker://{mirror.url.removeprefix('http://')}/hello:latest"
        skopeo_cli.copy(ref, f"dir:{tmp_path / 'cold'}")
        cold = scrape(mirror.url)
        # Fetched for this pull: by the client's request, or by read-ahead before it.
        missed = value(cold, "pullthrough_requests_total", kind="blob", result="miss")
        prefetched = value(cold, "pullthrough_requests_total", kind="blob", result="prefetched")
        assert missed + prefetched == len(blobs)
        assert value(cold, "pullthrough_prefetch_used_total") == prefetched
        assert value(cold, "pullthrough_requests_total", kind="blob", result="hit") == 0
        assert value(cold, "pullthrough_served_bytes_total", source="upstream") >= blob_bytes
        host = "docker.io"
        assert (
            value(
                cold,
                "pullthrough_upstream_requests_total",
                upstream=host,
                method="GET",
                status="200",
            )
            == len(blobs) + 1
        )  # the blobs and the manifest, once each
        assert value(cold, "pullthrough_upstream_tokens_fetched_total", upstream=host) == 1
        assert value(cold, "pullthrough_cache_objects", kind="blob") == len(blobs)
        assert value(cold, "pullthrough_cache_size_bytes") >= blob_bytes

        skopeo_cli.copy(ref, f"dir:{tmp_path / 'warm'}")
        warm = scrape(mirror.url)
        assert value(warm, "pullthrough_requests_total", kind="blob", result="hit") == len(blobs)
        saved = value(warm, "pullthrough_served_bytes_total", source="cache") - value(
            cold, "pullthrough_served_bytes_total", source="cache"
        )
        assert saved >= blob_bytes
        upstream_calls = sum(
            v for (name, _), v in warm.items() if name == "pullthrough_upstream_requests_total"
        ) - sum(v for (name, _), v in cold.items() if name == "pullthrough_upstream_requests_total")
        assert upstream_calls == 0
        assert value(warm, "pullthrough_request_duration_seconds_count", kind="blob") == 2 * len(
            blobs
        )

        out = subprocess.run(
            [sys.executable, "-m", "pullthrough", "stats", "--url", mirror.url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "hit ratio" in out
        assert f"{len(blobs)} hit, {len(blobs)} miss" in out
    finally:
        mirror.stop()


def test_workers_report_one_total(upstream: Registry, tmp_path: Path) -> None:
    image = upstream.images["library/hello:latest"]
    mirror = MirrorProcess(tmp_path / "cache", upstream.url, workers=2)
    mirror.start()
    try:

        async def hammer() -> None:
            url = f"{mirror.url}/v2/hello/manifests/{image.digest}"
            connector = aiohttp.TCPConnector(force_close=True)  # spread over both workers
            async with aiohttp.ClientSession(connector=connector) as session:
                for _ in range(30):
                    async with session.get(url) as resp:
                        assert resp.status == 200

        asyncio.run(hammer())
        for _ in range(4):  # whichever worker answers, it reports the whole server
            samples = scrape(mirror.url)
            answered = value(
                samples, "pullthrough_requests_total", kind="manifest", result="hit"
            ) + value(samples, "pullthrough_requests_total", kind="manifest", result="miss")
            assert answered == 30
    finally:
        mirror.stop()


def test_json_request_log_has_the_fields_and_no_credentials(
    upstream: Registry, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    mirror = MirrorProcess(
        tmp_path / "cache",
        upstream.url,
        env={
            "PULLTHROUGH_LOG_FORMAT": "json",
            "PULLTHROUGH_UPSTREAM_USERNAME": "alice",
            "PULLTHROUGH_UPSTREAM_PASSWORD": "wonderland",
        },
    )
    mirror.start()
    try:
        ref = f"docker://{mirror.url.removeprefix('http://')}/private/secret:1"
        skopeo_cli.copy(ref, f"dir:{tmp_path / 'out'}")
        skopeo_cli.copy(ref, f"dir:{tmp_path / 'again'}")
    finally:
        mirror.stop()
    text = mirror.log.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    requests = [r for r in records if r.get("logger") == "pullthrough.access" and "reference" in r]
    assert requests, text
    # A cold blob is a miss, or "prefetched" when read-ahead fetched it first.
    cold = ("miss", "prefetched")
    blob = next(r for r in requests if "/blobs/" in r["path"] and r["result"] in cold)
    assert blob["repository"] == "private/secret"
    assert blob["method"] == "GET"
    assert blob["status"] == 200
    assert blob["bytes"] > 0
    assert blob["duration_ms"] >= 0
    results = {r["result"] for r in requests if "/blobs/" in r["path"]}
    assert "hit" in results
    assert results - {"hit"}
    assert results <= {"hit", *cold}
    assert "wonderland" not in text
    assert "Bearer" not in text


async def test_health_and_readiness(
    aiohttp_client: Any, tmp_path: Path, upstream: Registry
) -> None:
    online: TestClient[Any, Any] = await aiohttp_client(
        create_app(settings_for(tmp_path / "a", upstream.url))
    )
    down: TestClient[Any, Any] = await aiohttp_client(
        create_app(settings_for(tmp_path / "b", "http://127.0.0.1:9"))
    )
    offline: TestClient[Any, Any] = await aiohttp_client(
        create_app(settings_for(tmp_path / "c", "http://127.0.0.1:9", offline=True))
    )
    for client, state in ((online, "reachable"), (down, "unreachable"), (offline, "offline")):
        async with client.get("/healthz") as resp:
            assert resp.status == 200
        async with client.get("/readyz") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ready", "cache": "writable", "upstream": state}
    # A cache that cannot be written to is not ready (root ignores permissions,
    # so put a file where the temp folder should be).
    shutil.rmtree(tmp_path / "a" / "tmp")
    (tmp_path / "a" / "tmp").write_text("not a folder")
    async with online.get("/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json())["cache"] == "not writable"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_format_setting_is_validated(fmt: str) -> None:
    from pullthrough.proxy.config import ConfigError, load_settings

    assert load_settings(environ={"PULLTHROUGH_LOG_FORMAT": fmt}).log_format == fmt
    with pytest.raises(ConfigError, match="log_format"):
        load_settings(environ={"PULLTHROUGH_LOG_FORMAT": "xml"})

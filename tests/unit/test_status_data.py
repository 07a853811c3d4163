"""The status page's shared state: the last-hour history and the table of
downloads and errors, as several worker processes see them through one directory."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pullthrough.metrics import Metrics
from pullthrough.metrics.activity import PREFIX, Activity, ErrorLog
from pullthrough.metrics.history import FILE, History, Point
from pullthrough.metrics.shared import Shared
from pullthrough.metrics.summary import summarize
from pullthrough.proxy.commands.stats import summarize as stats_text
from pullthrough.proxy.status_routes import CHART_HEIGHT, CHART_WIDTH, chart


def at(t: float, hits: float = 0, answered: float = 0) -> Point:
    return Point(t, hits, answered, hits * 10, (answered - hits) * 10)


def test_workers_offering_the_same_minute_keep_one_point(tmp_path: Path) -> None:
    first, second = History(tmp_path), History(tmp_path)
    assert first.offer(at(1000.0))
    assert not second.offer(at(1010.0, 1, 2))  # the same minute, from another worker
    assert second.offer(at(1060.0, 3, 4))
    assert not first.offer(at(1070.0, 5, 6))
    assert first.points() == second.points() == [at(1000.0), at(1060.0, 3, 4)]


def test_the_window_is_the_last_hour_and_ends_with_now(tmp_path: Path) -> None:
    history = History(tmp_path)
    for minute in range(90):
        history.offer(at(60.0 * minute, minute, 2 * minute))
    now = at(60.0 * 90, 90, 180)
    window = history.window(now)
    assert window[0].time == 60.0 * 30
    assert window[-1] == now
    hour = now.minus(window[0])
    assert (hour.time, hour.hits, hour.answered) == (3600.0, 60, 120)
    # Kept a little longer than the window, no more.
    assert len(history.points()) <= 63


def test_an_unreadable_history_starts_again(tmp_path: Path) -> None:
    (tmp_path / FILE).write_text("{not json")
    history = History(tmp_path)
    assert history.points() == []
    assert history.offer(at(5.0))
    assert history.points() == [at(5.0)]


def test_without_a_directory_the_history_is_in_memory() -> None:
    history = History(None)
    assert history.offer(at(0.0))
    assert not history.offer(at(1.0))
    assert history.points() == [at(0.0)]


def test_downloads_and_errors_of_live_workers_are_gathered(tmp_path: Path) -> None:
    mine = Activity(tmp_path)
    with mine.download("docker.io", "library/alpine", "sha256:aa") as download:
        download.size = 100
        download.add(40)
        mine.error("warning", "mine")
        mine.publish()
        # Another live worker's table (this test's parent process stands for it),
        # and one of a worker that is gone.
        other = {
            "downloads": [
                {
                    "upstream": "ghcr.io",
                    "repository": "o/app",
                    "digest": "sha256:bb",
                    "started": 1.0,
                    "size": None,
                    "received": 7,
                }
            ],
            "errors": [{"time": 2.0, "level": "error", "message": "theirs"}],
        }
        (tmp_path / f"{PREFIX}{os.getppid()}.json").write_text(json.dumps(other))
        gone = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        (tmp_path / f"{PREFIX}{gone}.json").write_text(json.dumps(other))
        (tmp_path / f"{PREFIX}junk.json").write_text("[")

        # What a third worker shows.
        downloads, errors = Activity(tmp_path, pid=-1).gather()
        assert [(d.digest, d.received, d.size) for d in downloads] == [
            ("sha256:bb", 7, None),
            ("sha256:aa", 40, 100),
        ]
        assert [e.message for e in errors] == ["mine", "theirs"]
        assert not (tmp_path / f"{PREFIX}{gone}.json").exists()  # cleared away
    mine.publish()
    downloads, _ = mine.gather()
    assert [d.digest for d in downloads] == ["sha256:bb"]  # ours ended
    mine.withdraw()
    assert not (tmp_path / f"{PREFIX}{os.getpid()}.json").exists()


def test_warnings_logged_are_kept_and_cut(tmp_path: Path) -> None:
    activity = Activity()
    logger = logging.getLogger("pullthrough.test-status")
    handler = ErrorLog(activity)
    logger.addHandler(handler)
    try:
        logger.info("not kept")
        logger.warning("upstream %s: %d of %d pulls left", "docker.io", 3, 100)
        logger.error("x" * 2000)
    finally:
        logger.removeHandler(handler)
    _, errors = activity.gather()
    assert [(e.level, e.message[:30]) for e in errors] == [
        ("error", "x" * 30),
        ("warning", "upstream docker.io: 3 of 100 p"),
    ]
    assert len(errors[0].message) == 500


def test_stats_prints_the_figures_the_page_shows() -> None:
    metrics = Metrics()
    metrics.requests.labels("blob", "hit").inc(3)
    metrics.requests.labels("blob", "prefetched").inc(1)
    metrics.requests.labels("manifest", "miss").inc(2)
    metrics.requests.labels("manifest", "error").inc(5)
    metrics.served_bytes.labels("cache").inc(3 << 20)
    metrics.ratelimit_limit.labels("docker.io").set(100)
    metrics.ratelimit_remaining.labels("docker.io").set(42)
    text = metrics.exposition().decode()
    figures = summarize(text)
    assert (figures.hits, figures.answered) == (3, 6)  # errors are not answers
    assert figures.hit_ratio == 0.5
    assert figures.requests["blob"].miss == 1  # a read-ahead download is a miss
    printed = stats_text(text)
    assert "hit ratio     50.0% (3 of 6 answered from cache)" in printed
    assert "bytes saved   3.0 MiB served from cache" in printed
    assert "rate limit    42 of 100 pulls left (docker.io)" in printed


def test_a_shared_measurement_is_taken_by_one_worker_for_all(tmp_path: Path) -> None:
    taken: list[str] = []

    def worker(name: str) -> tuple[Shared[int], Callable[[], int]]:
        def take() -> int:
            taken.append(name)
            return len(taken)

        return Shared(tmp_path / "m.json", 30.0, dump=int, load=int), take

    (first, by_first), (second, by_second) = worker("first"), worker("second")
    assert second.peek() is None
    at, value = first.get(by_first)
    assert second.get(by_second) == (at, value) == first.get(by_first)
    assert taken == ["first"]
    # Too old: whoever asks next measures again, for both.
    (tmp_path / "m.json").write_text(json.dumps({"at": at - 31, "value": 1}))
    assert first.peek() is None
    assert second.get(by_second)[1] == 2
    assert first.get(by_first)[1] == 2
    assert taken == ["first", "second"]
    # Measured elsewhere (an async probe): put for all.
    second.put(7)
    assert first.peek() is not None
    assert first.get(by_first)[1] == 7


def test_the_chart_puts_an_hour_of_minutes_side_by_side() -> None:
    now = 10_000.0
    points = [
        {
            "hits": m,
            "answered": 60,
            "saved_bytes": 100.0 * m,
            "upstream_bytes": 50.0,
            "end": now - (59 - m) * 60,
        }
        for m in range(60)
    ]
    drawn = chart({"time": now, "history": {"points": points}})
    bars = drawn["bars"]
    assert len(bars) == 60
    assert [b["x"] for b in bars] == sorted(b["x"] for b in bars)
    assert bars[0]["x"] >= 0
    assert bars[-1]["x"] + bars[-1]["width"] <= CHART_WIDTH
    tallest = max(bars, key=lambda b: b["cached"] + b["fetched"])
    assert tallest is bars[-1]
    assert tallest["cached"] + tallest["fetched"] == CHART_HEIGHT
    assert tallest["fetched_y"] == 0
    # The hit ratio: a step per minute, from 0 (bottom) rising.
    ys = [float(pair.split(",")[1]) for pair in drawn["line"].split()]
    assert ys[0] == CHART_HEIGHT
    assert ys == sorted(ys, reverse=True)
    assert chart({"time": now, "history": {"points": []}})["bars"] == []


def test_pushes_by_result_and_hosted_storage_are_read_when_a_server_reports_them() -> None:
    text = """# TYPE pullthrough_pushes_total counter
pullthrough_pushes_total{kind="blob",result="ok"} 2.0
pullthrough_pushes_total{kind="blob",result="invalid"} 1.0
pullthrough_pushes_total{kind="manifest",result="ok"} 1.0
pullthrough_pushes_total{kind="manifest",result="denied"} 3.0
# TYPE pullthrough_hosted_repositories gauge
pullthrough_hosted_repositories 1.0
# TYPE pullthrough_hosted_size_bytes gauge
pullthrough_hosted_size_bytes 2048.0
# TYPE pullthrough_hosted_objects gauge
pullthrough_hosted_objects{kind="blob"} 2.0
pullthrough_hosted_objects{kind="manifest"} 1.0
"""
    figures = summarize(text)
    assert figures.pushes == {"blob": 2, "mount": 0, "manifest": 1, "delete": 0}
    assert figures.push_failures == {"denied": 3, "invalid": 1, "error": 0}
    printed = stats_text(text)
    assert "pushes        2 blobs (0 B), 0 mounts, 1 manifests, 0 deletes; failed: " in printed
    assert "3 denied, 1 invalid, 0 error" in printed
    assert "hosted        2.0 KiB in 1 repository (2 blobs, 1 manifests)" in printed
    assert summarize("").hosted is None

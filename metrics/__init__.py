"""Prometheus metrics on a registry of their own (never the global one).

Imports neither aiohttp.web nor proxy: the HTTP side calls these methods.

With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set before they
start), counters and histograms live in shared files and every scrape, whichever
worker answers it, reports the sum over all of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from pullthrough.metrics.activity import Activity
from pullthrough.metrics.history import History
from pullthrough.metrics.shared import Shared

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Request durations: manifests take milliseconds, cold blobs minutes.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True, slots=True)
class CacheUsage:
    size_bytes: int
    blobs: int
    manifests: int


@dataclass(frozen=True, slots=True)
class HostedUsage:
    size_bytes: int  # of the blobs and manifests hosted repositories link, each once
    blobs: int
    manifests: int
    repositories: int


U = TypeVar("U")


class _Measured(Collector, Generic[U]):
    """Gauges measured at scrape time (at most every ``max_age`` seconds, by one
    of the workers for all of them, through ``shared``): ``families`` turns a
    measure into metrics (None: describe)."""

    def __init__(
        self,
        measure: Callable[[], U],
        families: Callable[[U | None], Iterator[Metric]],
        shared: Path | None,
        load: Callable[[Any], U],
        max_age: float = 30.0,
    ) -> None:
        self._measure = measure
        self._families = families
        self.usage: Shared[U] = Shared(shared, max_age, dump=_as_dict, load=load)

    def describe(self) -> Iterator[Metric]:
        # Registering calls describe(), or collect() without it: measure on scrapes only.
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self.usage.get(self._measure)[1])


def _cache_families(usage: CacheUsage | None) -> Iterator[Metric]:
    size = GaugeMetricFamily(
        "pullthrough_cache_size_bytes", "Bytes of blobs and manifests in the cache"
    )
    objects = GaugeMetricFamily(
        "pullthrough_cache_objects", "Blobs and manifests in the cache", labels=["kind"]
    )
    if usage is not None:
        size.add_metric([], usage.size_bytes)
        objects.add_metric(["blob"], usage.blobs)
        objects.add_metric(["manifest"], usage.manifests)
    yield size
    yield objects


def _as_dict(usage: Any) -> Any:
    return asdict(usage)


def _load_cache(raw: Any) -> CacheUsage:
    return CacheUsage(**raw)


def _load_hosted(raw: Any) -> HostedUsage:
    return HostedUsage(**raw)


def _hosted_families(usage: HostedUsage | None) -> Iterator[Metric]:
    size = GaugeMetricFamily(
        "pullthrough_hosted_size_bytes",
        "Bytes of the blobs and manifests hosted repositories hold (each stored once)",
    )
    objects = GaugeMetricFamily(
        "pullthrough_hosted_objects",
        "Blobs and manifests hosted repositories hold",
        labels=["kind"],
    )
    repositories = GaugeMetricFamily(
        "pullthrough_hosted_repositories", "Hosted repositories (those the catalog lists)"
    )
    if usage is not None:
        size.add_metric([], usage.size_bytes)
        objects.add_metric(["blob"], usage.blobs)
        objects.add_metric(["manifest"], usage.manifests)
        repositories.add_metric([], usage.repositories)
    yield size
    yield objects
    yield repositories


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._multiprocess = MULTIPROCESS_ENV in os.environ
        # Measured when scraped, by one worker for all (files beside the counters').
        self._measured: list[Collector] = []
        # The status page's shared state sits beside the counters' files.
        self.shared_dir = Path(os.environ[MULTIPROCESS_ENV]) if self._multiprocess else None
        self.activity = Activity(self.shared_dir)
        self.history = History(self.shared_dir)
        self.requests = Counter(
            "pullthrough_requests",
            "Registry requests served, by kind (manifest, blob, tags, referrers) and result "
            "(hit, prefetched, miss, stale, error)",
            ["kind", "result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "pullthrough_request_duration_seconds",
            "Time to answer a registry request, body included, by kind",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.served_bytes = Counter(
            "pullthrough_served_bytes",
            "Bytes sent to clients, by where they came from (cache: bytes saved upstream)",
            ["source"],
            registry=self.registry,
        )
        self.upstream_requests = Counter(
            "pullthrough_upstream_requests",
            "Requests sent to an upstream registry, by method and HTTP status",
            ["upstream", "method", "status"],
            registry=self.registry,
        )
        self.upstream_redirects = Counter(
            "pullthrough_upstream_redirects",
            "Redirect hops of upstream blob requests, by the status the redirect "
            "target answered (refused: not followed; error: no answer)",
            ["upstream", "status"],
            registry=self.registry,
        )
        self.tokens_fetched = Counter(
            "pullthrough_upstream_tokens_fetched",
            "Tokens fetched from an upstream's token realm",
            ["upstream"],
            registry=self.registry,
        )
        self.downloads_in_flight = Gauge(
            "pullthrough_downloads_in_flight",
            "Blob downloads from the upstream running now",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.coalesced = Counter(
            "pullthrough_coalesced_requests",
            "Requests that joined an upstream fetch another request had started",
            ["kind"],
            registry=self.registry,
        )
        self.ratelimit_limit = Gauge(
            "pullthrough_upstream_ratelimit_limit",
            "Pulls the upstream allows per window (Docker Hub's ratelimit-limit)",
            ["upstream"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.ratelimit_remaining = Gauge(
            "pullthrough_upstream_ratelimit_remaining",
            "Pulls left in the upstream's current window (Docker Hub's ratelimit-remaining)",
            ["upstream"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.stale_served = Counter(
            "pullthrough_stale_served",
            "Answers from the cache because the upstream could not be asked",
            ["reason"],
            registry=self.registry,
        )
        self.prefetch_started = Counter(
            "pullthrough_prefetch_started",
            "Blob downloads read-ahead started after answering an image manifest",
            registry=self.registry,
        )
        self.prefetch_used = Counter(
            "pullthrough_prefetch_used",
            "Client blob requests served from a read-ahead download (finished or running)",
            registry=self.registry,
        )
        self.prefetch_unclaimed_bytes = Gauge(
            "pullthrough_prefetch_unclaimed_bytes",
            "Bytes read-ahead fetched that no client has asked for (yet)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.prefetch_backoffs = Counter(
            "pullthrough_prefetch_backoffs",
            "Times read-ahead paused because the upstream answered 429 or 5xx",
            registry=self.registry,
        )

        self.evictions = Counter(
            "pullthrough_evictions",
            "Blobs and manifests removed to keep the cache under its size and age limits",
            ["kind"],
            registry=self.registry,
        )
        self.evicted_bytes = Counter(
            "pullthrough_evicted_bytes",
            "Bytes removed to keep the cache under its size and age limits",
            registry=self.registry,
        )
        self.scrub_bytes = Counter(
            "pullthrough_scrub_bytes",
            "Bytes of cached blobs and manifests re-hashed by the background scrub",
            registry=self.registry,
        )
        self.scrub_passes = Counter(
            "pullthrough_scrub_passes",
            "Walks of the whole cache the background scrub completed",
            registry=self.registry,
        )
        self.corrupt_objects = Counter(
            "pullthrough_corrupt_objects",
            "Cached blobs and manifests found corrupt on disk and quarantined, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.cache_write_failures = Counter(
            "pullthrough_cache_write_failures",
            "Blobs and manifests served but not kept because the cache could not be "
            "written, by reason (no_space, quota, io, read_only, permission, other)",
            ["reason"],
            registry=self.registry,
        )

        self.pushes = Counter(
            "pullthrough_pushes",
            "What clients pushed to (or deleted from) hosted repositories, by kind "
            "(blob, mount, manifest, delete) and result (ok, denied, invalid, error)",
            ["kind", "result"],
            registry=self.registry,
        )
        self.pushed_bytes = Counter(
            "pullthrough_pushed_bytes",
            "Bytes of blobs uploaded to hosted repositories (mounts not counted)",
            registry=self.registry,
        )

    def watch_cache(self, measure: Callable[[], CacheUsage]) -> None:
        """Report the cache's size, measured by ``measure`` when scraped."""
        self._measured.append(
            _Measured(measure, _cache_families, self._shared("cache-usage.json"), _load_cache)
        )

    def watch_hosted(self, measure: Callable[[], HostedUsage]) -> None:
        """Report what hosted repositories hold, measured by ``measure`` when scraped."""
        self._measured.append(
            _Measured(measure, _hosted_families, self._shared("hosted-usage.json"), _load_hosted)
        )

    def _shared(self, name: str) -> Path | None:
        return None if self.shared_dir is None else self.shared_dir / name

    def exposition(self, *, cache: bool = True) -> bytes:
        """The text format; may walk the cache (not with ``cache=False``), so
        call it off the event loop."""
        registry = CollectorRegistry()
        if self._multiprocess:
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry.register(_Collected(self.registry))
        if cache:
            for collector in self._measured:
                registry.register(collector)
        return generate_latest(registry)


class _Collected(Collector):
    """Another registry's metrics, as one collector of a registry made per scrape."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()

"""Prometheus metrics on a registry of their own (never the global one).

Imports neither aiohttp.web nor proxy: the HTTP side calls these methods.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "pullthrough_requests",
            "Registry requests served, by kind (manifest, blob, tags) and result "
            "(hit, miss, stale, error)",
            ["kind", "result"],
            registry=self.registry,
        )
        self.served_bytes = Counter(
            "pullthrough_served_bytes",
            "Blob and manifest bytes sent to clients, by where they came from",
            ["source"],
            registry=self.registry,
        )
        self.upstream_requests = Counter(
            "pullthrough_upstream_requests",
            "Requests sent to the upstream registry, by method and status class",
            ["method", "status"],
            registry=self.registry,
        )
        self.tokens_fetched = Counter(
            "pullthrough_upstream_tokens_fetched",
            "Tokens fetched from the upstream's token realm",
            registry=self.registry,
        )
        self.downloads_in_flight = Gauge(
            "pullthrough_downloads_in_flight",
            "Blob downloads from the upstream running in this process",
            registry=self.registry,
        )
        self.coalesced = Counter(
            "pullthrough_coalesced_requests",
            "Requests that joined a fetch another request had started",
            ["kind"],
            registry=self.registry,
        )

        self.ratelimit_limit = Gauge(
            "pullthrough_upstream_ratelimit_limit",
            "Pulls the upstream allows per window (Docker Hub's ratelimit-limit)",
            ["upstream"],
            registry=self.registry,
        )
        self.ratelimit_remaining = Gauge(
            "pullthrough_upstream_ratelimit_remaining",
            "Pulls left in the upstream's current window (Docker Hub's ratelimit-remaining)",
            ["upstream"],
            registry=self.registry,
        )
        self.stale_served = Counter(
            "pullthrough_stale_served",
            "Tags answered from the cache because the upstream could not be asked",
            ["reason"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

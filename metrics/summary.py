"""The figures a person reads (hit ratio, bytes saved, ...), computed from the
Prometheus text exposition: `pullthrough stats` and the status page both call
``summarize`` on what /metrics answers, so they cannot disagree with it or with
each other."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from prometheus_client.parser import text_string_to_metric_families

KINDS = ("manifest", "blob", "tags", "referrers")
RESULTS = ("hit", "miss", "prefetched", "stale", "error")
PUSH_KINDS = ("blob", "mount", "manifest", "delete")
# Pushes that failed, by result (a server that counts pushes without a result
# label counts only those that worked).
PUSH_FAILURES = ("denied", "invalid", "error")


@dataclass(frozen=True, slots=True)
class KindCounts:
    hit: float = 0
    miss: float = 0  # read-ahead downloads included: fetched for this pull, only sooner
    prefetched: float = 0  # of the misses, those a read-ahead download served
    stale: float = 0
    error: float = 0

    @property
    def total(self) -> float:
        return self.hit + self.miss + self.stale + self.error


@dataclass(frozen=True, slots=True)
class RateLimit:
    upstream: str
    remaining: float
    limit: float


@dataclass(frozen=True, slots=True)
class Hosted:
    size_bytes: float
    blobs: float
    manifests: float
    repositories: float


@dataclass(frozen=True, slots=True)
class Summary:
    requests: dict[str, KindCounts] = field(default_factory=dict)
    hits: float = 0  # answered from the cache (stale answers included)
    answered: float = 0  # answered at all (errors not)
    saved_bytes: float = 0  # served from the cache: not fetched from an upstream
    upstream_bytes: float = 0  # served as they came from an upstream
    upstream_requests: dict[str, float] = field(default_factory=dict)  # by HTTP status
    tokens: float = 0
    ratelimits: list[RateLimit] = field(default_factory=list)
    stale: float = 0
    cache_bytes: float = 0
    cache_blobs: float = 0
    cache_manifests: float = 0
    pushes: dict[str, float] = field(default_factory=dict)  # that worked, by kind
    push_failures: dict[str, float] = field(default_factory=dict)  # by result
    pushed_bytes: float = 0
    hosted: Hosted | None = None  # None: the server hosts no repositories
    in_flight: float = 0
    coalesced: float = 0

    @property
    def hit_ratio(self) -> float | None:
        """Hits over answers, 0..1; None before the first answer."""
        return self.hits / self.answered if self.answered else None

    def as_json(self) -> dict[str, object]:
        body = asdict(self)
        body["hit_ratio"] = self.hit_ratio
        return body


Samples = dict[str, list[tuple[dict[str, str], float]]]


def samples(text: str) -> Samples:
    found: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name].append((sample.labels, sample.value))
    return found


def summarize(text: str) -> Summary:
    """The figures in a /metrics text exposition."""
    found = samples(text)

    def total(name: str, **match: str) -> float:
        return sum(
            value
            for labels, value in found.get(name, [])
            if all(labels.get(k) == v for k, v in match.items())
        )

    requests = {}
    hits = answered = 0.0
    for kind in KINDS:
        counts = {r: total("pullthrough_requests_total", kind=kind, result=r) for r in RESULTS}
        counts["miss"] += counts["prefetched"]
        requests[kind] = KindCounts(**counts)
        answered += counts["hit"] + counts["miss"] + counts["stale"]
        hits += counts["hit"] + counts["stale"]
    by_status: dict[str, float] = defaultdict(float)
    for labels, value in found.get("pullthrough_upstream_requests_total", []):
        by_status[labels.get("status", "?")] += value
    ratelimits = [
        RateLimit(
            labels.get("upstream", ""),
            remaining,
            total("pullthrough_upstream_ratelimit_limit", upstream=labels.get("upstream", "")),
        )
        for labels, remaining in found.get("pullthrough_upstream_ratelimit_remaining", [])
    ]
    return Summary(
        requests=requests,
        hits=hits,
        answered=answered,
        saved_bytes=total("pullthrough_served_bytes_total", source="cache"),
        upstream_bytes=total("pullthrough_served_bytes_total", source="upstream"),
        upstream_requests=dict(sorted(by_status.items())),
        tokens=total("pullthrough_upstream_tokens_fetched_total"),
        ratelimits=ratelimits,
        stale=total("pullthrough_stale_served_total"),
        cache_bytes=total("pullthrough_cache_size_bytes"),
        cache_blobs=total("pullthrough_cache_objects", kind="blob"),
        cache_manifests=total("pullthrough_cache_objects", kind="manifest"),
        pushes={
            k: total("pullthrough_pushes_total", kind=k)
            - sum(total("pullthrough_pushes_total", kind=k, result=r) for r in PUSH_FAILURES)
            for k in PUSH_KINDS
        },
        push_failures={r: total("pullthrough_pushes_total", result=r) for r in PUSH_FAILURES},
        pushed_bytes=total("pullthrough_pushed_bytes_total"),
        hosted=Hosted(
            total("pullthrough_hosted_size_bytes"),
            total("pullthrough_hosted_objects", kind="blob"),
            total("pullthrough_hosted_objects", kind="manifest"),
            total("pullthrough_hosted_repositories"),
        )
        if "pullthrough_hosted_repositories" in found
        else None,
        in_flight=total("pullthrough_downloads_in_flight"),
        coalesced=total("pullthrough_coalesced_requests_total"),
    )

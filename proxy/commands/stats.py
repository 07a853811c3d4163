"""``pullthrough stats``: a running mirror's metrics, for a person at a terminal."""

from __future__ import annotations

import sys
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from pullthrough.proxy.console import human


def run(url: str) -> int:
    try:
        text = fetch(url)
    except (OSError, ValueError) as exc:
        print(f"pullthrough: cannot read {url}/metrics: {exc}", file=sys.stderr)
        return 1
    print(f"pullthrough at {url}")
    print(summarize(text))
    return 0


def fetch(url: str, timeout: float = 10.0) -> str:
    target = url.rstrip("/") + "/metrics"
    if not target.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url}")
    with urllib.request.urlopen(target, timeout=timeout) as resp:  # noqa: S310 - checked above
        text: str = resp.read().decode()
        return text


def summarize(text: str) -> str:
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))

    def total(name: str, **match: str) -> float:
        return sum(
            value
            for labels, value in samples.get(name, [])
            if all(labels.get(k) == v for k, v in match.items())
        )

    lines = []
    answered = hits = 0.0
    for kind, plural in (
        ("manifest", "manifests"),
        ("blob", "blobs"),
        ("tags", "tag lists"),
        ("referrers", "referrers"),
    ):
        counts = {
            r: total("pullthrough_requests_total", kind=kind, result=r)
            for r in ("hit", "miss", "stale", "error", "prefetched")
        }
        # A blob served from a read-ahead download was fetched for this pull: a
        # miss, only a faster one.
        prefetched = counts.pop("prefetched")
        counts["miss"] += prefetched
        if sum(counts.values()):
            ahead = f" ({prefetched:.0f} read ahead)" if prefetched else ""
            lines.append(
                f"  {plural:<10} {counts['hit']:.0f} hit, {counts['miss']:.0f} miss{ahead}, "
                f"{counts['stale']:.0f} stale, {counts['error']:.0f} error"
            )
        answered += counts["hit"] + counts["miss"] + counts["stale"]
        hits += counts["hit"] + counts["stale"]
    ratio = f"{100 * hits / answered:.1f}%" if answered else "n/a (no requests yet)"
    lines.insert(0, f"hit ratio     {ratio} ({hits:.0f} of {answered:.0f} answered from cache)")
    lines.insert(1, "requests")
    saved = total("pullthrough_served_bytes_total", source="cache")
    fetched = total("pullthrough_served_bytes_total", source="upstream")
    lines.append(f"bytes saved   {human(saved)} served from cache, {human(fetched)} from upstream")
    by_status: dict[str, float] = defaultdict(float)
    for labels, value in samples.get("pullthrough_upstream_requests_total", []):
        by_status[labels.get("status", "?")] += value
    statuses = ", ".join(f"{k}: {v:.0f}" for k, v in sorted(by_status.items()))
    lines.append(
        f"upstream      {sum(by_status.values()):.0f} requests ({statuses or 'none'}), "
        f"{total('pullthrough_upstream_tokens_fetched_total'):.0f} tokens"
    )
    for labels, remaining in samples.get("pullthrough_upstream_ratelimit_remaining", []):
        host = labels.get("upstream", "")
        limit = total("pullthrough_upstream_ratelimit_limit", upstream=host)
        lines.append(f"rate limit    {remaining:.0f} of {limit:.0f} pulls left ({host})")
    stale = total("pullthrough_stale_served_total")
    if stale:
        lines.append(f"stale         {stale:.0f} answers while the upstream could not be asked")
    lines.append(
        f"cache         {human(total('pullthrough_cache_size_bytes'))} in "
        f"{total('pullthrough_cache_objects', kind='blob'):.0f} blobs, "
        f"{total('pullthrough_cache_objects', kind='manifest'):.0f} manifests"
    )
    pushes = {
        k: total("pullthrough_pushes_total", kind=k, result="ok")
        for k in ("blob", "mount", "manifest", "delete")
    }
    failed = {
        r: total("pullthrough_pushes_total", result=r) for r in ("denied", "invalid", "error")
    }
    if sum(pushes.values()) + sum(failed.values()):
        lines.append(
            f"pushes        {pushes['blob']:.0f} blobs "
            f"({human(total('pullthrough_pushed_bytes_total'))}), {pushes['mount']:.0f} mounts, "
            f"{pushes['manifest']:.0f} manifests, {pushes['delete']:.0f} deletes; failed: "
            f"{failed['denied']:.0f} denied, {failed['invalid']:.0f} invalid, "
            f"{failed['error']:.0f} error"
        )
    if "pullthrough_hosted_repositories" in samples:
        repositories = total("pullthrough_hosted_repositories")
        lines.append(
            f"hosted        {human(total('pullthrough_hosted_size_bytes'))} in "
            f"{repositories:.0f} {'repository' if repositories == 1 else 'repositories'} "
            f"({total('pullthrough_hosted_objects', kind='blob'):.0f} blobs, "
            f"{total('pullthrough_hosted_objects', kind='manifest'):.0f} manifests)"
        )
    lines.append(
        f"in flight     {total('pullthrough_downloads_in_flight'):.0f} downloads, "
        f"{total('pullthrough_coalesced_requests_total'):.0f} requests coalesced so far"
    )
    return "\n".join(lines)

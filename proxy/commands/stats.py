"""``pullthrough stats``: a running mirror's metrics, for a person at a terminal."""

from __future__ import annotations

import sys
import urllib.request

from pullthrough.metrics.summary import summarize as figures
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


PLURALS = {"manifest": "manifests", "blob": "blobs", "tags": "tag lists"}


def summarize(text: str) -> str:
    """The figures of a /metrics exposition, as the status page shows them."""
    s = figures(text)
    lines = []
    ratio = f"{100 * s.hit_ratio:.1f}%" if s.hit_ratio is not None else "n/a (no requests yet)"
    lines.append(f"hit ratio     {ratio} ({s.hits:.0f} of {s.answered:.0f} answered from cache)")
    lines.append("requests")
    for kind, counts in s.requests.items():
        if counts.total:
            ahead = f" ({counts.prefetched:.0f} read ahead)" if counts.prefetched else ""
            lines.append(
                f"  {PLURALS.get(kind, kind):<10} {counts.hit:.0f} hit, "
                f"{counts.miss:.0f} miss{ahead}, {counts.stale:.0f} stale, "
                f"{counts.error:.0f} error"
            )
    lines.append(
        f"bytes saved   {human(s.saved_bytes)} served from cache, "
        f"{human(s.upstream_bytes)} from upstream"
    )
    statuses = ", ".join(f"{k}: {v:.0f}" for k, v in s.upstream_requests.items())
    lines.append(
        f"upstream      {sum(s.upstream_requests.values()):.0f} requests "
        f"({statuses or 'none'}), {s.tokens:.0f} tokens"
    )
    for limit in s.ratelimits:
        lines.append(
            f"rate limit    {limit.remaining:.0f} of {limit.limit:.0f} pulls left "
            f"({limit.upstream})"
        )
    if s.stale:
        lines.append(f"stale         {s.stale:.0f} answers while the upstream could not be asked")
    lines.append(
        f"cache         {human(s.cache_bytes)} in {s.cache_blobs:.0f} blobs, "
        f"{s.cache_manifests:.0f} manifests"
    )
    failed = s.push_failures
    if sum(s.pushes.values()) + sum(failed.values()):
        lines.append(
            f"pushes        {s.pushes['blob']:.0f} blobs ({human(s.pushed_bytes)}), "
            f"{s.pushes['mount']:.0f} mounts, {s.pushes['manifest']:.0f} manifests, "
            f"{s.pushes['delete']:.0f} deletes; failed: {failed['denied']:.0f} denied, "
            f"{failed['invalid']:.0f} invalid, {failed['error']:.0f} error"
        )
    if s.hosted is not None:
        count = s.hosted.repositories
        lines.append(
            f"hosted        {human(s.hosted.size_bytes)} in {count:.0f} "
            f"{'repository' if count == 1 else 'repositories'} "
            f"({s.hosted.blobs:.0f} blobs, {s.hosted.manifests:.0f} manifests)"
        )
    lines.append(
        f"in flight     {s.in_flight:.0f} downloads, {s.coalesced:.0f} requests coalesced so far"
    )
    return "\n".join(lines)

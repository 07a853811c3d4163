"""Results: the metrics, the JSON document, the markdown table and the targets."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PT, PEER, NGINX, UPSTREAM = "pullthrough", "peer", "nginx", "upstream"
HIGHER, LOWER, EXACT = "higher", "lower", "exact"
BUSY_CORES = 0.25


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    better: str  # HIGHER, LOWER or EXACT (a count or ratio with one right value)
    reference: str | None  # NGINX or UPSTREAM: the third column, when there is one
    values: dict[str, float | None] = field(default_factory=dict)

    def value(self, who: str | None) -> float | None:
        return None if who is None else self.values.get(who)

    def ratio(self, other: str | None) -> float | None:
        mine, theirs = self.value(PT), self.value(other)
        if mine is None or theirs is None or theirs == 0:
            return None
        return mine / theirs

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "unit": self.unit,
            "better": self.better,
            "reference": self.reference,
            "values": self.values,
            "ratio_vs_peer": self.ratio(PEER),
            "ratio_vs_reference": self.ratio(self.reference),
        }


def _metrics() -> list[Metric]:
    m = [
        Metric("warm_blob_1_stream", "warm blob, 1 stream", "MiB/s", HIGHER, NGINX),
        Metric("warm_blob_4_streams", "warm blob, 4 streams", "MiB/s", HIGHER, NGINX),
    ]
    for kind in ("tag", "digest"):
        m += [
            Metric(
                f"warm_manifest_{kind}_rps", f"warm manifest by {kind}", "req/s", HIGHER, UPSTREAM
            ),
            Metric(
                f"warm_manifest_{kind}_p50", f"warm manifest by {kind}, p50", "ms", LOWER, UPSTREAM
            ),
            Metric(
                f"warm_manifest_{kind}_p99", f"warm manifest by {kind}, p99", "ms", LOWER, UPSTREAM
            ),
        ]
    m += [
        Metric("cold_pull", "cold pull, 10 layers (median)", "s", LOWER, UPSTREAM),
        Metric("cold_big_ttfb", "cold big blob, time to first byte", "s", LOWER, UPSTREAM),
        Metric("cold_big_total", "cold big blob, whole GET", "s", LOWER, UPSTREAM),
        Metric("coalesced_upstream_gets", "upstream GETs, 16 concurrent cold", "GETs", EXACT, None),
        Metric("cold_pull_upstream_bytes", "upstream bytes, cold pull / image", "x", EXACT, None),
        Metric("peak_rss_cold_big", "peak RSS, cold big blob", "MiB", LOWER, None),
        Metric("peak_rss_manifest_load", "peak RSS, manifest load", "MiB", LOWER, None),
    ]
    return m


@dataclass
class Results:
    machine: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=lambda: {m.key: m for m in _metrics()})
    details: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    #: CPU other processes used (in cores) during each measurement, and steal.
    load: dict[str, dict[str, Any]] = field(default_factory=dict)
    elapsed: float = 0.0

    def set(self, key: str, who: str, value: float | None) -> None:
        metric = self.metrics[key]
        metric.values[who] = value
        shown = "-" if value is None else _fmt(value)
        print(f"  {metric.label}: {who} {shown} {metric.unit}", flush=True)

    def get(self, key: str, who: str | None) -> float | None:
        return self.metrics[key].value(who)

    def document(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "params": self.params,
            "metrics": {k: m.as_dict() for k, m in self.metrics.items()},
            "targets": [
                {"target": t, "met": met, "detail": detail} for t, met, detail in targets(self)
            ],
            "details": self.details,
            "errors": self.errors,
            "phase_seconds": self.phases,
            "other_load": self.load,
            "elapsed_seconds": self.elapsed,
        }

    def write(self, out: Path, name: str = "latest") -> tuple[Path, Path]:
        out.mkdir(parents=True, exist_ok=True)
        as_json, as_md = out / f"{name}.json", out / f"{name}.md"
        as_json.write_text(json.dumps(self.document(), indent=1, default=str) + "\n")
        as_md.write_text(markdown(self))
        return as_json, as_md


# -- formatting ---------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if float(value).is_integer():
        return f"{int(value):,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.01:
        return f"{value:.3g}"
    return f"{value:.2g}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


_ARROW = {HIGHER: " (more is better)", LOWER: " (less is better)", EXACT: ""}


def markdown(results: Results) -> str:
    machine, params = results.machine, results.params
    lines = [
        "# pullthrough benchmark",
        "",
        f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"{machine.get('memory_gib', '?')} GiB, Linux {machine.get('kernel', '?')}, "
        f"Python {machine.get('python', '?')}; pullthrough {machine.get('pullthrough', '?')}, "
        f"{params.get('workers', '?')} worker(s); "
        f"{'quick run' if params.get('quick') else 'full run'}, big blob "
        f"{params.get('big_blob_bytes', 0) / (1 << 20):.0f} MiB, loads of "
        f"{params.get('load_seconds', '?')} s; {results.elapsed:.0f} s in all.",
        "",
        "| metric | pullthrough | peer | nginx/upstream | ratio vs peer "
        "| ratio vs nginx/upstream |",
        "|---|---|---|---|---|---|",
    ]
    for m in results.metrics.values():
        reference = m.value(m.reference)
        shown_ref = "-" if reference is None else f"{_fmt(reference)} ({m.reference})"
        lines.append(
            f"| {m.label}, {m.unit}{_ARROW[m.better]} | {_fmt(m.value(PT))} "
            f"| {_fmt(m.value(PEER))} | {shown_ref} | {_ratio(m.ratio(PEER))} "
            f"| {_ratio(m.ratio(m.reference))} |"
        )
    trials = results.details.get("warm_blob")
    if trials:
        lines += ["", "Warm blob trials, MiB/s (the table shows their median):", ""]
        lines += [
            f"- {k}: {', '.join(_fmt(v) for v in vs)}"
            for k, vs in trials.items()
            if not k.endswith("cores")
        ]
    lines += ["", "Targets:", ""]
    for target, met, detail in targets(results):
        verdict = {True: "met", False: "NOT met", None: "not measured"}[met]
        lines.append(f"- **{verdict}**: {target} ({detail})")
    busy = {
        k: v for k, v in results.load.items() if k != "whole run" and v["other_cores"] > BUSY_CORES
    }
    whole = results.load.get("whole run")
    if whole is not None:
        lines += [
            "",
            f"Other processes used {whole['other_cores']:.2f} cores on average during the run "
            f"(steal {whole['steal_cores']:.2f}).",
        ]
    if busy:
        lines += [
            "",
            f"Measurements during which other processes used over {BUSY_CORES} cores "
            "(their figures are suspect):",
            "",
        ]
        lines += [
            f"- {k}: {v['other_cores']:.2f} cores (busiest: {v['busiest_others']})"
            for k, v in busy.items()
        ]
    if results.errors:
        lines += ["", "Errors (these figures are missing or suspect):", ""]
        lines += [f"- {phase}: {error}" for phase, error in results.errors.items()]
    return "\n".join(lines) + "\n"


# -- targets ------------------------------------------------------------------------------


def _verdict(ok: bool, measured: bool) -> bool | None:
    """False when a measured part fails; None when nothing failed but a part is missing."""
    if not ok:
        return False
    return True if measured else None


def targets(r: Results) -> list[tuple[str, bool | None, str]]:
    """Each target of the issue: its wording, met (``None``: not measured), the numbers."""
    out: list[tuple[str, bool | None, str]] = []

    # Warm blob throughput >= 0.9x nginx and >= 1.0x peer, for 1 and 4 streams.
    parts, ok, measured = [], True, True
    for key, label in (("warm_blob_1_stream", "1 stream"), ("warm_blob_4_streams", "4 streams")):
        m = r.metrics[key]
        vs_nginx, vs_peer = m.ratio(NGINX), m.ratio(PEER)
        if vs_nginx is None or vs_peer is None:
            parts.append(f"{label}: not measured")
            measured = False
            continue
        parts.append(f"{label}: {vs_nginx:.2f}x nginx, {vs_peer:.2f}x peer")
        ok = ok and vs_nginx >= 0.9 and vs_peer >= 1.0
    out.append(
        (
            "warm blob throughput >= 0.9x nginx and >= 1.0x peer",
            _verdict(ok, measured),
            "; ".join(parts),
        )
    )

    # Warm manifest req/s >= 1.0x peer, p99 no worse; by tag and by digest.
    parts, ok, measured = [], True, True
    for kind in ("tag", "digest"):
        rps, p99 = r.metrics[f"warm_manifest_{kind}_rps"], r.metrics[f"warm_manifest_{kind}_p99"]
        rps_ratio = rps.ratio(PEER)
        mine_p99, peer_p99 = p99.value(PT), p99.value(PEER)
        if rps_ratio is None or mine_p99 is None or peer_p99 is None:
            parts.append(f"by {kind}: not measured")
            measured = False
            continue
        parts.append(
            f"by {kind}: {rps_ratio:.2f}x req/s, p99 {_fmt(mine_p99)} vs {_fmt(peer_p99)} ms"
        )
        ok = ok and rps_ratio >= 1.0 and mine_p99 <= peer_p99
    out.append(
        (
            "warm manifest req/s >= 1.0x peer, p99 no worse",
            _verdict(ok, measured),
            "; ".join(parts),
        )
    )

    cold = r.metrics["cold_pull"]
    ratio = cold.ratio(UPSTREAM)
    out.append(
        (
            "cold pull <= 1.05x upstream",
            None if ratio is None else ratio <= 1.05,
            "not measured"
            if ratio is None
            else f"{ratio:.2f}x: {_fmt(cold.value(PT))} s vs {_fmt(cold.value(UPSTREAM))} s; "
            f"peer {_fmt(cold.value(PEER))} s",
        )
    )

    moved = r.get("cold_pull_upstream_bytes", PT)
    out.append(
        (
            "upstream bytes for a cold pull = 1.0x the image",
            None if moved is None else abs(moved - 1.0) < 1e-9,
            "not measured"
            if moved is None
            else f"{moved:.3f}x; peer {_fmt(r.get('cold_pull_upstream_bytes', PEER))}x",
        )
    )

    gets = r.get("coalesced_upstream_gets", PT)
    out.append(
        (
            "16 concurrent cold requests -> 1 upstream GET",
            None if gets is None else gets == 1,
            "not measured"
            if gets is None
            else f"{gets:.0f}; peer {_fmt(r.get('coalesced_upstream_gets', PEER))}",
        )
    )

    big, load = r.get("peak_rss_cold_big", PT), r.get("peak_rss_manifest_load", PT)
    known = [v for v in (big, load) if v is not None]
    mine = [v for k, v in r.details.get("memory", {}).items() if k.endswith(f", {PT}")]
    tree = ""
    if mine:
        tree = (
            f"; {max(m['processes'] for m in mine)} process(es), "
            f"peak PSS {_fmt(max(m['peak_pss_mib'] for m in mine))} MiB"
        )
    out.append(
        (
            "peak RSS <= 100 MiB",
            None if not known else max(known) <= 100,
            f"cold big blob {_fmt(big)} MiB, manifest load {_fmt(load)} MiB{tree}",
        )
    )
    return out


# -- the machine --------------------------------------------------------------------------


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"? ({exc})"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def machine(binaries: dict[str, str]) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
        platform.processor() or "?",
    )
    meminfo = Path("/proc/meminfo").read_text()
    total_kib = next(int(ln.split()[1]) for ln in meminfo.splitlines() if ln.startswith("MemTotal"))
    commit = _first_line(["git", "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    import aiohttp  # the version of what serves pullthrough

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(total_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "pullthrough": commit + (" (with uncommitted changes)" if dirty else ""),
        "distribution": _first_line([binaries["docker-registry"], "--version"]),
        "nginx": _first_line([binaries["nginx"], "-v"]),
        "wrk": _first_line([binaries["wrk"], "-v"]),
        "skopeo": _first_line([binaries["skopeo"], "--version"]),
        "curl": _first_line([binaries["curl"], "--version"]),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }

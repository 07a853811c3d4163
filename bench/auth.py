"""What logins and HTTPS cost: side by side in one run (``python -m bench.auth``).

Three mirrors of one upstream, warmed first, each pinned to the server core:

- ``plain``: HTTP, no users (as before this feature);
- ``auth``: HTTP with an htpasswd file; wrk sends Basic credentials (what a
  containerd ``hosts.toml`` header or k3s ``registries.yaml`` auth sends on every
  request) and, in a second run, a bearer token from ``/token`` (docker, podman);
- ``tls``: HTTPS (an ECDSA P-256 certificate), no users.

Figures: manifest requests a second by digest (``wrk -c32``) for plain, Basic and
Bearer, and their ratios (target: auth >= 0.8x plain); blob MiB a second for one
and four streams of a cached blob over HTTP and HTTPS (reported). Each is the
median of three interleaved 5 s rounds.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path

import bcrypt

from bench.run import ACCEPT, SERVER_CORE, MiB, machine, pin, seed, start_upstream, wrk
from tests.support.mirror import MirrorProcess
from tests.support.pki import LocalCA

USER, PASSWORD = "bench", "bench-password"
# htpasswd -B's default cost; what an operator's file holds.
COST = 10


def lua(path: Path, headers: dict[str, str]) -> Path:
    path.write_text("".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items()))
    return path


def curl(url: str, *args: str) -> bytes:
    return subprocess.run(["curl", "-sf", *args, url], capture_output=True, check=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.auth")
    parser.add_argument("--quick", action="store_true", help="3 s loads, 64 MiB blob")
    args = parser.parse_args(argv)
    seconds = 3 if args.quick else 5
    rounds = 1 if args.quick else 3
    big_size = (64 if args.quick else 256) * MiB
    results: dict[str, float] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="pt-bench-auth-") as tmp:
        work = Path(tmp)
        upstream = start_upstream(stack, work)
        print("seeding the upstream...", flush=True)
        seeded = seed(upstream, work, big_size, 1)
        ca = LocalCA(work / "ca")
        cert, key = work / "server.crt", work / "server.key"
        ca.issue("bench", cert, key)
        users = work / "htpasswd"
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=COST)).decode()
        users.write_text(f"{USER}:$2y${hashed.removeprefix('$2b$')}\n")

        def mirror(name: str, *flags: str, tls: bool = False) -> MirrorProcess:
            (work / name).mkdir()
            process = MirrorProcess(
                work / name / "cache",
                upstream.url,
                env={"PULLTHROUGH_LOG_LEVEL": "WARNING"},
                args=flags,
                ca=ca.cert_path if tls else None,
            )
            process.start()
            assert process.proc is not None
            pin(process.proc.pid, SERVER_CORE)
            stack.callback(process.stop)
            return process

        plain = mirror("plain")
        auth = mirror("auth", f"--htpasswd={users}")
        tls = mirror("tls", f"--tls-cert={cert}", f"--tls-key={key}", tls=True)

        basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        token = json.loads(curl(f"{auth.url}/token", "-H", f"Authorization: {basic}"))["token"]
        manifest = seeded.ten_layers.top.digest
        path = f"/v2/bench/ten/manifests/{manifest}"
        blob = f"/v2/bench/big/blobs/{seeded.big_digest}"
        cacert = ("--cacert", str(ca.cert_path))
        for server, extra in (
            (plain, ()),
            (auth, ("-H", f"Authorization: {basic}")),
            (tls, cacert),
        ):
            curl(f"{server.url}{path}", "-o", "/dev/null", "-H", f"Accept: {ACCEPT}", *extra)
            curl(f"{server.url}{blob}", "-o", "/dev/null", *extra)

        print("manifest requests...", flush=True)
        scripts = {
            "plain": (plain, lua(work / "plain.lua", {"Accept": ACCEPT})),
            "basic": (auth, lua(work / "basic.lua", {"Accept": ACCEPT, "Authorization": basic})),
            "bearer": (
                auth,
                lua(work / "bearer.lua", {"Accept": ACCEPT, "Authorization": f"Bearer {token}"}),
            ),
            "tls": (tls, lua(work / "tls.lua", {"Accept": ACCEPT})),
        }
        # Interleaved rounds, medians: other work on a shared machine then
        # weighs on every variant alike instead of on whichever ran during it.
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in scripts}
        for _ in range(rounds):
            for name, (server, script) in scripts.items():
                out = wrk(f"{server.url}{path}", connections=32, seconds=seconds, script=script)
                if out["errors"]:
                    raise RuntimeError(f"{name}: {out['errors']:.0f} non-2xx answers")
                runs[name].append(out)
                print(f"  {name}: {out}", flush=True)
        for name, outs in runs.items():
            results[f"manifest_rps_{name}"] = statistics.median(
                o["requests_per_second"] for o in outs
            )
            results[f"manifest_p99_ms_{name}"] = statistics.median(
                o.get("p99_ms", 0.0) for o in outs
            )

        print("blob throughput...", flush=True)
        for streams in (1, 4):
            speeds: dict[str, list[float]] = {"http": [], "https": []}
            for _ in range(rounds):
                for name, server in (("http", plain), ("https", tls)):
                    out = wrk(
                        f"{server.url}{blob}", connections=streams, seconds=seconds, script=None
                    )
                    if out["errors"]:
                        raise RuntimeError(f"{name}: {out['errors']:.0f} non-2xx answers")
                    speeds[name].append(out["bytes_per_second"] / MiB)
                    print(f"  {name} x{streams}: {speeds[name][-1]:.0f} MiB/s", flush=True)
            for name, values in speeds.items():
                results[f"blob_mib_s_{streams}_stream_{name}"] = statistics.median(values)

    info = machine()
    print(f"\n{info.get('cpu')}, {info.get('cores')} cores, Python {info.get('python')}")
    print("| figure | value |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:,.1f} |")
    ratios = {
        "basic / plain manifest req/s": results["manifest_rps_basic"]
        / results["manifest_rps_plain"],
        "bearer / plain manifest req/s": results["manifest_rps_bearer"]
        / results["manifest_rps_plain"],
        "https / http manifest req/s": results["manifest_rps_tls"] / results["manifest_rps_plain"],
        "https / http blob MiB/s, 1 stream": results["blob_mib_s_1_stream_https"]
        / results["blob_mib_s_1_stream_http"],
        "https / http blob MiB/s, 4 streams": results["blob_mib_s_4_stream_https"]
        / results["blob_mib_s_4_stream_http"],
    }
    for name, ratio in ratios.items():
        print(f"| {name} | {ratio:.2f}x |")
    met = min(ratios["basic / plain manifest req/s"], ratios["bearer / plain manifest req/s"])
    print(f"\ntarget auth >= 0.8x plain: {'met' if met >= 0.8 else 'NOT met'} ({met:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

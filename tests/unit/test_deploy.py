"""The deployment files agree with the app and with each other.

Dockerfile, docker-compose.yml, deploy/prometheus and deploy/grafana name ports,
paths, services and metrics that the app defines: these tests catch the drift
(a renamed metric, a moved health check, a service renamed in one file only).
No Docker engine is needed; the Compose file is checked with ``docker-compose
config`` and everything else by reading the files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pullthrough.proxy.app import create_app
from pullthrough.proxy.config import Settings, load_settings
from tests.support.binaries import require_binary
from tests.support.mirror import settings_for
from tests.support.processes import free_port

Client = Callable[..., Awaitable[TestClient[Any, Any]]]

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "pullthrough.yml"
DASHBOARD = GRAFANA / "dashboards" / "pullthrough.json"

METRIC = re.compile(r"pullthrough_[a-z_]+")
# The series Prometheus stores for a family of each type: a query must name one.
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}
DEFAULTS = Settings()


# ------------------------------------------------------------------ helpers


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def mappings(node: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object in ``node``, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from mappings(value)
    elif isinstance(node, list):
        for value in node:
            yield from mappings(value)


def compose_services() -> dict[str, str]:
    """The services of docker-compose.yml, each with the text of its block.

    A plain-text reading, which also sees the file's comments: enough to find
    names, ports and mounts; ``docker-compose config`` validates the file itself.
    """
    text = COMPOSE.read_text() + "\nend-of-file:\n"
    section = re.search(r"^services:\n(.*?)(?=^[a-z])", text, re.MULTILINE | re.DOTALL)
    assert section is not None, "docker-compose.yml has no services section"
    parts = re.split(r"^  ([a-z][a-z0-9_-]*):[ \t]*$", section.group(1), flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def bind_mounts(block: str) -> dict[str, str]:
    """``./source: target`` bind mounts of a service block, source to target."""
    return dict(re.findall(r"^\s*- \"?\./([^:\s]+):([^:\s\"]+)", block, re.MULTILINE))


def yaml_value(path: Path, key: str) -> str:
    """The value of the first ``key:`` line of a small YAML file."""
    match = re.search(rf"^\s*(?:- )?{key}:\s*[\"']?([^\"'\s#]+)", path.read_text(), re.MULTILINE)
    assert match is not None, f"no {key} in {path.relative_to(ROOT)}"
    return match.group(1)


def dockerfile_final_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuations joined."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, args = (current + line).partition(" ")
        current = ""
        if keyword.upper() == "FROM":
            instructions.clear()
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def only(instructions: list[tuple[str, str]], keyword: str) -> str:
    found = [args for kw, args in instructions if kw == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


async def exposed_series(aiohttp_client: Client, tmp_path: Path) -> set[str]:
    """Names a Prometheus scraping a fresh app stores.

    prometheus_client prints ``# HELP``/``# TYPE`` for a labelled family before its
    first sample (single-process mode; with several workers only sampled families
    appear), and the parser yields that family with no samples. So the family names,
    expanded by type, hold every metric the app defines, used yet or not.
    """
    client = await aiohttp_client(
        create_app(settings_for(tmp_path / "cache", "http://127.0.0.1:9"))
    )
    response = await client.get("/metrics")
    assert response.status == 200
    names: set[str] = set()
    for family in text_string_to_metric_families(await response.text()):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in SERIES_SUFFIXES.get(family.type, ("",)))
    return names


async def run_python(code: str, port: int) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        env={"PULLTHROUGH_PORT": str(port)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), timeout=30)


# ------------------------------------------------------------------ Grafana


def test_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [panel for panel in panels(dashboard) if panel["type"] != "row"]
    assert len(graphs) >= 8
    for panel in graphs:
        assert panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["targets"], f"panel {panel['title']!r} has no queries"
        for target in panel["targets"]:
            assert METRIC.search(target["expr"]), f"{panel['title']!r}: {target['expr']}"


async def test_dashboard_queries_only_metrics_the_app_exposes(
    aiohttp_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    exposed = await exposed_series(aiohttp_client, tmp_path)
    unknown = {
        f"{panel['title']}: {name}"
        for panel in panels(load_dashboard())
        for target in panel.get("targets", [])
        for name in METRIC.findall(target["expr"])
        if name not in exposed
    }
    assert not unknown, f"queries name metrics /metrics does not have: {sorted(unknown)}"


def test_dashboard_uses_the_provisioned_datasource() -> None:
    uid = yaml_value(DATASOURCES, "uid")
    assert yaml_value(DATASOURCES, "type") == "prometheus"
    dashboard = load_dashboard()
    refs = [
        node["datasource"]
        for node in mappings(dashboard)
        if isinstance(node.get("datasource"), dict)
        and node["datasource"].get("type") == "prometheus"
    ]
    assert refs
    assert {ref["uid"] for ref in refs} == {uid}
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            assert target.get("datasource", panel.get("datasource")) == {
                "type": "prometheus",
                "uid": uid,
            }


def test_grafana_mounts_match_its_provisioning() -> None:
    grafana = compose_services()["grafana"]
    mounts = bind_mounts(grafana)
    for source in mounts:
        assert (ROOT / source).exists(), f"grafana mounts missing ./{source}"
    assert mounts["deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_dir = yaml_value(DASHBOARD_PROVIDERS, "path")
    assert mounts["deploy/grafana/dashboards"] == dashboards_dir
    home = re.search(r"GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH:\s*(\S+)", grafana)
    assert home is not None
    assert home.group(1) == f"{dashboards_dir}/{DASHBOARD.name}"
    # The data source points at the Compose service of Prometheus, on its port.
    url = yaml_value(DATASOURCES, "url")
    assert url == "http://prometheus:9090"
    assert "prometheus" in compose_services()


# ------------------------------------------------------------------ Prometheus and Compose


def test_prometheus_scrapes_the_compose_service() -> None:
    config = PROMETHEUS_CONFIG.read_text()
    targets = re.findall(r"[\"']([^\"'\s]+:\d+)[\"']", config)
    assert targets == [f"pullthrough:{DEFAULTS.port}"]
    assert yaml_value(PROMETHEUS_CONFIG, "metrics_path") == "/metrics"
    assert re.search(r"^\s*scrape_interval:\s*15s\s*$", config, re.MULTILINE)
    services = compose_services()
    assert set(services) >= {"pullthrough", "prometheus", "grafana"}
    prometheus = bind_mounts(services["prometheus"])
    assert prometheus["deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    pullthrough = services["pullthrough"]
    assert f'"{DEFAULTS.port}:{DEFAULTS.port}"' in pullthrough
    assert re.search(r"^\s*- pullthrough-cache:/var/lib/pullthrough\s*$", pullthrough, re.M)


def test_compose_file_validates() -> None:
    binary = require_binary("docker-compose")
    command = [binary, "--project-directory", str(ROOT), "-f", str(COMPOSE), "config"]
    checked = subprocess.run(
        [*command, "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert checked.returncode == 0, checked.stderr
    services = subprocess.run(
        [*command, "--services"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert set(services.stdout.split()) == {"pullthrough", "prometheus", "grafana"}


# ------------------------------------------------------------------ Dockerfile


def test_dockerfile_matches_the_defaults() -> None:
    stage = dockerfile_final_stage()
    assert only(stage, "EXPOSE") == str(DEFAULTS.port)
    env = dict(
        item.partition("=")[::2] for kw, args in stage if kw == "ENV" for item in shlex.split(args)
    )
    cache_dir = env["PULLTHROUGH_CACHE_DIR"]
    assert json.loads(only(stage, "VOLUME")) == [cache_dir]
    user = only(stage, "USER").partition(":")[0]
    assert user not in ("root", "0")
    runs = " ".join(args for kw, args in stage if kw == "RUN")
    assert re.search(rf"chown {user}:\S+ {re.escape(cache_dir)}\b", runs), "cache dir owner"
    assert json.loads(only(stage, "ENTRYPOINT")) == ["pullthrough"]
    assert json.loads(only(stage, "CMD")) == ["serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "pullthrough" in scripts


async def test_dockerfile_healthcheck_passes_against_the_app(
    aiohttp_client: Client, tmp_path: Path
) -> None:
    healthcheck = only(dockerfile_final_stage(), "HEALTHCHECK")
    argv = json.loads(healthcheck.partition(" CMD ")[2])
    assert argv[:2] == ["python", "-c"]
    code = argv[2]
    assert "/healthz" in code
    assert f"'{DEFAULTS.port}'" in code, "the default port when PULLTHROUGH_PORT is unset"
    client = await aiohttp_client(
        create_app(settings_for(tmp_path / "cache", "http://127.0.0.1:9"))
    )
    assert (await client.get("/healthz")).status == 200
    port = client.server.port
    assert port is not None
    assert await run_python(code, port) == 0
    assert await run_python(code, free_port()) != 0, "must fail when nothing answers"


# ------------------------------------------------------------------ several nodes

FLEET_COMPOSE = ROOT / "deploy" / "compose-fleet.yml"
FLEET = ROOT / "deploy" / "fleet"
K8S = ROOT / "deploy" / "k8s"
NODES = {"pullthrough-1", "pullthrough-2", "pullthrough-3"}
# Settings of the S3 storage backend, built beside this one; until both are in
# one tree they are not fields here, and the files' other settings are checked.
S3_SETTINGS = {"storage", "s3_endpoint_url", "s3_region", "redirect"}


def fleet_config() -> dict[str, Any]:
    """The fleet Compose file as docker-compose resolves it (anchors merged)."""
    binary = require_binary("docker-compose")
    command = [binary, "--project-directory", str(FLEET_COMPOSE.parent), "-f", str(FLEET_COMPOSE)]
    checked = subprocess.run(
        [*command, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert checked.returncode == 0, checked.stderr
    config: dict[str, Any] = yaml.safe_load(checked.stdout)
    return config


def check_settings(values: dict[str, Any], where: str) -> Settings:
    """The settings these values make (file types), S3 ones aside until they exist."""
    known = {f.name for f in dataclasses.fields(Settings)}
    pending = S3_SETTINGS - known
    unknown = set(values) - known - pending
    assert not unknown, f"{where}: no such settings {sorted(unknown)}"
    return load_settings(overrides={k: v for k, v in values.items() if k not in pending})


def test_fleet_compose_file_validates_and_wires_the_nodes() -> None:
    services = fleet_config()["services"]
    assert set(services) == NODES | {"nginx", "redis", "seaweedfs", "prometheus"}
    for name in NODES:
        env = services[name]["environment"]
        assert env["PULLTHROUGH_REDIS_URL"] == "redis://redis:6379/0"
        assert env["PULLTHROUGH_STORAGE"].startswith("s3://")
        assert env["PULLTHROUGH_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
        values = {
            k.removeprefix("PULLTHROUGH_").lower(): v
            for k, v in env.items()
            if k.startswith("PULLTHROUGH_")
        }
        known = {f.name for f in dataclasses.fields(Settings)}
        pending = S3_SETTINGS - known
        assert set(values) <= known | pending
        settings = load_settings(
            environ={f"PULLTHROUGH_{k.upper()}": v for k, v in values.items() if k not in pending}
        )
        assert settings.redis_url == "redis://redis:6379/0"
        # Each node its own volume for what stays local.
        volumes = [v.split(":")[0] for v in services[name]["volumes"]]
        assert volumes == [f"node-{name[-1]}"]
    bucket = env["PULLTHROUGH_STORAGE"].removeprefix("s3://").split("/")[0]
    assert f"-bucket={bucket}" in services["seaweedfs"]["command"]
    keys = json.loads((FLEET / "s3.json").read_text())["identities"][0]["credentials"][0]
    assert env["AWS_ACCESS_KEY_ID"] == keys["accessKey"]
    assert env["AWS_SECRET_ACCESS_KEY"] == keys["secretKey"]
    mounts = dict(v.split(":")[:2] for v in services["nginx"]["volumes"])
    assert mounts[str(FLEET / "nginx.conf")] == "/etc/nginx/nginx.conf"


def test_nginx_and_prometheus_reach_every_node() -> None:
    upstreams = re.findall(r"^\s*server (\S+):(\d+)", (FLEET / "nginx.conf").read_text(), re.M)
    assert {host for host, _ in upstreams} == NODES
    assert {int(port) for _, port in upstreams} == {DEFAULTS.port}
    targets = yaml.safe_load((FLEET / "prometheus.yml").read_text())["scrape_configs"][0]
    assert set(targets["static_configs"][0]["targets"]) == {f"{n}:{DEFAULTS.port}" for n in NODES}


def k8s_objects() -> dict[str, dict[str, Any]]:
    """Every object of deploy/k8s by kind (one of each)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"two {doc['kind']} objects"
            found[doc["kind"]] = doc
    return found


async def test_kubernetes_manifests_fit_the_app(aiohttp_client: Client, tmp_path: Path) -> None:
    objects = k8s_objects()
    assert set(objects) == {"ConfigMap", "Deployment", "Service", "Kustomization"}
    listed = set(objects["Kustomization"]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    deployment, service = objects["Deployment"], objects["Service"]
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = spec["template"]["spec"]["containers"]
    (port,) = container["ports"]
    assert port["containerPort"] == DEFAULTS.port
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    assert {p["path"] for p in probes.values()} == {"/readyz", "/healthz"}
    assert {p["port"] for p in probes.values()} == {port["name"]}
    client = await aiohttp_client(
        create_app(settings_for(tmp_path / "cache", "http://127.0.0.1:9"))
    )
    for probe in probes.values():
        assert (await client.get(probe["path"])).status == 200
    # The config file the container reads is the ConfigMap's, and it holds settings.
    env = {e["name"]: e["value"] for e in container["env"]}
    config_path = Path(env["PULLTHROUGH_CONFIG"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in spec["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = objects["ConfigMap"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    values = tomllib.loads(config_map["data"][config_path.name])
    settings = check_settings(values, "deploy/k8s/configmap.yaml")
    assert settings.redis_url is not None
    assert values["storage"].startswith("s3://")
    local = next(m for m in container["volumeMounts"] if m["mountPath"] == str(settings.cache_dir))
    assert local["name"] in {v["name"] for v in spec["template"]["spec"]["volumes"]}


async def test_readme_fleet_queries_name_metrics_the_app_exposes(
    aiohttp_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    readme = (ROOT / "README.md").read_text()
    section = readme.partition("\n## Several nodes\n")[2].partition("\n## ")[0]
    queries = re.findall(r"```promql\n(.*?)```", section, re.DOTALL)
    assert queries, "README's Several nodes section has no PromQL block"
    named = set(METRIC.findall("".join(queries)))
    assert len(named) >= 5
    assert named <= await exposed_series(aiohttp_client, tmp_path)

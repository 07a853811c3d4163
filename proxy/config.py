"""Settings: one frozen object built once from defaults, a file, the environment and flags.

Precedence, lowest first: the defaults below, the TOML config file, ``PULLTHROUGH_*``
environment variables, command-line flags. Everything is validated here, at start-up,
so a bad value stops the server with a clear message instead of failing a request.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL

log = logging.getLogger(__name__)

DOCKER_HUB = URL("https://registry-1.docker.io")
ENV_PREFIX = "PULLTHROUGH_"


class ConfigError(Exception):
    """A setting has a value we cannot run with."""


@dataclass(frozen=True)
class Settings:
    # Address to listen on; all interfaces, since Docker daemons on other hosts pull.
    host: str = "0.0.0.0"
    port: int = 5000
    # Where blobs, manifests and the tag index live; created if missing.
    cache_dir: Path = Path("pullthrough-cache")
    # The registry we mirror. Docker Hub's name rules (library/ for one-part
    # names) apply to it.
    upstream: URL = DOCKER_HUB
    # Give one-part names Docker Hub's "library/" prefix ("alpine" is
    # "library/alpine"): right for Docker Hub and registries laid out like it.
    library_prefix: bool = True
    # Credentials for the upstream's token (or basic) auth; anonymous when unset.
    upstream_username: str | None = None
    upstream_password: str | None = field(default=None, repr=False)
    # Seconds to open a connection upstream, and to wait for each read.
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # How long a tag's digest is trusted before it is checked again upstream
    # (with a HEAD, which Docker Hub does not count against its rate limit).
    # Five minutes: a busy build farm costs the upstream one HEAD per tag per five
    # minutes, and a tag pushed upstream is seen within five minutes. Pull by
    # digest for content that must not wait; 0 checks on every pull.
    tag_ttl: float = 300.0
    # Never contact the upstream: serve what is cached, MANIFEST_UNKNOWN or
    # BLOB_UNKNOWN for the rest (air-gapped sites).
    offline: bool = False
    # Worker processes sharing the port (SO_REUSEPORT) and the cache.
    workers: int = 1
    log_level: str = "INFO"
    # "text" for people, "json" (one object a line) for log pipelines.
    log_format: str = "text"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be 1-65535, not {self.port}")
        if self.upstream.scheme not in ("http", "https") or not self.upstream.host:
            raise ConfigError(f"upstream must be an http(s) URL, not {self.upstream}")
        if self.upstream.path not in ("", "/") or self.upstream.query_string:
            raise ConfigError(f"upstream must be scheme://host[:port], not {self.upstream}")
        if (self.upstream_username is None) != (self.upstream_password is None):
            raise ConfigError("upstream_username and upstream_password go together")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ConfigError("timeouts must be positive")
        if self.tag_ttl < 0:
            raise ConfigError(f"tag_ttl must be 0 or more seconds, not {self.tag_ttl}")
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"workers must be 1-64, not {self.workers}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, not {self.log_format!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR: {self.log_level}")


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _convert(name: str, value: Any) -> Any:
    default = _FIELDS[name].default
    try:
        if isinstance(default, bool):
            return _boolean(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, Path):
            return Path(value)
        if isinstance(default, URL):
            return URL(str(value).rstrip("/"))
    except ValueError as exc:
        raise ConfigError(f"{name}: {value!r} is not a valid value ({exc})") from None
    return None if value is None else str(value)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def load_settings(
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings; raises ConfigError with a message meant for the operator."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            with config_file.open("rb") as f:
                values.update(tomllib.load(f))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from None
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s) in {config_file}: {', '.join(unknown)}")
    for key, raw in (environ or {}).items():
        if not key.startswith(ENV_PREFIX) or key == f"{ENV_PREFIX}CONFIG":
            continue
        name = key.removeprefix(ENV_PREFIX).lower()
        if name in _FIELDS:
            values[name] = raw
        else:
            # Not fatal: Kubernetes alone sets PULLTHROUGH_SERVICE_HOST and
            # friends for a Service of that name.
            log.warning("ignoring %s: pullthrough has no setting %r", key, name)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return Settings(**{k: _convert(k, v) for k, v in values.items()})

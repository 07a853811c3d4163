"""Settings: one frozen object built once from defaults, a file, the environment and flags.

Precedence, lowest first: the defaults below, the TOML config file, ``PULLTHROUGH_*``
environment variables, command-line flags. Everything is validated here, at start-up,
so a bad value stops the server with a clear message instead of failing a request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL

from pullthrough.cache.s3_location import S3Location

log = logging.getLogger(__name__)

DOCKER_HUB = URL("https://registry-1.docker.io")
DOCKER_HUB_NAME = "docker.io"
# Names clients use for Docker Hub; all of them mean the default upstream.
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
ENV_PREFIX = "PULLTHROUGH_"
# host[:port] as it stands first in an image reference ("ghcr.io", "registry.local:5000").
_HOST = re.compile(
    r"^(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::[0-9]{1,5})?$"
)


class ConfigError(Exception):
    """A setting has a value we cannot run with."""


def _allow_entry(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return bool(_HOST.match(entry.lower())) and ":" not in entry
    return True


def _check_url(what: str, url: URL) -> None:
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"{what} must be an http(s) URL, not {url}")
    if url.path not in ("", "/") or url.query_string:
        raise ConfigError(f"{what} must be scheme://host[:port], not {url}")


# One RFC 1123 host name label.
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def _check_host(host: str) -> None:
    """An IP address, or a name that could resolve: never a dotted quad out of range
    (``999.1.1.1``), which would otherwise be looked up as a name and fail late."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return
    labels = host.rstrip(".").split(".")
    if (
        not host
        or len(host) > 253
        or not all(_LABEL.match(label) for label in labels)
        or labels[-1].isdigit()  # all-numeric last label: an address, and not a valid one
    ):
        raise ConfigError(f"host must be an IP address or a host name, not {host!r}")


def listen_address(value: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9102`` for IPv6) as a pair; ConfigError otherwise."""
    host, colon, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise ConfigError(f"metrics_listen must be host:port (127.0.0.1:9102), not {value!r}")
    try:
        _check_host(host)
    except ConfigError:
        raise ConfigError(f"metrics_listen: {host!r} is not an IP address or host name") from None
    return host, int(port)


def _check_redis_url(value: str) -> None:
    try:
        url = URL(value)
    except ValueError:
        url = URL()
    if url.scheme == "unix" and url.path not in ("", "/"):
        return
    if url.scheme not in ("redis", "rediss") or not url.host:
        raise ConfigError(
            f"redis_url must be redis://host[:port][/db], rediss://... or unix:///path, "
            f"not {redis_display(value)!r}"
        )
    db = url.path.strip("/")
    if db and not db.isdigit():
        raise ConfigError(f"redis_url: the database after the host must be a number, not {db!r}")


def redis_display(value: str) -> str:
    """A Redis URL for messages and logs: its password replaced."""
    try:
        url = URL(value)
    except ValueError:
        return "(not a URL)"
    return str(url.with_password("***")) if url.password else value


# The user name rules use for clients that sent no credentials.
ANONYMOUS = "anonymous"
# In a rule's user list: every user in the htpasswd file.
EVERY_USER = "*"


@dataclass(frozen=True)
class AccessRule:
    """Who may pull and push in the repositories ``repository`` (a glob where ``*``
    also crosses ``/``) of ``upstream`` (a configured upstream's name, or ``*``).

    Users are names from the htpasswd file, ``*`` for all of them, or
    ``anonymous`` for clients without credentials. Anonymous clients never get
    what an upstream with credentials does not serve anonymously, whatever a
    rule says: a rule can only narrow what they get.
    """

    upstream: str = "*"
    repository: str = "*"
    pull: tuple[str, ...] = ()
    push: tuple[str, ...] = ()


def _rule_from(index: int, table: Any) -> AccessRule:
    where = f"access[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table ([[access]]), not {table!r}")
    unknown = sorted(set(table) - {"upstream", "repository", "pull", "push"})
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    for key in ("upstream", "repository"):
        value = table.get(key, "*")
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}.{key} must be a non-empty string, not {value!r}")
    users: dict[str, tuple[str, ...]] = {}
    for key in ("pull", "push"):
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(u, str) and u for u in value):
            raise ConfigError(f"{where}.{key} must be a list of user names, not {value!r}")
        users[key] = tuple(value)
    if ANONYMOUS in users["push"]:
        raise ConfigError(f"{where}.push: anonymous clients may never push")
    return AccessRule(table.get("upstream", "*"), table.get("repository", "*"), **users)


def parse_access(value: Any) -> tuple[AccessRule, ...]:
    """The config file's ``[[access]]`` tables, in order."""
    if isinstance(value, tuple):
        return value
    if not isinstance(value, list):
        raise ConfigError(f"access must be a list of [[access]] tables, not {value!r}")
    return tuple(_rule_from(i, table) for i, table in enumerate(value))


@dataclass(frozen=True)
class UpstreamSettings:
    """One registry the mirror serves, under the name clients use for it."""

    # The host name in image references: "docker.io", "ghcr.io", "quay.io".
    name: str
    url: URL
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # None: the server-wide tag_ttl and offline settings.
    tag_ttl: float | None = None
    offline: bool | None = None
    # Docker Hub's rule: one-part names live under library/.
    library_prefix: bool = False

    def __post_init__(self) -> None:
        if not _HOST.match(self.name):
            raise ConfigError(f"upstream name must be a host[:port], not {self.name!r}")
        _check_url(f"upstream {self.name} url", self.url)
        if (self.username is None) != (self.password is None):
            raise ConfigError(f"upstream {self.name}: username and password go together")
        if self.tag_ttl is not None and self.tag_ttl < 0:
            raise ConfigError(f"upstream {self.name}: tag_ttl must be 0 or more")

    @property
    def has_credentials(self) -> bool:
        return self.username is not None


def _upstream_from(name: str, table: Mapping[str, Any]) -> UpstreamSettings:
    known = {"url", "username", "password", "tag_ttl", "offline", "library_prefix"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"upstream {name}: unknown setting(s) {', '.join(unknown)}")
    where = f'upstreams."{name}"'
    for key in ("url", "username", "password"):
        if table.get(key) is not None and not isinstance(table[key], str):
            raise ConfigError(f"{where}.{key} must be a string, not {table[key]!r}")
    for key in ("username", "password"):
        if isinstance(table.get(key), str) and not table[key].strip():
            raise ConfigError(f"{where}.{key} is empty: give a value, or leave both out")
    tag_ttl = table.get("tag_ttl")
    if tag_ttl is not None and (isinstance(tag_ttl, bool) or not isinstance(tag_ttl, int | float)):
        raise ConfigError(f"{where}.tag_ttl must be a number of seconds, not {tag_ttl!r}")
    for key in ("offline", "library_prefix"):
        if table.get(key) is not None and not isinstance(table[key], bool):
            raise ConfigError(f"{where}.{key} must be true or false, not {table[key]!r}")
    try:
        return UpstreamSettings(
            name=name,
            url=URL(str(table.get("url", f"https://{name}")).rstrip("/")),
            username=table.get("username"),
            password=table.get("password"),
            tag_ttl=None if tag_ttl is None else float(tag_ttl),
            offline=table.get("offline"),
            library_prefix=bool(table.get("library_prefix", False)),
        )
    except ValueError as exc:
        raise ConfigError(f"upstream {name}: {exc}") from None


def parse_upstreams(value: Any) -> tuple[UpstreamSettings, ...]:
    """From the config file's ``[upstreams."ghcr.io"]`` tables, or a comma-separated
    list of host names (environment, flag) for anonymous HTTPS upstreams."""
    if isinstance(value, tuple):
        return value
    if isinstance(value, str):
        names = [n.strip() for n in value.split(",") if n.strip()]
        return tuple(_upstream_from(n, {}) for n in names)
    if isinstance(value, Mapping):
        out = []
        for name, table in value.items():
            if not isinstance(table, Mapping):
                raise ConfigError(f'upstreams."{name}" must be a table')
            out.append(_upstream_from(str(name), table))
        return tuple(out)
    raise ConfigError("upstreams must be a table of registries or a list of host names")


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
    # More registries, each under the host name clients use for it (ghcr.io,
    # quay.io, ...), reached by containerd's ?ns=<host> or a /v2/<host>/... path
    # prefix. Anything not listed is refused: the mirror is no open proxy.
    upstreams: tuple[UpstreamSettings, ...] = ()
    # Give one-part names Docker Hub's "library/" prefix ("alpine" is
    # "library/alpine"): right for Docker Hub and registries laid out like it.
    library_prefix: bool = True
    # Credentials for the upstream's token (or basic) auth; anonymous when unset.
    upstream_username: str | None = None
    upstream_password: str | None = field(default=None, repr=False)
    # Seconds to open a connection upstream, and to wait for each read.
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # A blob body slower than upstream_min_rate bytes a second over any
    # upstream_rate_window seconds is abandoned as a failed download (nothing is
    # kept), so a trickling upstream cannot hold clients for ever: 1 KiB/s over
    # 10 s is far below any working link and well above one byte every few
    # seconds. 0 turns the rule off (read_timeout still applies).
    upstream_min_rate: int = 1024
    upstream_rate_window: float = 10.0
    # Seconds for a whole manifest or tag-list answer (token, headers and body):
    # they are at most 4 MiB, so 30 s means the upstream is stuck, not slow.
    # The same bounds the head of a blob answer (its body has the rate rule).
    manifest_timeout: float = 30.0
    # Seconds the check of a cached tag (one HEAD upstream) may take before the
    # cached digest is served stale: a stalled upstream costs pulls seconds,
    # not a minute. A HEAD to Docker Hub, token included, takes well under 1 s.
    revalidate_timeout: float = 5.0
    # Where blob redirects may lead although the address is loopback, private or
    # link-local: CIDRs ("10.0.0.0/8") or host names ("minio.internal"). Empty:
    # only where the upstream itself lives (an upstream on such an address may
    # redirect anywhere; configured upstreams' own hosts are always allowed).
    redirect_allow: tuple[str, ...] = ()
    # How long a tag's digest is trusted before it is checked again upstream
    # (with a HEAD, which Docker Hub does not count against its rate limit).
    # Five minutes: a busy build farm costs the upstream one HEAD per tag per five
    # minutes, and a tag pushed upstream is seen within five minutes. Pull by
    # digest for content that must not wait; 0 checks on every pull.
    tag_ttl: float = 300.0
    # Never contact the upstream: serve what is cached, MANIFEST_UNKNOWN or
    # BLOB_UNKNOWN for the rest (air-gapped sites).
    offline: bool = False
    # Cache size cap in bytes ("50GiB", "500MB" or a number); least recently used
    # blobs and manifests go first. None: no cap.
    max_size: int | None = None
    # Read-ahead: once an image manifest is answered (fetched, or cached with
    # blobs missing), fetch its config and layers before the client asks, so its
    # blob requests join downloads already running. At most prefetch_per_image
    # downloads per image and prefetch_total per worker; none for an image
    # larger than max_size; paused after an upstream 429 or 5xx.
    prefetch: bool = True
    prefetch_per_image: int = 4
    prefetch_total: int = 16
    # Remove what has not been used for this many days. None: keep forever.
    max_age_days: float | None = None
    # Images never evicted ("alpine:3.19", "ghcr.io/owner/app:1"), besides those
    # pinned with `pullthrough cache pin`.
    pinned: tuple[str, ...] = ()
    # Bytes a second the background scrub re-hashes cached blobs at, to find bit
    # rot before a client does ("20MiB" or a number; 0: no scrub). 20 MiB/s is a
    # few percent of one disk's bandwidth and of a core, and still goes over a
    # 1 TiB cache in about 15 hours.
    scrub_rate: int = 20 * 1024 * 1024
    # Worker processes sharing the listening socket and the cache; the main
    # process restarts one that dies.
    workers: int = 1
    # Seconds a client has to send a whole request head (request line and
    # headers), from its first byte, or from the connection's start for its first
    # request; then the connection is closed. A deadline, not an idle timeout: a
    # client trickling a header line every few seconds is cut off too. Real
    # clients send their head in one packet; nginx allows 60 s.
    request_head_timeout: float = 20.0
    # Bytes a request head may take in all; a longer one is answered 431 and the
    # connection closed before it is buffered. Registry clients send about 1 KiB,
    # a few KiB with a bearer token (nginx: 4 buffers of 8 KiB).
    max_request_head: int = 65536
    # Seconds an idle keep-alive connection is kept open (nginx's default; aiohttp
    # would keep it an hour).
    keepalive_timeout: float = 75.0
    # Open client connections per worker; more are answered 503 and closed. Also
    # lowered at start-up to what the open-file limit can serve (four descriptors
    # per connection: the socket, and for a cold blob the upstream connection,
    # the file being written and the reader's descriptor of it).
    max_connections: int = 4096
    log_level: str = "INFO"
    # "asyncio" serves blobs with the kernel's sendfile; "uvloop" answers about a
    # quarter more manifest requests a second but copies blobs through user space
    # (uvloop has no sendfile): a third less blob throughput (bench/README.md).
    event_loop: str = "asyncio"
    # "text" for people, "json" (one object a line) for log pipelines.
    log_format: str = "text"
    # PEM certificate (chain) and key: serve HTTPS. Reloaded on SIGHUP.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Users, as `htpasswd -B` writes them (bcrypt only, as distribution). Unset:
    # no logins, anyone who reaches the mirror pulls everything (as before).
    htpasswd: Path | None = None
    # Who may pull (and push) what, first matching rule wins; see AccessRule.
    access: tuple[AccessRule, ...] = ()
    # "host:port" for /metrics, /readyz and /healthz on their own listener; they
    # then leave the main port. None: on the main port.
    metrics_listen: str | None = None
    # Addresses (CIDRs) of proxies whose X-Forwarded-For names the client.
    trusted_proxies: tuple[str, ...] = ()
    # Repository name prefixes ("myorg/", "golden/") that live only in the
    # mirror: pushed to it, pulled from it, never asked of an upstream.
    hosted: tuple[str, ...] = ()
    # Without users (htpasswd), pushes are taken from loopback clients only;
    # true takes them from anyone who reaches the mirror.
    open_push: bool = False
    # DELETE of hosted manifests, tags and blobs (off by default, as distribution).
    delete_enabled: bool = False
    # Largest blob one upload may bring ("10GiB" or bytes).
    max_upload_size: int = 10 << 30
    # Seconds an upload session may sit idle before it and its bytes are removed.
    upload_expiry: float = 3600.0
    # Where blobs and manifests live: None, the filesystem under cache_dir; or
    # "s3://bucket/prefix", S3-compatible object storage shared by every node
    # pointed at it (the tag index stays in cache_dir). Credentials come from the
    # standard AWS chain (AWS_ACCESS_KEY_ID..., ~/.aws, instance roles).
    storage: str | None = None
    # The S3 endpoint, for servers other than AWS ("http://seaweedfs:8333").
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # Answer blob GETs for cached blobs with a 307 to a presigned S3 URL, as
    # distribution's S3 driver does: the bytes then flow from storage to clients.
    redirect: bool = False
    # Several nodes: a Redis (redis://[:password@]host:6379/0, rediss:// for TLS,
    # unix:///path.sock) that holds what every node must share: the tag index and
    # its freshness, tag lists and pins. None: all of it in cache_dir (one node).
    redis_url: str | None = field(default=None, repr=False)
    # Seconds a node's claim to fetch a blob lives without renewal (it renews it
    # every third of that while it downloads): how long the fleet waits before
    # another node takes over the fetch of a node that died mid-download.
    fetch_lease: float = 15.0

    def __post_init__(self) -> None:
        _check_host(self.host)
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be 1-65535, not {self.port}")
        _check_url("upstream", self.upstream)
        names = [u.name for u in self.upstreams]
        duplicate = {n for n in names if names.count(n) > 1} | (set(names) & DOCKER_HUB_ALIASES)
        if duplicate:
            raise ConfigError(
                f"upstream(s) {', '.join(sorted(duplicate))} named twice "
                "(docker.io is the default upstream: set `upstream` for it)"
            )
        if (self.upstream_username is None) != (self.upstream_password is None):
            raise ConfigError("upstream_username and upstream_password go together")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ConfigError("timeouts must be positive")
        if self.tag_ttl < 0:
            raise ConfigError(f"tag_ttl must be 0 or more seconds, not {self.tag_ttl}")
        if self.upstream_min_rate < 0:
            raise ConfigError(f"upstream_min_rate must be 0 or more, not {self.upstream_min_rate}")
        for name in ("upstream_rate_window", "manifest_timeout", "revalidate_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds")
        for entry in self.redirect_allow:
            if not _allow_entry(entry):
                raise ConfigError(
                    f"redirect_allow: {entry!r} is neither a CIDR (10.0.0.0/8) nor a host name"
                )
        if self.max_size is not None and self.max_size <= 0:
            raise ConfigError(f"max_size must be positive, not {self.max_size}")
        if not 1 <= self.prefetch_per_image <= 64:
            raise ConfigError(f"prefetch_per_image must be 1-64, not {self.prefetch_per_image}")
        if not self.prefetch_per_image <= self.prefetch_total <= 1024:
            raise ConfigError(
                f"prefetch_total must be prefetch_per_image-1024, not {self.prefetch_total}"
            )
        if self.max_age_days is not None and self.max_age_days <= 0:
            raise ConfigError(f"max_age_days must be positive, not {self.max_age_days}")
        if self.scrub_rate < 0:
            raise ConfigError(f"scrub_rate must be 0 (off) or more bytes/s, not {self.scrub_rate}")
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"workers must be 1-64, not {self.workers}")
        if not 0 < self.request_head_timeout <= 300:
            raise ConfigError(
                f"request_head_timeout must be 0-300 seconds, not {self.request_head_timeout}"
            )
        if not 1024 <= self.max_request_head <= 1 << 20:
            raise ConfigError(
                f"max_request_head must be 1024-1048576 bytes, not {self.max_request_head}"
            )
        for prefix in self.hosted:
            if not re.fullmatch(r"[a-z0-9][a-z0-9._/-]*", prefix):
                raise ConfigError(f"hosted: {prefix!r} is not a repository name prefix")
        if self.max_upload_size <= 0 or self.upload_expiry <= 0:
            raise ConfigError("max_upload_size and upload_expiry must be positive")
        if not 0 < self.keepalive_timeout <= 3600:
            raise ConfigError(
                f"keepalive_timeout must be 0-3600 seconds, not {self.keepalive_timeout}"
            )
        self.s3_location()  # raises ConfigError
        if self.redirect and self.storage is None:
            raise ConfigError("redirect = true needs storage = s3://bucket/prefix")
        if self.max_connections < 1:
            raise ConfigError(f"max_connections must be 1 or more, not {self.max_connections}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together")
        if self.access and self.htpasswd is None:
            raise ConfigError("access rules need users: set htpasswd")
        if self.metrics_listen is not None:
            listen_address(self.metrics_listen)
        for entry in self.trusted_proxies:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ConfigError(
                    f"trusted_proxies: {entry!r} is not an address or CIDR (10.0.0.0/8)"
                ) from None
        if self.event_loop not in ("asyncio", "uvloop"):
            raise ConfigError(f"event_loop must be asyncio or uvloop, not {self.event_loop!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, not {self.log_format!r}")
        if self.redis_url is not None:
            _check_redis_url(self.redis_url)
        if not 1.0 <= self.fetch_lease <= 600.0:
            raise ConfigError(f"fetch_lease must be 1 to 600 seconds, not {self.fetch_lease}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR: {self.log_level}")

    def s3_location(self) -> S3Location | None:
        """The S3 store of ``storage``, or None for the filesystem."""
        if self.storage is None:
            return None
        if self.s3_endpoint_url is not None:
            _check_url("s3_endpoint_url", URL(self.s3_endpoint_url))
        try:
            return S3Location.parse(
                self.storage, endpoint_url=self.s3_endpoint_url, region=self.s3_region
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def all_upstreams(self) -> tuple[UpstreamSettings, ...]:
        """The default upstream (as docker.io) first, then the configured ones."""
        default = UpstreamSettings(
            name=DOCKER_HUB_NAME,
            url=self.upstream,
            username=self.upstream_username,
            password=self.upstream_password,
            library_prefix=self.library_prefix,
        )
        return (default, *self.upstreams)


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
# Settings whose value is a secret or a name: an empty one is a mistake (a Compose
# line uncommented but its variable unset), never a wish for anonymous pulls.
_NOT_EMPTY = frozenset({"upstream_username", "upstream_password"})
# Optional settings (default None) and the type they take.
_OPTIONAL_NUMBERS = frozenset({"max_age_days"})
_OPTIONAL_PATHS = frozenset({"tls_cert", "tls_key", "htpasswd"})


def _convert(name: str, value: Any, where: str, *, from_file: bool = False) -> Any:
    """``value`` as the setting's type. TOML gives typed values and they must have
    the right type (``workers = 2.5`` is an error, not 2); the environment and
    flags give strings, which are parsed. ``where`` names the setting as the
    operator wrote it, for the message."""
    default = _FIELDS[name].default
    # Strings are parsed only from the environment and flags: in the file a
    # number or a boolean must be one (`port = "5000"` is as wrong as `port = [1]`).
    text = isinstance(value, str)
    parse = text and not from_file

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{where} must be {expected}, not {value!r}")

    if value is None:
        return None
    if name == "max_upload_size":
        try:
            return parse_size(_typed(value, str | int | float))
        except (TypeError, ValueError):
            raise wrong("a size (10GiB, 500MB or bytes)") from None
    if name in ("scrub_rate", "upstream_min_rate"):  # bytes a second: "20MiB" or "20MiB/s"
        try:
            size = _typed(value, str | int | float)
            return parse_size(size.removesuffix("/s") if isinstance(size, str) else size)
        except (TypeError, ValueError):
            raise wrong("a rate in bytes a second (20MiB, 1KiB/s or bytes)") from None
    if isinstance(default, bool):
        try:
            return _boolean(value) if parse else _typed(value, bool)
        except (TypeError, ValueError):
            raise wrong("true or false") from None
    if isinstance(default, int):
        if parse and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
            return int(value)
        if not text and isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong("a whole number")
    if isinstance(default, float) or name in _OPTIONAL_NUMBERS:
        number = None
        if parse:
            with contextlib.suppress(ValueError):
                number = float(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        if number is None or not math.isfinite(number):
            raise wrong("a number")
        return number
    if name == "upstreams":
        return parse_upstreams(value)
    if name == "access":
        if text:
            raise wrong("[[access]] tables in the config file")
        return parse_access(value)
    if name in _OPTIONAL_PATHS:
        if not text:
            raise wrong("a path")
        if not value.strip():
            raise ConfigError(f"{where} is set but empty: give it a file, or unset it")
        return Path(value)
    if name == "max_size":
        try:
            return parse_size(_typed(value, str | int | float))
        except (TypeError, ValueError):
            raise wrong("a size (50GiB, 500MB or bytes)") from None
    if name in ("pinned", "redirect_allow", "trusted_proxies", "hosted"):
        if text:
            items = value.split(",")
        elif isinstance(value, list | tuple) and all(isinstance(i, str) for i in value):
            items = list(value)
        else:
            raise wrong(
                "a list of image names" if name == "pinned" else "a list of CIDRs or host names"
            )
        return tuple(i.strip() for i in items if i.strip())
    if not text:
        raise wrong("a string")
    if name in _NOT_EMPTY and not value.strip():
        raise ConfigError(
            f"{where} is set but empty: give it a value, or unset it for anonymous pulls"
        )
    if isinstance(default, Path):
        if not value.strip():
            # Path("") is the current directory: a cache spread over wherever
            # the server was started is never what an empty variable meant.
            raise ConfigError(f"{where} is set but empty: give it a folder, or unset it")
        return Path(value)
    if isinstance(default, URL):
        try:
            return URL(value.rstrip("/"))
        except ValueError:
            raise wrong("a URL") from None
    return value


def _typed(value: Any, kind: Any) -> Any:
    """``value`` if it is of ``kind`` (TOML's booleans are no numbers), else TypeError."""
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise TypeError(kind)
    return value


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any) -> int:
    """Bytes from 1073741824, "1GiB", "1.5 GB", "500MiB"."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if match is None or match[2].lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (try 50GiB or 500MB)")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def prepare_cache_dir(path: Path) -> None:
    """Create the cache folder if needed and check it can be written, so that a
    path that cannot work (``/proc/nope``, a read-only mount) stops the server or
    command with one line, not a traceback from deep inside."""
    probe = path / f".probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cache_dir {path} cannot be created or written: {reason}") from None


def load_settings(
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings; raises ConfigError with a message meant for the operator."""
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    if config_file is not None:
        try:
            with config_file.open("rb") as f:
                values.update(tomllib.load(f))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from None
        where.update({name: f"{name} (in {config_file})" for name in values})
    from_file = set(values)
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s) in {config_file}: {', '.join(unknown)}")
    for key, raw in (environ or {}).items():
        if not key.startswith(ENV_PREFIX) or key == f"{ENV_PREFIX}CONFIG":
            continue
        name = key.removeprefix(ENV_PREFIX).lower()
        if name in _FIELDS:
            values[name] = raw
            where[name] = f"{name} ({key})"
            from_file.discard(name)
        else:
            # Not fatal: Kubernetes alone sets PULLTHROUGH_SERVICE_HOST and
            # friends for a Service of that name.
            log.warning("ignoring %s: pullthrough has no setting %r", key, name)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
            where[name] = f"{name} (--{name.replace('_', '-')})"
            from_file.discard(name)
    converted = {
        k: _convert(k, v, where.get(k, k), from_file=k in from_file) for k, v in values.items()
    }
    return Settings(**converted)

from __future__ import annotations

import re
from pathlib import Path

import pytest
from yarl import URL

from pullthrough.proxy.auth import parse_challenge
from pullthrough.proxy.config import DOCKER_HUB, ConfigError, Settings, load_settings


def test_defaults_work_on_a_fresh_machine() -> None:
    settings = load_settings()
    assert settings.port == 5000
    assert settings.upstream == DOCKER_HUB
    assert settings.cache_dir == Path("pullthrough-cache")


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    config = tmp_path / "pullthrough.toml"
    config.write_text('port = 6000\nupstream = "http://registry.local:5000"\nworkers = 2\n')
    settings = load_settings(
        config_file=config,
        environ={"PULLTHROUGH_PORT": "7000", "PULLTHROUGH_WORKERS": "3", "HOME": "/root"},
        overrides={"port": 8000},
    )
    assert settings.port == 8000
    assert settings.workers == 3
    assert settings.upstream == URL("http://registry.local:5000")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PULLTHROUGH_PORT": "http"}, "port"),
        ({"PULLTHROUGH_PORT": "70000"}, "port"),
        ({"PULLTHROUGH_UPSTREAM": "ftp://x"}, "upstream"),
        ({"PULLTHROUGH_UPSTREAM": "https://x/some/path"}, "upstream"),
        ({"PULLTHROUGH_UPSTREAM_USERNAME": "bob"}, "go together"),
        ({"PULLTHROUGH_WORKERS": "0"}, "workers"),
        ({"PULLTHROUGH_LIBRARY_PREFIX": "maybe"}, "library_prefix"),
        ({"PULLTHROUGH_CACHE_DIR": ""}, "cache_dir .* is set but empty"),
        ({"PULLTHROUGH_CACHE_DIR": "  "}, "cache_dir .* is set but empty"),
        ({"PULLTHROUGH_PREFETCH": "sometimes"}, "prefetch"),
        ({"PULLTHROUGH_PREFETCH_PER_IMAGE": "0"}, "prefetch_per_image"),
        ({"PULLTHROUGH_PREFETCH_PER_IMAGE": "8", "PULLTHROUGH_PREFETCH_TOTAL": "4"}, "total"),
        ({"PULLTHROUGH_STORAGE": "bucket/prefix"}, "storage must be s3://bucket/prefix"),
        ({"PULLTHROUGH_STORAGE": "s3://Bad_Bucket"}, "storage must be s3://bucket/prefix"),
        ({"PULLTHROUGH_STORAGE": "s3://"}, "storage must be s3://bucket/prefix"),
        ({"PULLTHROUGH_STORAGE": "s3://bucket/a/../b"}, "prefix"),
        ({"PULLTHROUGH_STORAGE": "s3://bucket", "PULLTHROUGH_S3_ENDPOINT_URL": "x"}, "s3_endpoint"),
        ({"PULLTHROUGH_REDIRECT": "true"}, "redirect = true needs storage"),
    ],
)
def test_bad_values_are_refused_at_start_up(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=environ)


def test_storage_on_s3() -> None:
    settings = load_settings(
        environ={
            "PULLTHROUGH_STORAGE": "s3://mirror-blobs/fleet/a/",
            "PULLTHROUGH_S3_ENDPOINT_URL": "http://seaweedfs:8333",
            "PULLTHROUGH_S3_REGION": "eu-west-1",
            "PULLTHROUGH_REDIRECT": "true",
        }
    )
    location = settings.s3_location()
    assert location is not None
    assert (location.bucket, location.prefix) == ("mirror-blobs", "fleet/a/")
    assert (location.endpoint_url, location.region) == ("http://seaweedfs:8333", "eu-west-1")
    assert settings.redirect
    assert load_settings(environ={}).s3_location() is None


def test_password_never_in_repr() -> None:
    settings = Settings(upstream_username="bob", upstream_password="hunter2")
    assert "hunter2" not in repr(settings)


def test_unreadable_config_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = [")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(config_file=bad)


def test_challenge_parsing() -> None:
    challenge = parse_challenge(
        [
            'Basic realm="x"',
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"',
        ]
    )
    assert challenge is not None
    assert challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.docker.io/token"
    assert challenge.service == "registry.docker.io"
    assert challenge.params["scope"] == "repository:library/alpine:pull"
    assert parse_challenge([]) is None


def test_unknown_environment_is_a_warning_but_unknown_file_keys_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(environ={"PULLTHROUGH_SERVICE_HOST": "10.0.0.1"})
    assert settings.port == 5000
    assert "PULLTHROUGH_SERVICE_HOST" in caplog.text
    config = tmp_path / "pullthrough.toml"
    config.write_text("prot = 5000\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(config_file=config)


def test_upstreams_from_file_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "pullthrough.toml"
    config.write_text(
        '[upstreams."ghcr.io"]\n'
        'username = "bot"\npassword = "s3cret"\ntag_ttl = 60\n'
        '[upstreams."registry.local:5000"]\nurl = "http://10.0.0.5:5000"\noffline = true\n'
    )
    settings = load_settings(config_file=config)
    default, ghcr, local = settings.all_upstreams()
    assert (default.name, default.url, default.library_prefix) == ("docker.io", DOCKER_HUB, True)
    assert (ghcr.url, ghcr.username, ghcr.tag_ttl, ghcr.has_credentials) == (
        URL("https://ghcr.io"),
        "bot",
        60.0,
        True,
    )
    assert "s3cret" not in repr(settings)
    assert (local.url, local.offline, local.has_credentials) == (
        URL("http://10.0.0.5:5000"),
        True,
        False,
    )
    listed = load_settings(environ={"PULLTHROUGH_UPSTREAMS": "quay.io, registry.k8s.io"})
    assert [(u.name, str(u.url)) for u in listed.upstreams] == [
        ("quay.io", "https://quay.io"),
        ("registry.k8s.io", "https://registry.k8s.io"),
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("docker.io", "named twice"),
        ("quay.io,quay.io", "named twice"),
        ("https://quay.io", "host"),
        ("Quay.IO/x", "host"),
    ],
)
def test_bad_upstreams_are_refused(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ={"PULLTHROUGH_UPSTREAMS": value})


def test_upstream_table_with_unknown_key_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "pullthrough.toml"
    config.write_text('[upstreams."ghcr.io"]\nuser = "bot"\n')
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(config_file=config)


def test_a_file_with_every_type_right_loads(tmp_path: Path) -> None:
    config = tmp_path / "pullthrough.toml"
    config.write_text(
        'host = "127.0.0.1"\ncache_dir = "/var/cache/x"\noffline = true\nmax_size = "1GiB"\n'
        'pinned = ["alpine:3.19"]\nmax_age_days = 7\ntag_ttl = 60\nworkers = 2\n'
    )
    settings = load_settings(config_file=config, environ={"PULLTHROUGH_READ_TIMEOUT": "30"})
    assert (settings.host, settings.cache_dir, settings.offline) == (
        "127.0.0.1",
        Path("/var/cache/x"),
        True,
    )
    assert (settings.max_size, settings.pinned, settings.max_age_days) == (
        1024**3,
        ("alpine:3.19",),
        7.0,
    )
    assert (settings.tag_ttl, settings.workers, settings.read_timeout) == (60.0, 2, 30.0)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("workers = 2.5", "workers (in "),
        ('port = "5000"', "port (in "),
        ("offline = 1", "offline (in "),
        ("tag_ttl = true", "tag_ttl (in "),
        ("host = 5", "host (in "),
        ('upstream_password = ""', "upstream_password (in "),
        ('[upstreams."ghcr.io"]\nurl = 5', 'upstreams."ghcr.io".url'),
        ('[upstreams."ghcr.io"]\ntag_ttl = "60"', 'upstreams."ghcr.io".tag_ttl'),
    ],
)
def test_a_wrong_type_in_the_file_names_the_setting(
    tmp_path: Path, line: str, message: str
) -> None:
    config = tmp_path / "pullthrough.toml"
    config.write_text(line + "\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(config_file=config)


def test_read_ahead_is_on_by_default_and_can_be_switched_off() -> None:
    assert load_settings(environ={}).prefetch is True
    off = load_settings(environ={"PULLTHROUGH_PREFETCH": "false"})
    assert off.prefetch is False
    wider = load_settings(
        environ={"PULLTHROUGH_PREFETCH_PER_IMAGE": "6", "PULLTHROUGH_PREFETCH_TOTAL": "32"}
    )
    assert (wider.prefetch_per_image, wider.prefetch_total) == (6, 32)

"""Users, rights, tokens and forwarded addresses: the rules, without a server."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import bcrypt
import pytest

from pullthrough.proxy.access import (
    Authenticator,
    FailedLogins,
    HtpasswdError,
    Rights,
    Users,
    read_htpasswd,
)
from pullthrough.proxy.config import AccessRule, ConfigError, Settings, load_settings
from pullthrough.proxy.errors import TooManyRequests, Unauthorized
from pullthrough.proxy.forwarded import forwarded_client, networks
from pullthrough.proxy.server import StartupError, check_access
from pullthrough.proxy.tokens import InvalidToken, Tokens


def entry(user: str, password: str) -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{user}:$2y${hashed.removeprefix('$2b$')}"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def users(tmp_path: Path) -> Users:
    path = tmp_path / "htpasswd"
    path.write_text(f"# team\n{entry('carol', 'c')}\n\n{entry('dave', 'd')}\n")
    return Users(path)


def test_htpasswd_takes_bcrypt_entries_and_names_the_line_of_others(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(f"{entry('carol', 'c')}\nold:$apr1$abc$defghijklmnop\n")
    with pytest.raises(HtpasswdError, match=r"line 2 \(old\): not a bcrypt hash") as caught:
        read_htpasswd(path)
    assert "$apr1$" not in str(caught.value)  # the hash itself is never echoed
    path.write_text("just-a-name\n")
    with pytest.raises(HtpasswdError, match="line 1: not user:hash"):
        read_htpasswd(path)
    path.write_text(entry("anonymous", "x") + "\n")
    with pytest.raises(HtpasswdError, match="reserved name"):
        read_htpasswd(path)
    with pytest.raises(HtpasswdError, match="cannot read"):
        read_htpasswd(tmp_path / "missing")


def test_users_check_passwords_and_unknown_users_fail(users: Users) -> None:
    assert users.check("carol", "c")
    assert not users.check("carol", "d")
    assert not users.check("nobody", "c")  # checked against the dummy hash, still False
    assert not users.check("nobody", "")


async def test_verified_credentials_are_remembered_and_failures_limited(users: Users) -> None:
    auth = Authenticator(users, Tokens(b"k" * 32))
    assert await auth.user(basic("carol", "c"), "10.0.0.1") == "carol"
    assert await auth.user(None, "10.0.0.1") is None
    assert await auth.user("Basic Og==", "10.0.0.1") is None  # containers/image, no creds
    for _ in range(auth.failures.limit):
        with pytest.raises(Unauthorized):
            await auth.user(basic("carol", "wrong"), "10.0.0.2")
    with pytest.raises(TooManyRequests):
        await auth.user(basic("dave", "d"), "10.0.0.2")  # bcrypt is not run for it
    # Credentials verified already cost no bcrypt and still work from there.
    assert await auth.user(basic("carol", "c"), "10.0.0.2") == "carol"
    assert await auth.user(basic("dave", "d"), "10.0.0.1") == "dave"
    with pytest.raises(Unauthorized):
        await auth.user("Basic !!!", "10.0.0.3")


async def test_tokens_name_their_user_and_are_refused_when_forged(users: Users) -> None:
    tokens = Tokens(b"k" * 32)
    auth = Authenticator(users, tokens)
    assert await auth.user(f"Bearer {tokens.issue('carol')}", "a") == "carol"
    assert await auth.user(f"Bearer {tokens.issue(None)}", "a") is None
    forged = Tokens(b"x" * 32).issue("carol")
    with pytest.raises(InvalidToken):
        tokens.verify(forged)
    with pytest.raises(Unauthorized):
        await auth.user(f"Bearer {forged}", "a")
    with pytest.raises(InvalidToken):
        Tokens(b"k" * 32, lifetime=-1).verify(Tokens(b"k" * 32, lifetime=-1).issue("carol"))
    with pytest.raises(Unauthorized, match="no longer"):
        await auth.user(f"Bearer {tokens.issue('erin')}", "a")


def test_failed_logins_slide_out_of_the_window() -> None:
    failures = FailedLogins(limit=2, window=60)
    failures.record("a")
    assert failures.retry_after("a") == 0
    failures.record("a")
    assert 59 < failures.retry_after("a") <= 60
    assert failures.retry_after("b") == 0


def test_the_first_matching_rule_decides_and_the_default_keeps_anonymous_public() -> None:
    rights = Rights(
        [
            AccessRule(repository="private/*", pull=("carol",)),
            AccessRule(upstream="ghcr.io", repository="*", pull=("*",)),
        ]
    )
    assert rights.may_pull("carol", "docker.io", "private/secret")
    assert not rights.may_pull("dave", "docker.io", "private/secret")
    assert not rights.may_pull(None, "docker.io", "private/secret")
    assert rights.may_pull("dave", "ghcr.io", "owner/app")
    assert not rights.may_pull(None, "ghcr.io", "owner/app")  # users only there
    assert rights.may_pull(None, "docker.io", "library/alpine")  # the default rule
    assert rights.may_pull("dave", "docker.io", "team/deep/name")


def test_access_rules_are_checked_at_start_up(tmp_path: Path) -> None:
    config = tmp_path / "p.toml"
    config.write_text('htpasswd = "/x"\n[[access]]\nrepository = "a/*"\npull = ["carol"]\n')
    settings = load_settings(config_file=config)
    assert settings.access == (AccessRule(repository="a/*", pull=("carol",)),)
    for text, message in (
        ('[[access]]\npull = ["carol"]\n', "need users"),
        ('htpasswd = "/x"\n[[access]]\npull = "carol"\n', "list of user names"),
        ('htpasswd = "/x"\n[[access]]\npush = ["anonymous"]\n', "never push"),
        ('htpasswd = "/x"\n[[access]]\nrepo = "a"\n', "unknown setting"),
        ('tls_cert = "/c"\n', "go together"),
        ('htpasswd = ""\n', "set but empty"),
        ("htpasswd = 1\n", "a path"),
        ('metrics_listen = "9102"\n', "host:port"),
        ('trusted_proxies = ["10.0.0.0/33"]\n', "trusted_proxies"),
    ):
        config.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_settings(config_file=config)


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    trusted = networks(["10.0.0.0/8"])
    assert forwarded_client("203.0.113.9", ["1.2.3.4"], trusted) == "203.0.113.9"
    assert forwarded_client("10.0.0.5", ["1.2.3.4"], trusted) == "1.2.3.4"
    # A client writing its own X-Forwarded-For gets the address the proxy saw.
    assert forwarded_client("10.0.0.5", ["6.6.6.6, 1.2.3.4"], trusted) == "1.2.3.4"
    assert forwarded_client("10.0.0.5", ["1.2.3.4, 10.0.0.7"], trusted) == "1.2.3.4"
    assert forwarded_client("10.0.0.5", ["junk"], trusted) == "10.0.0.5"
    assert forwarded_client("10.0.0.5", [], trusted) == "10.0.0.5"


def test_start_up_warns_when_credentials_are_open_to_the_network(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def settings(host: str, **more: object) -> Settings:
        return Settings(
            host=host,
            cache_dir=tmp_path,
            upstream_username="mirror",
            upstream_password="pw",
            **more,  # type: ignore[arg-type]
        )

    with caplog.at_level(logging.WARNING, logger="pullthrough"):
        check_access(settings("127.0.0.1"))
        assert not caplog.records
        check_access(settings("0.0.0.0"))
    (record,) = caplog.records
    assert "without htpasswd while docker.io has credentials" in record.getMessage()

    broken = tmp_path / "bad.pem"
    broken.write_text("not a certificate")
    with pytest.raises(StartupError, match=r"bad\.pem"):
        check_access(settings("0.0.0.0", tls_cert=broken, tls_key=broken))
    with pytest.raises(StartupError, match="cannot read htpasswd"):
        check_access(settings("0.0.0.0", htpasswd=tmp_path / "none"))

"""HTTPS, users and rights, and private upstream content only for those granted it.

The mirror runs as a real process with a certificate from a CA made here, an
htpasswd file, and the upstream's credentials (alice, who may read
``private/*`` upstream); real clients pull through it over TLS.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from cryptography import x509

from tests.integration.test_clients import (
    PLATFORM,
    base_env,
    config_digest,
    mounts_under,
    podman_sandbox,
    require_root,
    run,
    start_containerd,
    start_dockerd,
)
from tests.support.binaries import require_binary
from tests.support.images import BIG, HELLO, SECRET
from tests.support.mirror import MirrorProcess
from tests.support.pki import LocalCA
from tests.support.registry import Registry
from tests.support.skopeo import Skopeo, dir_blob_digests, dir_manifest
from tests.support.tokenserver import ALICE

# The mirror's own users (not the upstream's): carol may read private/*, dave not.
CAROL = ("carol", "carol-secret")
DAVE = ("dave", "dave-secret")
ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def htpasswd_line(user: str, password: str) -> str:
    """What `htpasswd -B` writes: bcrypt with the $2y$ prefix."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    return f"{user}:$2y${hashed.removeprefix('$2b$')}\n"


def basic(creds: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


@dataclass
class Secure:
    mirror: MirrorProcess
    ca: LocalCA
    cert: Path
    key: Path
    metrics_port: int

    @property
    def host(self) -> str:
        return self.mirror.url.removeprefix("https://")

    @property
    def cert_dir(self) -> Path:
        """A directory holding only the CA, as skopeo's and podman's --cert-dir want."""
        return self.ca.directory


@pytest.fixture
def secure(upstream: Registry, tmp_path: Path) -> Iterator[Secure]:
    ca = LocalCA(tmp_path / "ca")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    ca.issue("mirror one", cert, key)
    users = tmp_path / "htpasswd"
    users.write_text(htpasswd_line(*CAROL) + htpasswd_line(*DAVE))
    metrics_port = free_port()
    config = tmp_path / "pullthrough.toml"
    config.write_text(
        f'htpasswd = "{users}"\n'
        f'tls_cert = "{cert}"\n'
        f'tls_key = "{key}"\n'
        f'metrics_listen = "127.0.0.1:{metrics_port}"\n'
        "[[access]]\n"
        'repository = "private/*"\n'
        'pull = ["carol"]\n'
    )
    mirror = MirrorProcess(
        tmp_path / "cache",
        upstream.url,
        config=config,
        ca=ca.cert_path,
        env={
            "PULLTHROUGH_UPSTREAM_USERNAME": ALICE[0],
            "PULLTHROUGH_UPSTREAM_PASSWORD": ALICE[1],
        },
    )
    try:
        mirror.start()
        yield Secure(mirror, ca, cert, key, metrics_port)
    finally:
        mirror.stop()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def fetch(
    secure: Secure,
    path: str,
    *,
    creds: tuple[str, str] | None = None,
    method: str = "GET",
) -> Answer:
    request = urllib.request.Request(f"{secure.mirror.url}{path}", method=method)
    request.add_header("Accept", ACCEPT)
    if creds is not None:
        request.add_header("Authorization", basic(creds))
    context = ssl.create_default_context(cafile=secure.ca.cert_path)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:
            return Answer(resp.status, dict(resp.headers), resp.read())
    except urllib.error.HTTPError as err:
        return Answer(err.code, dict(err.headers), err.read())


def test_anonymous_clients_get_the_same_401_for_private_and_absent_repositories(
    upstream: Registry, secure: Secure
) -> None:
    secret = upstream.images[SECRET]
    tokens = upstream.tokens.mark()
    mark = upstream.mark()

    realm = f'Bearer realm="{secure.mirror.url}/token",service="pullthrough"'
    ping = fetch(secure, "/v2/")
    assert ping.status == 401
    assert ping.headers["WWW-Authenticate"] == realm

    answers = {}
    # This upstream lets anonymous clients pull everything but private/*, so a
    # repository absent there is private/nothing (Docker Hub: any absent one).
    for repository in ("private/secret", "private/nothing"):
        for method, path in (
            ("GET", "manifests/1"),
            ("HEAD", "manifests/1"),
            ("GET", f"manifests/{secret.digest}"),
            ("GET", f"blobs/{secret.blobs[0].digest}"),
            ("HEAD", f"blobs/{secret.blobs[0].digest}"),
            ("GET", "tags/list"),
        ):
            answer = fetch(secure, f"/v2/{repository}/{path}", method=method)
            answers[repository, method, path] = answer
            assert answer.status == 401, (repository, method, path, answer)
            assert answer.headers["WWW-Authenticate"] == (
                f'{realm},scope="repository:{repository}:pull"'
            )
            if method == "GET":
                body = answer.json()
                assert body["errors"][0]["code"] == "UNAUTHORIZED"
                assert body["errors"][0]["detail"] == {"repository": repository, "action": "pull"}

    # private/secret exists upstream, private/nothing does not: nothing tells them apart.
    for (repository, method, path), answer in answers.items():
        if repository == "private/secret":
            other = answers["private/nothing", method, path]
            assert answer.body.replace(b"secret", b"nothing") == other.body
            assert answer.headers.keys() == other.headers.keys()
            assert (
                answer.headers["WWW-Authenticate"].replace("secret", "nothing")
                == (other.headers["WWW-Authenticate"])
            )

    # Nothing was fetched upstream for them: only anonymous questions, refused.
    for entry in upstream.requests_since(mark):
        assert entry.status == 401 or not entry.path.startswith("/v2/private/"), entry
        assert "/manifests/" not in entry.path, entry
        assert "/blobs/" not in entry.path, entry
    assert all(t.user is None for t in upstream.tokens.requests_since(tokens))

    # Public content stays anonymous.
    hello = upstream.images[HELLO]
    public = fetch(secure, "/v2/library/hello/manifests/latest")
    assert public.status == 200
    assert public.body == hello.top.data


def test_a_user_with_the_right_pulls_private_content_one_without_gets_denied(
    upstream: Registry, secure: Secure
) -> None:
    secret = upstream.images[SECRET]
    mark = upstream.mark()
    denied = fetch(secure, "/v2/private/secret/manifests/1", creds=DAVE)
    assert denied.status == 403
    assert denied.json()["errors"][0]["code"] == "DENIED"
    assert not [e for e in upstream.requests_since(mark) if e.path.startswith("/v2/private/")]

    wrong = fetch(secure, "/v2/private/secret/manifests/1", creds=(CAROL[0], "guess"))
    assert wrong.status == 401
    assert "WWW-Authenticate" in wrong.headers
    assert wrong.json()["errors"][0]["code"] == "UNAUTHORIZED"

    granted = fetch(secure, "/v2/private/secret/manifests/1", creds=CAROL)
    assert granted.status == 200
    assert granted.body == secret.top.data
    layer = secret.blobs[-1]
    assert fetch(secure, f"/v2/private/secret/blobs/{layer.digest}", creds=CAROL).body == (
        layer.data
    )
    # Cached now, and the cache serves by digest: naming a public repository
    # does not get an anonymous client the private layer, nor the manifest.
    for path in (f"blobs/{layer.digest}", f"manifests/{secret.digest}"):
        sideways = fetch(secure, f"/v2/library/hello/{path}")
        assert sideways.status == 401, path
    hello = upstream.images[HELLO]
    own = hello.blobs[-1]
    assert fetch(secure, f"/v2/library/hello/blobs/{own.digest}").body == own.data
    assert fetch(secure, "/v2/", creds=CAROL).status == 200
    # dave may pull the rest.
    assert fetch(secure, "/v2/library/hello/manifests/latest", creds=DAVE).status == 200

    # Metrics and probes live on their own plain-HTTP address, not on the registry port.
    assert fetch(secure, "/metrics", creds=CAROL).status == 404
    metrics = f"http://127.0.0.1:{secure.metrics_port}"
    with urllib.request.urlopen(f"{metrics}/metrics", timeout=5) as resp:
        assert b"pullthrough_requests_total" in resp.read()
    with urllib.request.urlopen(f"{metrics}/readyz", timeout=5) as resp:
        assert json.loads(resp.read())["status"] == "ready"

    # Failed logins from one address are limited; a login already verified still works.
    statuses = [fetch(secure, "/v2/", creds=(DAVE[0], f"guess-{i}")).status for i in range(12)]
    assert statuses[:9] == [401] * 9
    assert statuses[-1] == 429
    assert fetch(secure, "/v2/", creds=CAROL).status == 200


def test_skopeo_pulls_over_https_anonymous_public_and_with_credentials_private(
    upstream: Registry, secure: Secure, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    hello, secret = upstream.images[HELLO], upstream.images[SECRET]
    tls = ["--src-cert-dir", str(secure.cert_dir)]

    def copy(ref: str, dest: Path, creds: tuple[str, str] | None) -> int:
        args = ["copy", *tls, *Skopeo._creds("src", creds)]
        result = skopeo_cli.run(*args, f"docker://{secure.host}/{ref}", f"dir:{dest}", check=False)
        return result.returncode

    assert copy("library/hello:latest", tmp_path / "hello", None) == 0
    assert dir_manifest(tmp_path / "hello") == hello.top.data
    assert copy("private/secret:1", tmp_path / "anon", None) != 0
    assert copy("private/secret:1", tmp_path / "dave", DAVE) != 0
    assert copy("private/secret:1", tmp_path / "carol", CAROL) == 0
    assert dir_manifest(tmp_path / "carol") == secret.top.data
    assert dir_blob_digests(tmp_path / "carol") == {b.digest for b in secret.blobs_of(secret.top)}


def served_certificate(port: int, ca: Path) -> x509.Certificate:
    context = ssl.create_default_context(cafile=ca)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_sighup_reloads_the_certificate_without_dropping_connections(
    upstream: Registry, secure: Secure
) -> None:
    port = secure.mirror.port
    assert served_certificate(port, secure.ca.cert_path).subject.rfc4514_string() == (
        "CN=mirror one"
    )
    # A keep-alive connection opened before the renewal.
    context = ssl.create_default_context(cafile=secure.ca.cert_path)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as held:
        request = (
            b"GET /v2/library/hello/manifests/latest HTTP/1.1\r\nHost: x\r\n"
            b"Accept: " + ACCEPT.encode() + b"\r\n\r\n"
        )
        held.sendall(request)
        assert held.recv(65536).startswith(b"HTTP/1.1 200")

        secure.ca.issue("mirror two", secure.cert, secure.key)
        assert secure.mirror.proc is not None
        os.kill(secure.mirror.proc.pid, signal.SIGHUP)
        for _ in range(100):
            cn = served_certificate(port, secure.ca.cert_path).subject.rfc4514_string()
            if cn == "CN=mirror two":
                break
        assert cn == "CN=mirror two"

        held.sendall(request)  # the old connection still serves
        assert held.recv(65536).startswith(b"HTTP/1.1 200")
    assert "TLS certificate reloaded" in secure.mirror.log.read_text()


# ------------------------------------------------------------------------ containerd


def test_containerd_pulls_over_https_with_the_ca_and_a_header(
    upstream: Registry, secure: Secure, tmp_path: Path
) -> None:
    ctr = require_binary("ctr")
    require_root("containerd")
    env = base_env(tmp_path / "home")
    short = Path(f"/tmp/pt-ctr-{os.getpid()}-{secure.mirror.port}")
    short.mkdir()
    hosts_public, hosts_login = tmp_path / "public", tmp_path / "login"
    for hosts, header in ((hosts_public, ""), (hosts_login, basic(CAROL))):
        (hosts / "docker.io").mkdir(parents=True)
        (hosts / "docker.io" / "hosts.toml").write_text(
            'server = "https://registry-1.docker.io"\n\n'
            f'[host."{secure.mirror.url}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
            f'  ca = "{secure.ca.cert_path}"\n'
            + (
                f'  [host."{secure.mirror.url}".header]\n    Authorization = "{header}"\n'
                if header
                else ""
            )
        )
    try:
        with contextlib.ExitStack() as stack:
            sock = start_containerd(stack, short / "containerd", tmp_path / "containerd.log")

            def pull(hosts: Path, ref: str) -> None:
                run(
                    [
                        ctr,
                        "--address",
                        sock,
                        "images",
                        "pull",
                        "--hosts-dir",
                        hosts,
                        "--platform",
                        PLATFORM,
                        "--snapshotter",
                        "native",
                        ref,
                    ],
                    env,
                )

            pull(hosts_public, "docker.io/library/hello:latest")
            with pytest.raises(AssertionError, match=r"401|nauthorized"):
                pull(hosts_public, "docker.io/private/secret:1")
            pull(hosts_login, "docker.io/private/secret:1")
            listed = run([ctr, "--address", sock, "images", "ls"], env)
            assert upstream.images[SECRET].digest in listed
            assert upstream.images[HELLO].digest in listed
    finally:
        shutil.rmtree(short, ignore_errors=True)


# ------------------------------------------------------------------------ podman


def test_podman_pulls_over_https_with_cert_dir_and_creds(
    upstream: Registry, secure: Secure, tmp_path: Path
) -> None:
    podman = require_binary("podman")
    require_root("podman")
    store = Path(f"/tmp/pt-podman-{os.getpid()}-{secure.mirror.port}")
    conf, env, podman_ = podman_sandbox(podman, tmp_path, store)

    def pull(ref: str, *creds: str | Path) -> str:
        return run(
            [*podman_, "pull", "--quiet", "--platform", PLATFORM,
             "--authfile", conf / "auth.json", "--signature-policy", conf / "policy.json",
             "--cert-dir", secure.cert_dir, *creds, f"{secure.host}/{ref}"],
            env,
        ).strip()  # fmt: skip

    try:
        hello, secret = upstream.images[HELLO], upstream.images[SECRET]
        assert f"sha256:{pull('library/hello:latest')}" == config_digest(hello)
        with pytest.raises(AssertionError, match=r"nauthorized|401"):
            pull("private/secret:1")
        assert f"sha256:{pull('private/secret:1', '--creds', ':'.join(CAROL))}" == (
            config_digest(secret)
        )
        # podman login stores the credentials; a pull then sends them.
        run([*podman_, "login", "--authfile", conf / "auth.json", "--cert-dir",
             secure.cert_dir, "-u", DAVE[0], "-p", DAVE[1], secure.host], env)  # fmt: skip
        with pytest.raises(AssertionError, match=r"denied|403"):
            pull("private/secret:1")
    finally:
        for target in sorted(mounts_under(store), key=len, reverse=True):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)
        shutil.rmtree(store, ignore_errors=True)


# ------------------------------------------------------------------------ dockerd


def test_docker_login_then_pull_over_https_with_certs_d(
    upstream: Registry, secure: Secure, tmp_path: Path
) -> None:
    dockerd = require_binary("dockerd")
    docker = require_binary("docker")
    require_root("dockerd")
    # dockerd 20.10 reads certs.d only from /etc/docker/certs.d (no setting moves it).
    certs = Path("/etc/docker/certs.d") / secure.host
    if certs.exists():
        pytest.skip(f"{certs} exists already; not touching it")
    short = Path(f"/tmp/pt-docker-{os.getpid()}-{secure.mirror.port}")
    certs.mkdir(parents=True)
    try:
        shutil.copy(secure.ca.cert_path, certs / "ca.crt")
        with contextlib.ExitStack() as stack:
            env = start_dockerd(stack, dockerd, short, tmp_path)
            secret, hello = upstream.images[SECRET], upstream.images[HELLO]
            # Anonymous: public content yes (with an anonymous token), private no.
            public = f"{secure.host}/library/hello:latest"
            run([docker, "pull", "--quiet", "--platform", PLATFORM, public], env)
            (info,) = json.loads(run([docker, "image", "inspect", public], env))
            assert info["Id"] == config_digest(hello)
            ref = f"{secure.host}/private/secret:1"
            # 127.0.0.0/8 is an insecure registry to dockerd whatever its
            # config: after the HTTPS attempt's 401 it tries plain HTTP, which
            # this mirror does not speak, and may report that failure instead.
            with pytest.raises(AssertionError, match=r"nauthorized|denied|401|EOF"):
                run([docker, "pull", "--quiet", ref], env)
            assert "GET /v2/private/secret/manifests/1 401" in secure.mirror.log.read_text()
            with pytest.raises(AssertionError, match=r"nauthorized|401"):
                run([docker, "login", "-u", CAROL[0], "-p", "wrong", secure.host], env)
            run([docker, "login", "-u", CAROL[0], "-p", CAROL[1], secure.host], env)
            run([docker, "pull", "--quiet", "--platform", PLATFORM, ref], env)
            (info,) = json.loads(run([docker, "image", "inspect", ref], env))
            assert info["Id"] == config_digest(secret)
            requests = secure.mirror.log.read_text()
            assert re.search(r"(GET|HEAD) /v2/private/secret/manifests/\S+ 200", requests)
    finally:
        shutil.rmtree(certs, ignore_errors=True)
        for target in sorted(mounts_under(short), key=len, reverse=True):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)
        shutil.rmtree(short, ignore_errors=True)


def test_cached_blobs_over_https_are_whole_ranged_and_a_client_leaving_is_no_error(
    upstream: Registry, secure: Secure
) -> None:
    big = upstream.images[BIG]
    layer = max(big.blobs, key=lambda b: len(b.data))
    path = f"/v2/library/big/blobs/{layer.digest}"
    log = secure.mirror.log
    assert fetch(secure, path).body == layer.data  # a miss, streamed while it downloads
    for _ in range(50):  # committed just after its last byte went out
        assert fetch(secure, path).body == layer.data
        if f"GET {path} 200 hit {len(layer.data)}B" in log.read_text():
            break
        time.sleep(0.1)
    assert f"GET {path} 200 hit {len(layer.data)}B" in log.read_text()  # copied through TLS

    context = ssl.create_default_context(cafile=secure.ca.cert_path)
    raw = socket.create_connection(("127.0.0.1", secure.mirror.port), timeout=10)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=10-19\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(layer.data[10:20]):
            answer += tls.recv(65536)
        assert answer.startswith(b"HTTP/1.1 206")
        # Now leave in the middle of the whole blob.
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert tls.recv(65536)
    last = ""
    for _ in range(50):
        last = log.read_text().rsplit(f"GET {path} ", 1)[-1]
        if not last.startswith("206"):
            break
        time.sleep(0.1)
    # Logged with the bytes really sent, quietly: asyncio's own TLS stand-in
    # for sendfile logged "SSL connection is closed" for every chunk it went
    # on writing, and claimed the whole blob sent.
    status, result, sent = last.split()[:3]
    assert (status, result) == ("200", "hit")
    assert int(sent.removesuffix("B")) < len(layer.data)
    text = log.read_text()
    assert "SSL connection is closed" not in text
    assert "Traceback" not in text


# ------------------------------------------------------------------------ nginx in front


def test_behind_nginx_terminating_tls_as_the_readme_configures_it(
    upstream: Registry, skopeo_cli: Skopeo, tmp_path: Path
) -> None:
    """The README's nginx server block, with this test's ports and files."""
    nginx = require_binary("nginx")
    ca = LocalCA(tmp_path / "ca")
    cert, key = tmp_path / "mirror.crt", tmp_path / "mirror.key"
    ca.issue("nginx front", cert, key)
    users = tmp_path / "htpasswd"
    users.write_text(htpasswd_line(*CAROL))
    config = tmp_path / "pullthrough.toml"
    config.write_text(f'htpasswd = "{users}"\ntrusted_proxies = ["127.0.0.1/32"]\n')
    mirror = MirrorProcess(
        tmp_path / "cache",
        upstream.url,
        config=config,
        env={
            "PULLTHROUGH_UPSTREAM_USERNAME": ALICE[0],
            "PULLTHROUGH_UPSTREAM_PASSWORD": ALICE[1],
        },
    )
    port = free_port()
    work = tmp_path / "nginx"
    (work / "tmp").mkdir(parents=True)
    (work / "nginx.conf").write_text(
        (f"user {os.environ.get('USER', 'root')};\n" if os.geteuid() == 0 else "")
        + f"""daemon off; worker_processes 1; pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 128; }}
http {{
  access_log off;
  client_body_temp_path {work}/tmp; proxy_temp_path {work}/tmp;
  fastcgi_temp_path {work}/tmp; uwsgi_temp_path {work}/tmp; scgi_temp_path {work}/tmp;
  server {{
    listen 127.0.0.1:{port} ssl http2;
    server_name mirror.example;
    ssl_certificate     {cert};
    ssl_certificate_key {key};
    client_max_body_size 0;
    proxy_buffering off;
    proxy_request_buffering off;
    proxy_read_timeout 900s;
    location / {{
      proxy_pass http://127.0.0.1:{mirror.port};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $http_host;
    }}
  }}
}}
"""
    )
    front = subprocess.Popen(
        [nginx, "-c", str(work / "nginx.conf"), "-e", str(work / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        mirror.start()
        secure = Secure(mirror, ca, cert, key, 0)
        secure.mirror.url = f"https://127.0.0.1:{port}"  # clients see only nginx
        for _ in range(100):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            time.sleep(0.05)
        ping = fetch(secure, "/v2/")
        assert ping.status == 401
        # The realm is where the client connected: nginx, over https.
        assert ping.headers["WWW-Authenticate"].startswith(
            f'Bearer realm="https://127.0.0.1:{port}/token"'
        )
        hello, secret = upstream.images[HELLO], upstream.images[SECRET]
        base = ["copy", "--src-cert-dir", str(ca.directory)]
        src = f"docker://127.0.0.1:{port}"
        skopeo_cli.run(
            *base, "--src-no-creds", f"{src}/library/hello:latest", f"dir:{tmp_path / 'h'}"
        )
        assert dir_manifest(tmp_path / "h") == hello.top.data
        refused = skopeo_cli.run(
            *base, "--src-no-creds", f"{src}/private/secret:1", f"dir:{tmp_path / 'x'}", check=False
        )
        assert refused.returncode != 0
        skopeo_cli.run(
            *base,
            "--src-creds",
            ":".join(CAROL),
            f"{src}/private/secret:1",
            f"dir:{tmp_path / 's'}",
        )
        assert dir_manifest(tmp_path / "s") == secret.top.data
        # Failed logins are logged (and limited) by the address nginx forwarded.
        wrong = fetch(secure, "/v2/", creds=(CAROL[0], "wrong"))
        assert wrong.status == 401
        assert "failed login for user 'carol' from 127.0.0.1" in mirror.log.read_text()
    finally:
        front.terminate()
        front.wait(10)
        mirror.stop()

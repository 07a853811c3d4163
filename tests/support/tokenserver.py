"""A small Docker-Hub-like token server for the integration tests.

It signs JWTs the way distribution's ``auth.token`` access controller expects:
the header carries the signing certificate in ``x5c`` (base64 DER) and, as a
fallback, a libtrust-style ``kid``; the certificate is written to
:attr:`TokenServer.cert_path` for the registry's ``rootcertbundle``.

The server runs on its own event loop in a background thread so a
session-scoped fixture can share it with tests that each get a fresh loop.

Access policy (mirrors what the proxy will meet on Docker Hub):

* anonymous: ``pull`` on every repository except ``private/*``;
* ``alice:wonderland``: ``pull`` everywhere, including ``private/*``;
* ``pusher:pushpass``: ``pull``, ``push`` and ``delete`` everywhere, plus
  ``registry:catalog:*``;
* wrong or malformed credentials: HTTP 401.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import json
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.support import httpclient
from tests.support.processes import Service

DEFAULT_ISSUER = "pullthrough-test-issuer"
DEFAULT_SERVICE = "pullthrough-test"

PUSHER = ("pusher", "pushpass")
ALICE = ("alice", "wonderland")
DEFAULT_USERS: Mapping[str, str] = {PUSHER[0]: PUSHER[1], ALICE[0]: ALICE[1]}
PRIVATE_PREFIX = "private/"


class TokenRequest(NamedTuple):
    """One request seen by the token server: the scopes asked for (space-joined,
    ``""`` when none) and the authenticated user (``None`` for anonymous)."""

    scope: str
    user: str | None


class Access(NamedTuple):
    """One entry of a token's ``access`` claim."""

    type: str
    name: str
    actions: tuple[str, ...]

    def claim(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


KeyType = Literal["ec", "rsa"]
_PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def libtrust_key_id(public_key_der: bytes) -> str:
    """The libtrust fingerprint distribution uses for ``kid``: base32 of the first
    240 bits of sha256(DER SubjectPublicKeyInfo), in 12 groups of 4."""
    b32 = base64.b32encode(hashlib.sha256(public_key_der).digest()[:30]).decode("ascii")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


def parse_scope(scope: str) -> tuple[str, str, tuple[str, ...]] | None:
    """Split ``type[(class)]:name:action,action`` (name may contain ``:``)."""
    rtype, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not rtype or not name:
        return None
    rtype = rtype.split("(", 1)[0]
    return rtype, name, tuple(a for a in actions.split(",") if a)


class TokenServer(Service):
    """Background-thread token server; see the module docstring for the policy."""

    def __init__(
        self,
        *,
        issuer: str = DEFAULT_ISSUER,
        default_service: str = DEFAULT_SERVICE,
        expires_in: int = 300,
        key_type: KeyType = "ec",
        users: Mapping[str, str] = DEFAULT_USERS,
        workdir: Path | None = None,
        include_x5c: bool = True,
        include_kid: bool = True,
    ) -> None:
        self.issuer = issuer
        self.default_service = default_service
        #: ``expires_in`` (and ``exp - iat``) of newly issued tokens; may be changed live.
        self.expires_in = expires_in
        self.users = dict(users)
        self.include_x5c = include_x5c
        self.include_kid = include_kid
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="pt-tokens-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)

        self._key: _PrivateKey
        self._algorithm: str
        if key_type == "ec":
            self._key = ec.generate_private_key(ec.SECP256R1())
            self._algorithm = "ES256"
        else:
            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self._algorithm = "RS256"
        self.certificate = _self_signed_certificate(self._key, issuer)
        self.cert_pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self.cert_path = self.workdir / "token-root.pem"
        self.cert_path.write_bytes(self.cert_pem)
        spki = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.key_id = libtrust_key_id(spki)
        self._x5c = base64.b64encode(
            self.certificate.public_bytes(serialization.Encoding.DER)
        ).decode("ascii")

        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._rejected = 0
        self._port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("token server was never started")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        """The token endpoint, as the registry advertises it in its challenge."""
        return f"{self.url}/token"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; after a :meth:`stop` this binds the same port again."""
        if self.running:
            return
        ready = threading.Event()
        errors: list[BaseException] = []
        thread = threading.Thread(
            target=self._serve, args=(ready, errors), name="pt-token-server", daemon=True
        )
        thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("token server did not start in time")
        if errors:
            thread.join(timeout)
            raise RuntimeError("token server failed to start") from errors[0]
        self._thread = thread

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (idempotent). The port is remembered for :meth:`start`."""
        thread, loop, runner = self._thread, self._loop, self._runner
        if thread is None or loop is None:
            return
        if runner is not None and thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(runner.cleanup(), loop)
            fut.result(timeout)
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = self._loop = self._runner = None

    def close(self) -> None:
        """Stop and remove the temporary directory holding the certificate."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _serve(self, ready: threading.Event, errors: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            app = web.Application()
            app.router.add_get("/token", self._handle_token)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
            loop.run_until_complete(runner.setup())
            self._runner = runner
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", self._port))
                port = sock.getsockname()[1]
                site = web.SockSite(runner, sock)
                loop.run_until_complete(site.start())
            except BaseException:
                sock.close()
                raise
            self._port = port
        except BaseException as exc:
            errors.append(exc)
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
                self._runner = None
            loop.close()
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    # ------------------------------------------------------------------ accounting

    @property
    def requests(self) -> list[TokenRequest]:
        """Every token request answered 200 so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def count(self) -> int:
        """How many tokens have been issued."""
        with self._lock:
            return len(self._requests)

    @property
    def rejected(self) -> int:
        """How many token requests were refused with 401 (bad credentials)."""
        with self._lock:
            return self._rejected

    def mark(self) -> int:
        """A position to pass to :meth:`requests_since`."""
        return self.count

    def requests_since(self, mark: int) -> list[TokenRequest]:
        return self.requests[mark:]

    # ------------------------------------------------------------------ policy

    def authenticate(self, authorization: str | None) -> tuple[bool, str | None]:
        """``(ok, user)`` for an ``Authorization`` header value (``None``: anonymous)."""
        if not authorization:
            return True, None
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False, None
        user, sep, password = decoded.partition(":")
        if not sep or not secrets.compare_digest(self.users.get(user, "\0"), password):
            return False, None
        return True, user

    def grant(self, user: str | None, scopes: Iterable[str]) -> list[Access]:
        """The access entries ``user`` gets for the requested ``scopes``."""
        granted: list[Access] = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            rtype, name, wanted = parsed
            allowed = self._allowed(user, rtype, name)
            actions = tuple(a for a in wanted if a in allowed or "*" in allowed)
            if actions:
                granted.append(Access(rtype, name, actions))
        return granted

    def _allowed(self, user: str | None, rtype: str, name: str) -> frozenset[str]:
        if user == PUSHER[0]:
            if rtype == "registry":
                return frozenset({"*"})
            return frozenset({"pull", "push", "delete", "*"})
        if rtype != "repository":
            return frozenset()
        if name.startswith(PRIVATE_PREFIX):
            return frozenset({"pull"}) if user == ALICE[0] else frozenset()
        return frozenset({"pull"})

    def issue(
        self,
        access: Sequence[Access] = (),
        *,
        user: str | None = None,
        service: str | None = None,
        expires_in: int | None = None,
    ) -> str:
        """Mint a signed JWT directly (not counted as a request)."""
        now = int(time.time())
        ttl = self.expires_in if expires_in is None else expires_in
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": service or self.default_service,
            "exp": now + ttl,
            "nbf": now,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": [a.claim() for a in access],
        }
        headers: dict[str, Any] = {"typ": "JWT"}
        if self.include_x5c:
            headers["x5c"] = [self._x5c]
        if self.include_kid:
            headers["kid"] = self.key_id
        return jwt.encode(claims, self._key, algorithm=self._algorithm, headers=headers)

    def decode(self, token: str, *, service: str | None = None) -> dict[str, Any]:
        """Verify and decode a token issued by this server (for assertions)."""
        claims: dict[str, Any] = jwt.decode(
            token,
            self._key.public_key(),
            algorithms=[self._algorithm],
            audience=service or self.default_service,
            issuer=self.issuer,
        )
        return claims

    def fetch(
        self,
        *scopes: str,
        credentials: tuple[str, str] | None = None,
        service: str | None = None,
    ) -> str:
        """Ask this server for a token over HTTP, like a client would (counted)."""
        return httpclient.fetch_token(
            self.realm,
            service=service or self.default_service,
            scopes=scopes,
            credentials=credentials,
        )

    # ------------------------------------------------------------------ HTTP

    async def _handle_token(self, request: web.Request) -> web.Response:
        ok, user = self.authenticate(request.headers.get("Authorization"))
        if not ok:
            with self._lock:
                self._rejected += 1
            return web.json_response(
                {"details": "incorrect username or password"},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="pullthrough-test"'},
            )
        scopes = [s for raw in request.query.getall("scope", []) for s in raw.split()]
        service = request.query.get("service") or self.default_service
        with self._lock:
            self._requests.append(TokenRequest(" ".join(scopes), user))
        token = self.issue(self.grant(user, scopes), user=user, service=service)
        issued_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        body = {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": issued_at,
        }
        return web.Response(text=json.dumps(body), content_type="application/json")


def _self_signed_certificate(key: _PrivateKey, common_name: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )

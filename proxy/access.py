"""Who is pulling, and may they: htpasswd users, their rights, and the check per request.

Clients log in with HTTP Basic (``docker login``, ``--creds``, a ``hosts.toml``
header); they then send the same credentials with every request. bcrypt costs
tens of milliseconds by design, so a verified ``Authorization`` value is kept in
memory (under an HMAC with a per-process key, never the password itself) and a
repeat costs one hash; concurrent first requests with the same credentials share
one bcrypt run. Failed logins are limited per client address, and an unknown
user costs the same bcrypt work as a wrong password (against a dummy hash of the
file's highest cost), so timing does not tell which users exist.

Anonymous clients get only what every upstream serves anonymously: for an
upstream with credentials, :mod:`proxy.visibility` asks it. A private or absent
repository gets the same 401 either way, so nothing tells them it exists.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import fnmatch
import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from aiohttp import web
from aiohttp.typedefs import Handler

from pullthrough.proxy.config import ANONYMOUS, EVERY_USER, AccessRule, Settings
from pullthrough.proxy.errors import Denied, TooManyRequests, Unauthorized
from pullthrough.proxy.forwarded import client_address, forwarded_origin
from pullthrough.proxy.tokens import TOKEN_PATH, InvalidToken, Tokens, challenge, origin, token_body
from pullthrough.proxy.visibility import VISIBILITY

log = logging.getLogger(__name__)

# bcrypt's own limit: longer passwords were cut here when the file was written.
BCRYPT_MAX_PASSWORD = 72
_BCRYPT_PREFIXES = (b"$2y$", b"$2b$", b"$2a$")
# Verified credentials are trusted this long, then bcrypt runs again (so a user
# removed from the file without a SIGHUP is out within five minutes).
VERIFIED_SECONDS = 300.0
VERIFIED_MAX = 10_000
# Failed logins allowed per client address in FAILURE_WINDOW seconds; beyond,
# 429 until the window has room. Addresses tracked at most.
FAILURE_LIMIT = 10
FAILURE_WINDOW = 60.0
FAILURE_ADDRESSES = 10_000
# Paths every client may reach: orchestrators probe them without credentials.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# The endpoints that tell a client it must log in (as Docker Hub's /v2/ does):
# docker and podman only send credentials after a challenge from /v2/.
LOGIN_PATHS = frozenset({"/v2/", "/v2", "/metrics"})
# Pages for browsers (the status page): their 401 challenges with Basic, which
# makes a browser ask for a user name and password (Bearer does not).
BROWSER_PATHS = frozenset({"/", "/status.json"})
BROWSER_CHALLENGE = 'Basic realm="pullthrough", charset="UTF-8"'
# The rule used where none matches: every user, and anonymous clients (for
# public content only), may pull; nobody may push.
DEFAULT_RULE = AccessRule(pull=(EVERY_USER, ANONYMOUS))


class HtpasswdError(Exception):
    """The htpasswd file cannot be used; the message names the file and line."""


def read_htpasswd(path: Path) -> dict[str, bytes]:
    """``user:hash`` lines, bcrypt hashes only (``htpasswd -B``), as distribution."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise HtpasswdError(f"cannot read htpasswd {path}: {reason}") from None
    users: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        # The hash itself is never echoed: the message names the line.
        if not colon or not user or not hashed:
            raise HtpasswdError(f"htpasswd {path} line {number}: not user:hash")
        encoded = hashed.encode()
        if not encoded.startswith(_BCRYPT_PREFIXES) or _cost(encoded) is None:
            raise HtpasswdError(
                f"htpasswd {path} line {number} ({user}): not a bcrypt hash; "
                "write it with `htpasswd -B`"
            )
        if user in (ANONYMOUS, EVERY_USER):
            # Rules use these names for clients without credentials and for all
            # users: a user so named would get their rights.
            raise HtpasswdError(f"htpasswd {path} line {number}: {user!r} is a reserved name")
        users[user] = encoded
    return users


def _cost(hashed: bytes) -> int | None:
    parts = hashed.split(b"$")
    if len(parts) != 4 or not parts[2].isdigit() or len(parts[3]) != 53:
        return None
    cost = int(parts[2])
    return cost if 4 <= cost <= 31 else None


class Users:
    """The users of an htpasswd file; :meth:`check` is bcrypt work (call it off the loop)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._hashes: dict[str, bytes] = {}
        self._dummy = b""
        self.generation = 0
        self.load()

    def load(self) -> None:
        hashes = read_htpasswd(self.path)
        cost = max((_cost(h) or 4 for h in hashes.values()), default=10)
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))
        self._hashes = hashes
        self.generation += 1

    def __contains__(self, user: str) -> bool:
        return user in self._hashes

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._hashes)

    def check(self, user: str, password: str) -> bool:
        hashed = self._hashes.get(user)
        secret = password.encode()[:BCRYPT_MAX_PASSWORD]
        # An unknown user costs the same as a wrong password.
        matched = bcrypt.checkpw(secret, hashed or self._dummy)
        return matched and hashed is not None


class FailedLogins:
    """Failed logins per client address in a sliding window."""

    def __init__(self, limit: int = FAILURE_LIMIT, window: float = FAILURE_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._seen: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again; 0 when it may now."""
        failures = self._seen.get(address)
        if failures is None:
            return 0.0
        now = time.monotonic()
        while failures and now - failures[0] > self.window:
            failures.popleft()
        if len(failures) < self.limit:
            return 0.0
        return self.window - (now - failures[0])

    def record(self, address: str) -> None:
        failures = self._seen.setdefault(address, collections.deque(maxlen=self.limit))
        failures.append(time.monotonic())
        self._seen.move_to_end(address)
        while len(self._seen) > FAILURE_ADDRESSES:
            self._seen.popitem(last=False)


@dataclass(frozen=True, slots=True)
class _Verified:
    user: str
    until: float
    generation: int


class Authenticator:
    """Turns an ``Authorization`` header into a user name, or refuses it."""

    def __init__(self, users: Users, tokens: Tokens) -> None:
        self.users = users
        self.tokens = tokens
        self.failures = FailedLogins()
        self._key = secrets.token_bytes(32)
        self._verified: collections.OrderedDict[bytes, _Verified] = collections.OrderedDict()
        self._running: dict[bytes, asyncio.Future[bool]] = {}

    def reload(self) -> None:
        self.users.load()
        self._verified.clear()

    async def user(self, authorization: str | None, address: str) -> str | None:
        """The user these credentials log in, None when there are none.

        Raises Unauthorized for credentials that are not valid and
        TooManyRequests when ``address`` failed too often lately.
        """
        # containers/image sends "Basic Og==" (an empty user and password)
        # after a Basic challenge when it has no credentials: anonymous.
        if authorization is None or authorization.strip() in _EMPTY_BASIC:
            return None
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            try:
                user = self.tokens.verify(credentials)
            except InvalidToken as exc:
                raise Unauthorized(str(exc)) from None
            if user is not None and user not in self.users:
                raise Unauthorized("user no longer exists")
            return user
        key = hmac.digest(self._key, authorization.encode("utf-8", "surrogateescape"), "sha256")
        known = self._verified.get(key)
        fresh = known is not None and known.until > time.monotonic()
        if fresh and known is not None and known.generation == self.users.generation:
            return known.user
        wait = self.failures.retry_after(address)
        if wait > 0:
            raise TooManyRequests(
                "too many failed logins from this address",
                headers={"Retry-After": str(int(wait) + 1)},
            )
        user, password = _basic(authorization)
        # Concurrent first requests with these credentials (a pull's parallel
        # layers) share one bcrypt run.
        check = self._running.get(key)
        if check is None:
            check = asyncio.ensure_future(asyncio.to_thread(self.users.check, user, password))
            self._running[key] = check
            check.add_done_callback(lambda _: self._running.pop(key, None))
        ok = await asyncio.shield(check)
        if not ok:
            self.failures.record(address)
            log.warning("failed login for user %r from %s", user[:64], address)
            raise Unauthorized("wrong user name or password")
        self._remember(key, user)
        return user

    def _remember(self, key: bytes, user: str) -> None:
        until = time.monotonic() + VERIFIED_SECONDS
        self._verified[key] = _Verified(user, until, self.users.generation)
        self._verified.move_to_end(key)
        while len(self._verified) > VERIFIED_MAX:
            self._verified.popitem(last=False)


_EMPTY_BASIC = frozenset({"Basic Og==", "basic Og==", "Basic", "basic"})


def _basic(authorization: str) -> tuple[str, str]:
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        raise Unauthorized("this mirror takes Basic credentials")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized("malformed Basic credentials") from None
    user, colon, password = decoded.partition(":")
    if not colon or not user:
        raise Unauthorized("malformed Basic credentials")
    return user, password


class Rights:
    """The first rule matching an upstream and repository decides who may do what."""

    def __init__(self, rules: Sequence[AccessRule]) -> None:
        self.rules = tuple(rules)

    def rule(self, upstream: str, repository: str) -> AccessRule:
        for rule in self.rules:
            if fnmatch.fnmatchcase(upstream, rule.upstream) and fnmatch.fnmatchcase(
                repository, rule.repository
            ):
                return rule
        return DEFAULT_RULE

    def may_pull(self, user: str | None, upstream: str, repository: str) -> bool:
        allowed = self.rule(upstream, repository).pull
        if user is None:
            return ANONYMOUS in allowed
        return user in allowed or EVERY_USER in allowed

    def may_push(self, user: str | None, upstream: str, repository: str) -> bool:
        allowed = self.rule(upstream, repository).push
        if user is None:
            return ANONYMOUS in allowed
        return user in allowed or EVERY_USER in allowed

    def users_named(self) -> set[str]:
        named = {u for r in self.rules for u in (*r.pull, *r.push)}
        return named - {ANONYMOUS, EVERY_USER}


class Access:
    """Users, rights, and the upstreams whose private content needs a grant."""

    def __init__(self, settings: Settings, token_key: bytes) -> None:
        assert settings.htpasswd is not None
        self.authenticator = Authenticator(Users(settings.htpasswd), Tokens(token_key))
        self.rights = Rights(settings.access)
        self.credentialed = frozenset(u.name for u in settings.all_upstreams() if u.has_credentials)
        self._warn_unknown_users()

    def reload(self) -> None:
        """Read the htpasswd file again (SIGHUP); a broken file keeps the old users."""
        try:
            self.authenticator.reload()
        except HtpasswdError as exc:
            failure = str(exc)
        else:
            failure = ""
        if failure:
            log.error("users not reloaded, keeping the current ones: %s", failure)
            return
        log.info("users reloaded from %s", self.authenticator.users.path)
        self._warn_unknown_users()

    def _warn_unknown_users(self) -> None:
        unknown = self.rights.users_named() - self.authenticator.users.names
        if unknown:
            log.warning("access rules name users not in htpasswd: %s", ", ".join(sorted(unknown)))


# Set on the app when htpasswd is configured; absent, everyone pulls everything.
ACCESS = web.AppKey("access", Access)
# The user a request logged in as; absent for anonymous requests.
USER = web.RequestKey("user", str)
# The token scope a refused request needed, for the challenge.
SCOPE = web.RequestKey("scope", str)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Learn who sends the request; the registry routes then check the rights.

    Every 401 of the registry API challenges with Bearer (the token realm on
    this mirror); the token endpoint itself challenges with Basic.
    """
    access = request.app.get(ACCESS)
    if access is None or request.path in OPEN_PATHS or request.path == TOKEN_PATH:
        return await handler(request)
    try:
        return await _as_user(request, access, handler)
    except Unauthorized as err:
        if request.path in BROWSER_PATHS:
            err.headers["WWW-Authenticate"] = BROWSER_CHALLENGE
            raise
        realm = origin(request, forwarded_origin(request))
        err.headers["WWW-Authenticate"] = challenge(realm, request.get(SCOPE))
        raise


async def _as_user(request: web.Request, access: Access, handler: Handler) -> web.StreamResponse:
    user = await access.authenticator.user(
        request.headers.get("Authorization"), client_address(request)
    )
    if user is not None:
        request[USER] = user
    elif request.path in LOGIN_PATHS:
        raise Unauthorized("log in with the mirror's user name and password")
    return await handler(request)


async def issue_token(request: web.Request) -> web.Response:
    """``GET /token``: a token for the user the Basic credentials log in (none:
    an anonymous token, as Docker Hub's realm gives)."""
    authenticator = request.app[ACCESS].authenticator
    authorization = request.headers.get("Authorization")
    if authorization is not None and authorization.strip().lower().startswith("bearer"):
        raise Unauthorized("log in with Basic credentials here")
    user = await authenticator.user(authorization, client_address(request))
    token = authenticator.tokens.issue(user)
    return web.json_response(
        token_body(token, authenticator.tokens.lifetime), headers={"Cache-Control": "no-store"}
    )


def add_token_route(app: web.Application) -> None:
    app.router.add_get(TOKEN_PATH, issue_token)


async def authorize_pull(
    request: web.Request, upstream: str, repository: str, kind: str = "", reference: str = ""
) -> None:
    """Refuse a pull the client may not make: 403 DENIED for a user without the
    right, 401 for an anonymous client (the same for private and absent
    repositories). ``kind`` ("manifests", "blobs") and ``reference`` name what
    is asked for in the repository, when it is content."""
    access = request.app.get(ACCESS)
    if access is None:
        return
    user = request.get(USER)
    what = {"repository": repository, "action": "pull"}
    request[SCOPE] = f"repository:{repository}:pull"
    allowed = access.rights.may_pull(user, upstream, repository)
    if user is not None:
        if not allowed:
            raise Denied(what)
        return
    if not allowed:
        raise Unauthorized(what)
    if upstream not in access.credentialed:
        return
    visibility = request.app[VISIBILITY]
    if not await visibility.public(upstream, repository):
        raise Unauthorized(what)
    # Content by digest comes from a cache shared by all the upstream's
    # repositories: the upstream must say this public one holds it.
    if ":" in reference and not await visibility.holds(upstream, repository, kind, reference):
        raise Unauthorized(what)


async def authorize_push(
    request: web.Request, upstream: str, repository: str, *, open_push: bool
) -> None:
    """Refuse a push (upload, manifest PUT, DELETE) the client may not make: with
    users, the ``push`` list of the first matching rule decides (401 anonymous,
    403 a user without the right); without users, only loopback clients push
    unless ``open_push`` is set."""
    access = request.app.get(ACCESS)
    what = {"repository": repository, "action": "push"}
    if access is None:
        if open_push or _loopback(client_address(request)):
            return
        raise Denied({**what, "reason": "pushes are only taken from loopback without users"})
    user = request.get(USER)
    request[SCOPE] = f"repository:{repository}:pull,push"
    if access.rights.may_push(user, upstream, repository):
        return
    if user is None:
        raise Unauthorized(what)
    raise Denied(what)


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False

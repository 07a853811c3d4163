"""A registry that misbehaves on purpose, for faults a real one will not produce.

It serves one repository's manifests and blobs from memory and can send wrong
bytes, cut a body short, stall mid-body until released, answer 429 or 5xx, demand
a bearer token and redirect blob downloads to a second origin (a "CDN") that
records the headers it got. Hostile neighbours: a foreign token realm and an
"internal" service that an upstream's redirects may point at, each recording what
reached it; manifests and tag lists can be redirected too, and blob bodies can
trickle or the whole upstream hang. A referrers API, with or without filtering, is
optional.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

BLOB_TYPE = "application/octet-stream"
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    accept: list[str] = field(default_factory=list)
    raw: str = ""  # the request target exactly as it arrived


@dataclass
class FaultRegistry:
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # ref -> (type, data)
    # "ok", "corrupt" (same length, one byte flipped), "truncate" (half, then the
    # connection drops), "status" (answer `status` with an OCI error body).
    mode: str = "ok"
    status: int = 429
    extra_headers: dict[str, str] = field(default_factory=dict)
    # When set, blob bodies stop after `stall_after` bytes until the event is set.
    stall: asyncio.Event | None = None
    stall_after: int = 0
    chunk: int = 64 * 1024
    require_token: bool = False
    redirect_to: str | None = None  # base URL of a CDN app
    # The query a blob redirect carries, as sent (a CDN signs it byte for byte).
    redirect_query: str = "sig=abc"
    # Absolute URLs manifest and tag-list requests are redirected to, when set.
    redirect_manifests_to: str | None = None
    redirect_tags_to: str | None = None
    # Manifest bodies, too, stop half-way until `stall` is set.
    stall_manifests: bool = False
    # Blob bodies go out one byte every `trickle` seconds.
    trickle: float | None = None
    # While set (and not yet released), every request waits on it: an upstream
    # that accepts connections and never answers.
    hang: asyncio.Event | None = None
    tags: list[str] = field(default_factory=list)
    # When set, blob requests (only) are answered with this status and an OCI body.
    blob_status: int | None = None
    seen: list[Seen] = field(default_factory=list)
    tokens_issued: int = 0
    # The Authorization header of every token request (None: anonymous).
    token_auth: list[str | None] = field(default_factory=list)
    # Tokens the registry no longer takes (revoked, or expired early).
    rejected_tokens: set[str] = field(default_factory=set)
    # A referrers API (None: none, 404 as distribution 2.8): by subject digest,
    # the pages of its answer as sent (each but the last links to the next).
    referrers: dict[str, list[bytes]] | None = None
    # Filter by ?artifactType= and say so (OCI-Filters-Applied), or ignore it.
    filters_applied: bool = False
    # While set (and not yet released), referrers requests wait on it;
    # `referrers_asked` is set as soon as one arrives.
    referrers_gate: asyncio.Event | None = None
    referrers_asked: asyncio.Event = field(default_factory=asyncio.Event)

    def add_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(self, tag: str, doc: dict[str, Any], media_type: str = MANIFEST_TYPE) -> str:
        data = json.dumps(doc).encode()
        digest = digest_of(data)
        self.manifests[tag] = (media_type, data)
        self.manifests[digest] = (media_type, data)
        return digest

    def count(self, method: str, kind: str) -> int:
        return sum(1 for s in self.seen if s.method == method and f"/{kind}/" in s.path)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_get("/v2/", self._ping)
        app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_route("*", "/v2/{name:.+}/manifests/{ref}", self._manifest)
        app.router.add_get("/v2/{name:.+}/tags/list", self._tags)
        app.router.add_get("/v2/{name:.+}/referrers/{digest}", self._referrers)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        self.token_auth.append(request.headers.get("Authorization"))
        self.tokens_issued += 1
        return web.json_response({"token": f"tok-{self.tokens_issued}", "expires_in": 300})

    def _record(self, request: web.Request) -> None:
        self.seen.append(
            Seen(
                request.method,
                request.path_qs,
                dict(request.headers),
                request.headers.getall("Accept", []),
                request.raw_path,
            )
        )

    async def _hang(self) -> None:
        if self.hang is not None:
            await self.hang.wait()

    def _gate(self, request: web.Request) -> web.Response | None:
        authorization = request.headers.get("Authorization", "")
        token = authorization.removeprefix("Bearer ")
        if self.require_token and (
            not authorization.startswith("Bearer tok-") or token in self.rejected_tokens
        ):
            realm = f"http://{request.host}/token"
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                status=401,
                headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="faults"'},
            )
        if self.mode == "status":
            return web.json_response(
                {"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]},
                status=self.status,
                headers=self.extra_headers,
            )
        return None

    async def _ping(self, request: web.Request) -> web.Response:
        self._record(request)
        await self._hang()
        return self._gate(request) or web.json_response({})

    async def _tags(self, request: web.Request) -> web.Response:
        self._record(request)
        await self._hang()
        refused = self._gate(request)
        if refused is not None:
            return refused
        if self.redirect_tags_to is not None:
            raise web.HTTPFound(self.redirect_tags_to)
        return web.json_response({"name": request.match_info["name"], "tags": self.tags})

    async def _referrers(self, request: web.Request) -> web.Response:
        self._record(request)
        refused = self._gate(request)
        if refused is not None:
            return refused
        self.referrers_asked.set()
        if self.referrers_gate is not None:
            await self.referrers_gate.wait()
        if self.referrers is None:
            return web.Response(status=404, text="404 page not found\n")
        pages = self.referrers.get(request.match_info["digest"], [b'{"manifests": []}'])
        number = int(request.query.get("page", "0"))
        body, headers = pages[number], {}
        if number + 1 < len(pages):
            # A first link too, as some registries send: only "next" is a page to follow.
            first, following = f"{request.path}?page=0", f"{request.path}?page={number + 1}"
            headers["Link"] = f'<{first}>; rel="first", <{following}>; rel=next'
        wanted = request.query.get("artifactType")
        if self.filters_applied and wanted is not None:
            index = json.loads(body)
            index["manifests"] = [m for m in index["manifests"] if m.get("artifactType") == wanted]
            body = json.dumps(index).encode()
            headers["OCI-Filters-Applied"] = "artifactType"
        return web.Response(
            body=body, content_type="application/vnd.oci.image.index.v1+json", headers=headers
        )

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        await self._hang()
        refused = self._gate(request)
        if refused is not None:
            return refused
        if self.redirect_manifests_to is not None:
            raise web.HTTPTemporaryRedirect(self.redirect_manifests_to)
        found = self.manifests.get(request.match_info["ref"])
        if found is None:
            return web.json_response(
                {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]},
                status=404,
            )
        media_type, data = found
        headers = {"Docker-Content-Digest": digest_of(data), **self.extra_headers}
        if self.mode == "corrupt":
            data = data[:-1] + b" "
        if self.stall_manifests and self.stall is not None:
            response = web.StreamResponse(headers={**headers, "Content-Type": media_type})
            response.content_length = len(data)
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            await self.stall.wait()
            await response.write(data[len(data) // 2 :])
            await response.write_eof()
            return response
        return web.Response(body=data, content_type=media_type, headers=headers)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        await self._hang()
        refused = self._gate(request)
        if refused is not None:
            return refused
        if self.blob_status is not None:
            return web.json_response(
                {"errors": [{"code": "UNAVAILABLE", "message": "try later"}]},
                status=self.blob_status,
                headers=self.extra_headers,
            )
        digest = request.match_info["digest"]
        data = self.blobs.get(digest)
        if data is None:
            return web.json_response(
                {"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]}, status=404
            )
        if self.redirect_to is not None:
            # Not HTTPTemporaryRedirect: it would re-encode the query on the way out.
            location = f"{self.redirect_to}/cdn/{digest}?{self.redirect_query}"
            return web.Response(status=307, headers={"Location": location})
        return await self.send(request, data)

    async def send(self, request: web.Request, data: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": BLOB_TYPE, **self.extra_headers})
        response.content_length = len(data)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        body = bytearray(data)
        if self.mode == "corrupt":
            body[len(body) // 2] ^= 0xFF
        limit = len(body) // 2 if self.mode == "truncate" else len(body)
        pos = 0
        if self.trickle is not None:
            for byte in body[:limit]:
                try:
                    await response.write(bytes([byte]))
                except ConnectionResetError:
                    return response  # the mirror gave up on us, as it should
                await asyncio.sleep(self.trickle)
            pos = limit
        while pos < limit:
            if self.stall is not None and pos >= self.stall_after:
                await self.stall.wait()
            end = min(limit, pos + self.chunk)
            if self.stall is not None and pos < self.stall_after < end:
                end = self.stall_after
            await response.write(bytes(body[pos:end]))
            pos = end
        if limit < len(body):
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write_eof()
        return response


@dataclass
class Cdn:
    """A second origin that blob redirects point to; records what it was sent."""

    origin: FaultRegistry
    seen: list[Seen] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/cdn/{digest}", self._blob)
        return app

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            Seen(request.method, request.path_qs, dict(request.headers), raw=request.raw_path)
        )
        return await self.origin.send(request, self.origin.blobs[request.match_info["digest"]])


@dataclass
class ForeignRealm:
    """Another host a redirect may lead to, demanding a token from its own realm
    (as a hostile upstream would, to harvest the mirror's credentials)."""

    seen: list[Seen] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        return app

    async def _any(self, request: web.Request) -> web.Response:
        self.seen.append(
            Seen(request.method, request.path_qs, dict(request.headers), raw=request.raw_path)
        )
        if request.path == "/token":
            return web.json_response({"token": "foreign", "expires_in": 300})
        realm = f"http://{request.host}/token"
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
            status=401,
            headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="foreign"'},
        )


@dataclass
class InternalService:
    """A service on the mirror's own network that must never be reached through
    an upstream's redirect; answers anything with a plausible manifest."""

    hits: list[Seen] = field(default_factory=list)
    body: bytes = b'{"schemaVersion": 2, "secret": "internal metadata"}'

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        return app

    async def _any(self, request: web.Request) -> web.Response:
        self.hits.append(Seen(request.method, request.path_qs, dict(request.headers)))
        return web.Response(
            body=self.body,
            content_type="application/vnd.docker.distribution.manifest.v2+json",
            headers={"Docker-Content-Digest": digest_of(self.body)},
        )

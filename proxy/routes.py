"""The registry API, pull side (OCI distribution-spec "Pull"), and the service endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from pathlib import Path
from typing import IO, Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.typedefs import Handler

from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import InvalidDigest, UnsupportedDigest
from pullthrough.cache.mediatypes import OCI_INDEX
from pullthrough.metrics import CONTENT_TYPE
from pullthrough.proxy import names, referrers
from pullthrough.proxy.access import authorize_pull
from pullthrough.proxy.errors import (
    ManifestUnknown,
    PaginationInvalid,
    RangeInvalid,
    TagInvalid,
    Unsupported,
    UpstreamUnknown,
)
from pullthrough.proxy.keys import ABORTED, BODY_BYTES, METRICS, MIRRORS, NAMESPACE, SOURCE
from pullthrough.proxy.logs import RESULTS
from pullthrough.proxy.mirror import BlobHit, BlobStream, ManifestAnswer, Mirror
from pullthrough.proxy.names import Reference

log = logging.getLogger(__name__)

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
_ROUTE = re.compile(r"^(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")
_TAGS = re.compile(r"^(?P<name>.+)/tags/list$")
_REFERRERS = re.compile(r"^(?P<name>.+)/referrers/(?P<ref>[^/]+)$")
_UPLOADS = re.compile(r"^.+/blobs/uploads(/.*)?$")
MAX_TAGS_PAGE = 10_000
# ASCII digits only (str.isdigit() also takes "²"), and few enough for int().
_NUMBER = re.compile(r"^[0-9]{1,9}$")
# How much of a client's input an error message repeats.
MAX_ECHO = 256


async def ping(request: web.Request) -> web.Response:
    return web.json_response({}, headers=API_VERSION)


async def metrics(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(request.app[METRICS].exposition)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def registry(request: web.Request) -> web.StreamResponse:
    """Dispatch ``/v2/<name>/(manifests|blobs)/<reference>``; names may hold slashes."""
    path = request.match_info["path"]
    if request.method not in ("GET", "HEAD") or _UPLOADS.match(path):
        raise Unsupported(f"{request.method} /v2/{path}")
    metrics = request.app[METRICS]
    started = time.monotonic()
    response: web.StreamResponse
    if (match := _ROUTE.match(path)) is not None:
        kind = "manifest" if match["kind"] == "manifests" else "blob"
    elif (match := _TAGS.match(path)) is not None:
        kind = "tags"
    elif (match := _REFERRERS.match(path)) is not None:
        kind = "referrers"
    else:
        raise web.HTTPNotFound()
    try:
        mirror, name = route(request, match["name"])
        repository = names.repository(name, docker_hub_rules=mirror.library_prefix)
        content = match.groupdict().get("kind", ""), match.groupdict().get("ref", "")
        if kind == "referrers":
            content = ("", "")  # a listing of the repository, not content by digest
        await authorize_pull(request, mirror.name, repository, *content)
        if kind == "manifest":
            response = await manifest(request, mirror, repository, manifest_reference(match["ref"]))
        elif kind == "blob":
            response = await blob(request, mirror, repository, Digest.parse(match["ref"]))
        elif kind == "referrers":
            response = await referrers_list(request, mirror, repository, match["ref"])
        else:
            response = await tag_list(request, mirror, repository)
    except Exception:
        metrics.requests.labels(kind, "error").inc()
        raise
    finally:
        metrics.duration.labels(kind).observe(time.monotonic() - started)
    result = "error" if request.get(ABORTED) else RESULTS.get(request.get(SOURCE, ""), "miss")
    metrics.requests.labels(kind, result).inc()
    return response


def manifest_reference(raw: str) -> Reference:
    """A tag or digest; one that cannot exist is unknown, not invalid: the OCI
    conformance suite asks for a 404 on ``manifests/.INVALID_MANIFEST_NAME``."""
    try:
        return Reference.parse(raw)
    except (TagInvalid, InvalidDigest, UnsupportedDigest):
        raise ManifestUnknown(f"no manifest {raw[:MAX_ECHO]!r}") from None


def bounded_number(name: str, raw: str, low: int, high: int) -> int:
    """A query parameter as a number in [low, high], or PAGINATION_NUMBER_INVALID.

    Checked as text first: int() of a few thousand digits raises ValueError.
    """
    if not _NUMBER.match(raw) or not low <= int(raw) <= high:
        raise PaginationInvalid(f"{name} must be {low}-{high}")
    return int(raw)


def route(request: web.Request, name: str) -> tuple[Mirror, str]:
    """Which upstream a request is for, and the repository name there.

    containerd's ``?ns=<host>`` names it (distribution-spec "Registry Proxying");
    otherwise a first path component that is a host (``/v2/ghcr.io/owner/app/...``,
    for clients that cannot send ``ns``); otherwise Docker Hub. A host that is not
    configured is refused before anything leaves the mirror.
    """
    mirrors = request.app[MIRRORS]
    ns = request.query.get("ns")
    if ns is not None:
        mirror = mirrors.find(ns)
        if mirror is None:
            raise UpstreamUnknown(ns)
        request[NAMESPACE] = ns
        return mirror, name
    first, slash, rest = name.partition("/")
    if slash and names.is_registry_host(first):
        mirror = mirrors.find(first)
        if mirror is None:
            raise UpstreamUnknown(first)
        return mirror, rest
    return mirrors.default, name


async def answer_namespace(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: echo the ``ns`` a request was scoped by."""
    ns = request.get(NAMESPACE)
    if ns is not None:
        response.headers["OCI-Namespace"] = ns


async def tag_list(request: web.Request, mirror: Mirror, repository: str) -> web.Response:
    if request.method == "HEAD":
        raise Unsupported("HEAD of a tag list")
    query: dict[str, str] = {}
    if "n" in request.query:
        query["n"] = str(bounded_number("n", request.query["n"], 1, MAX_TAGS_PAGE))
    if "last" in request.query:
        query["last"] = str(Reference.parse(request.query["last"]))
    listing, source = await mirror.tag_list(repository, query)
    request[SOURCE] = source
    headers = dict(API_VERSION)
    if listing.link is not None:
        headers["Link"] = listing.link
    return web.Response(body=listing.body, headers=headers, content_type="application/json")


async def referrers_list(
    request: web.Request, mirror: Mirror, repository: str, raw: str
) -> web.Response:
    if request.method == "HEAD":
        raise Unsupported("HEAD of referrers")
    subject = Digest.parse(raw)
    artifact_type = request.query.get("artifactType")
    if artifact_type is not None:
        # A "+" sent unescaped (application/spdx+json) arrives as a space, which
        # no media type holds.
        artifact_type = artifact_type.replace(" ", "+")
    answer = await request.app[referrers.REFERRERS].get(mirror, repository, subject, artifact_type)
    request[SOURCE] = answer.source
    headers = dict(API_VERSION)
    if artifact_type is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(body=answer.body, headers=headers, content_type=OCI_INDEX)


async def manifest(
    request: web.Request, mirror: Mirror, repository: str, reference: Reference
) -> web.Response:
    head = request.method == "HEAD"
    answer = await mirror.manifest(
        repository, reference, request.headers.getall("Accept", []), head=head
    )
    request[SOURCE] = answer.source
    headers = _manifest_headers(answer)
    if request.if_none_match and any(e.value == answer.digest for e in request.if_none_match):
        return web.Response(status=304, headers=headers)
    if answer.data is None:
        headers["Content-Length"] = str(answer.size)
        return web.Response(headers=headers)
    return web.Response(body=answer.data, headers=headers)


def _manifest_headers(answer: ManifestAnswer) -> dict[str, str]:
    return {
        **API_VERSION,
        "Content-Type": answer.media_type,
        "Docker-Content-Digest": answer.digest,
        "ETag": f'"{answer.digest}"',
    }


def blob_headers(digest: Digest) -> dict[str, str]:
    return {
        **API_VERSION,
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": str(digest),
        "Accept-Ranges": "bytes",
    }


async def blob(
    request: web.Request, mirror: Mirror, repository: str, digest: Digest
) -> web.StreamResponse:
    if request.method == "HEAD":
        head = await mirror.blob_head(repository, digest)
        request[SOURCE] = head.source
        headers = blob_headers(digest)
        if head.size is not None:
            headers["Content-Length"] = str(head.size)
        return web.Response(headers=headers)
    answer = await mirror.blob(repository, digest)
    if isinstance(answer, BlobHit):
        request[SOURCE] = "prefetched" if answer.prefetched else "cache"
        if answer.location is not None:
            # As distribution's S3 driver does: the client fetches it from storage.
            answer.close()
            headers = blob_headers(digest)
            headers["Location"] = answer.location
            return web.Response(status=307, headers=headers)
        if answer.path is None:
            try:
                return await _stream(request, digest, answer)
            finally:
                answer.close()
        if request.headers.get("Range"):
            try:
                # FileResponse would answer an unsatisfiable range with a bare
                # 416; the same check here gives it the OCI error body.
                _byte_range(request, answer.size)
            except RangeInvalid:
                answer.close()
                raise
        return _HeldFileResponse(answer, answer.path, headers=blob_headers(digest))
    request[SOURCE] = "prefetched" if answer.prefetched else "upstream"
    try:
        return await _stream(request, digest, answer)
    finally:
        answer.close()


# Bytes read and written at a time for a cached blob sent over TLS.
TLS_CHUNK = 1 << 20


class SentFileResponse(web.FileResponse):
    """A FileResponse that records how many body bytes it really sent.

    asyncio leaves the file's position after what ``sendfile`` sent, also when
    the client went away midway, and the copying fallback (uvloop) reads it
    forward as it writes.
    """

    async def _sendfile(
        self, request: web.BaseRequest, fobj: IO[Any], offset: int, count: int
    ) -> AbstractStreamWriter:
        try:
            transport = request.transport
            if transport is not None and transport.get_extra_info("sslcontext") is not None:
                # No sendfile through TLS. asyncio's stand-in for it on TLS
                # transports sends a third of what aiohttp's own copy does, and
                # (3.11) fails with AttributeError when the client leaves midway.
                self._chunk_size = TLS_CHUNK
                writer = await web.StreamResponse.prepare(self, request)
                assert writer is not None
                return await self._sendfile_fallback(writer, fobj, offset, count)
            return await super()._sendfile(request, fobj, offset, count)
        finally:
            request[BODY_BYTES] = max(fobj.tell() - offset, 0)


class _HeldFileResponse(SentFileResponse):
    """A cached blob sent from the descriptor opened at the hit: an eviction in
    the meantime cannot take the file away. sendfile, Range and conditional
    requests come with FileResponse; the descriptor is closed once it is sent."""

    def __init__(self, blob: BlobHit, path: Path, headers: dict[str, str]) -> None:
        super().__init__(path, headers=headers)
        self._blob = blob

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        try:
            return await super().prepare(request)
        finally:
            self._blob.close()


async def _stream(
    request: web.Request, digest: Digest, blob: BlobStream | BlobHit
) -> web.StreamResponse:
    """Send a blob while it downloads (or as storage gives it); a failed download
    ends the response short."""
    start, stop = 0, blob.size
    response = web.StreamResponse(headers=blob_headers(digest))
    if blob.size is not None and request.headers.get("Range"):
        start, stop = _byte_range(request, blob.size)
        response.set_status(206)
        response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{blob.size}"
    if stop is not None:
        response.content_length = stop - start
    request[BODY_BYTES] = 0
    try:
        await response.prepare(request)
        async with contextlib.aclosing(blob.read(start, stop)) as chunks:
            async for chunk in chunks:
                await response.write(chunk)
                request[BODY_BYTES] += len(chunk)
    except Exception as exc:
        transport = request.transport
        if isinstance(exc, ConnectionError) and (transport is None or transport.is_closing()):
            # An ordinary event (a pull cancelled, a client timing out): the
            # download goes on into the cache without it.
            log.info("client went away after %d bytes of %s", request[BODY_BYTES], digest)
        else:
            # Headers are gone already: the only honest signal left is a short body.
            log.warning("aborting response for %s: %s", digest, exc)
            request[ABORTED] = True
            if transport is not None:
                transport.abort()
        # Returned, not raised: aiohttp logs a handler's exception with a traceback.
        return response
    await response.write_eof()
    return response


def _byte_range(request: web.Request, size: int) -> tuple[int, int]:
    try:
        rng = request.http_range
    except ValueError as exc:
        raise RangeInvalid(str(exc), headers={"Content-Range": f"bytes */{size}"}) from None
    start, stop = rng.start, rng.stop
    if start is None:
        return 0, size
    if start < 0:
        return max(size + start, 0), size
    stop = size if stop is None else min(stop, size)
    if start >= size or start >= stop:
        raise RangeInvalid(f"bytes={start}-", headers={"Content-Range": f"bytes */{size}"})
    return start, stop


async def count_served_bytes(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: count what a GET sends, by where it came from."""
    source = request.get(SOURCE)
    if source and request.method == "GET" and response.status in (200, 206):
        # A read-ahead download's bytes came from the upstream for this pull.
        origin = "upstream" if source in ("upstream", "prefetched") else "cache"
        request.app[METRICS].served_bytes.labels(origin).inc(response.content_length or 0)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready unless the cache cannot be written at all. A full cache is reported
    ("full") but ready: it serves what it has and passes the rest through. The
    upstream is reported, not required: a mirror serving its cache while the
    upstream is down is doing its job."""
    registry = request.app[MIRRORS]
    mirrors = list(registry)
    caches = await asyncio.gather(*(m.cache_state() for m in mirrors))
    states = await asyncio.gather(*(m.upstream_state() for m in mirrors))
    cache = max(caches, key=_CACHE_STATES.index)
    ready = cache != "not writable"
    body: dict[str, object] = {
        "status": "ready" if ready else "not ready",
        "cache": cache,
        "upstream": states[0],
    }
    if len(mirrors) > 1:
        body["upstreams"] = {m.name: state for m, state in zip(mirrors, states, strict=True)}
    return web.json_response(body, status=200 if ready else 503)


# Cache states, best first: readyz reports the worst of all cache roots.
_CACHE_STATES = ("writable", "full", "not writable")


def add_routes(
    app: web.Application, *, service_endpoints: bool = True, handler: Handler = registry
) -> None:
    """The registry API (``handler`` answers ``/v2/<path>``: the hosted
    repositories put theirs in front); and /metrics, /readyz, /healthz unless
    they have their own listener (``metrics_listen``)."""
    if service_endpoints:
        add_service_routes(app)
    app.router.add_get("/v2/", ping)
    app.router.add_get("/v2", ping)
    app.router.add_route("*", "/v2/{path:.+}", handler)


def add_service_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)

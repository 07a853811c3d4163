"""The registry API of hosted repositories (OCI distribution-spec "Push",
"Content Discovery", "Content Management"): requests in, ``Hosted``'s answers out."""

from __future__ import annotations

import contextlib
import errno
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from urllib.parse import quote

from aiohttp import web

from pullthrough.cache import hosted as store
from pullthrough.cache import uploads
from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import CacheError, DigestMismatch, InvalidDigest
from pullthrough.proxy import names, routes
from pullthrough.proxy.access import ACCESS, USER, authorize_pull, authorize_push
from pullthrough.proxy.errors import (
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    PushUnsupported,
    RegistryError,
    SizeInvalid,
    StorageFull,
    UploadRangeInvalid,
    from_cache_error,
)
from pullthrough.proxy.hosted import HOSTED, Hosted, page
from pullthrough.proxy.keys import METRICS, SOURCE
from pullthrough.proxy.names import Reference
from pullthrough.proxy.routes import (
    API_VERSION,
    MAX_TAGS_PAGE,
    SentFileResponse,
    blob_headers,
    bounded_number,
    manifest_reference,
)

HOSTED_KEY = web.AppKey("hosted", Hosted)

_UPLOAD = re.compile(r"^(?P<name>.+)/blobs/uploads/?(?P<id>[^/]*)$")
_CONTENT = re.compile(r"^(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")
_TAGS = re.compile(r"^(?P<name>.+)/tags/list$")
_REFERRERS = re.compile(r"^(?P<name>.+)/referrers/(?P<ref>[^/]+)$")
_CONTENT_RANGE = re.compile(r"^(?:bytes )?([0-9]{1,15})-([0-9]{1,15})(?:/[0-9*]+)?$")
CHUNK = 1 << 16
_PUSHING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def hosted_name(request: web.Request, path: str) -> str | None:
    """The hosted repository a ``/v2/<path>`` request is for, or None."""
    hosted = request.app.get(HOSTED_KEY)
    if hosted is None or not hosted.prefixes or "ns" in request.query:
        return None
    for pattern in (_UPLOAD, _CONTENT, _TAGS, _REFERRERS):
        if (match := pattern.match(path)) is not None:
            return match["name"] if hosted.holds(match["name"]) else None
    return None


async def dispatch(request: web.Request, path: str) -> web.StreamResponse:
    """Answer a request for a hosted repository (``hosted_name`` said it is one)."""
    hosted = request.app[HOSTED_KEY]
    request[SOURCE] = "hosted"
    try:
        return await _answer(request, hosted, path)
    except Exception as exc:
        # Pushes that worked are counted where they complete; a failed request
        # of a push (any chunk of it) counts once, by why it failed.
        kind = _push_kind(request.method, path)
        if kind is not None:
            request.app[METRICS].pushes.labels(kind, _failure(exc)).inc()
        raise


def _push_kind(method: str, path: str) -> str | None:
    """The ``kind`` of pullthrough_pushes_total a request is part of; None for reads."""
    if _UPLOAD.match(path) is not None:
        return "blob" if method in ("POST", "PATCH", "PUT") else None
    if method == "DELETE":
        return "delete"
    match = _CONTENT.match(path)
    if method == "PUT" and match is not None and match["kind"] == "manifests":
        return "manifest"
    return None


def _failure(exc: Exception) -> str:
    """A failed push's ``result``: denied (401, 403), invalid (other 4xx), error."""
    status = exc.status if isinstance(exc, RegistryError | web.HTTPException) else 500
    if status in (401, 403):
        return "denied"
    return "invalid" if status < 500 else "error"


async def _answer(request: web.Request, hosted: Hosted, path: str) -> web.StreamResponse:
    try:
        return await _dispatch(request, hosted, path)
    except store.ManifestInvalid as exc:
        raise ManifestInvalid(str(exc)) from None
    except store.ManifestBlobUnknown as exc:
        raise ManifestBlobUnknown(exc.digest) from None
    except uploads.UploadUnknown as exc:
        raise BlobUploadUnknown(str(exc)) from None
    except uploads.UploadTooLarge as exc:
        raise SizeInvalid(str(exc)) from None
    except uploads.OffsetMismatch as exc:
        raise UploadRangeInvalid(str(exc), headers={"Range": _range(exc.expected)}) from None
    except (DigestMismatch, InvalidDigest) as exc:
        raise DigestInvalid(str(exc)) from None
    except CacheError as exc:
        raise from_cache_error(exc) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # What was received stays in the session: the client may resume once
        # space is freed.
        raise StorageFull(str(exc.strerror)) from None


async def _dispatch(request: web.Request, hosted: Hosted, path: str) -> web.StreamResponse:
    method = request.method
    if (match := _UPLOAD.match(path)) is not None:
        repository = await _authorized(request, hosted, match["name"], push=True)
        if match["id"]:
            return await _upload(request, hosted, repository, match["id"])
        if method != "POST":
            raise PushUnsupported(f"{method} of an upload")
        return await _start(request, hosted, repository)
    if (match := _CONTENT.match(path)) is not None:
        push = method in _PUSHING
        repository = await _authorized(request, hosted, match["name"], push=push)
        if match["kind"] == "manifests":
            return await _manifest(request, hosted, repository, match["ref"])
        return await _blob(request, hosted, repository, _digest(match["ref"]))
    if (match := _TAGS.match(path)) is not None:
        repository = await _authorized(request, hosted, match["name"], push=False)
        if method != "GET":
            raise PushUnsupported(f"{method} of a tag list")
        return _listing(request, "tags", await hosted.tags(repository), name=repository)
    match = _REFERRERS.match(path)
    assert match is not None
    repository = await _authorized(request, hosted, match["name"], push=False)
    if method != "GET":
        raise PushUnsupported(f"{method} of referrers")
    artifact = request.query.get("artifactType")
    if artifact is not None:
        # A "+" sent unescaped (application/spdx+json) arrives as a space, which
        # no media type holds.
        artifact = artifact.replace(" ", "+")
    body = await hosted.referrers(repository, _digest(match["ref"]), artifact)
    headers = dict(API_VERSION)
    if artifact is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(
        body=body, headers=headers, content_type="application/vnd.oci.image.index.v1+json"
    )


async def _authorized(request: web.Request, hosted: Hosted, raw: str, *, push: bool) -> str:
    repository = names.repository(raw, docker_hub_rules=False)
    if push:
        await authorize_push(request, HOSTED, repository, open_push=hosted.open_push)
    else:
        await authorize_pull(request, HOSTED, repository)
    return repository


def _digest(raw: str) -> Digest:
    try:
        return Digest.parse(raw)
    except InvalidDigest as exc:
        raise DigestInvalid(str(exc)) from None


def _range(size: int) -> str:
    # distribution's form: the inclusive end, "0-0" for nothing yet.
    return f"0-{max(size - 1, 0)}"


def _upload_headers(repository: str, upload: str, size: int) -> dict[str, str]:
    return {
        **API_VERSION,
        "Location": f"/v2/{repository}/blobs/uploads/{upload}",
        "Range": _range(size),
        "Docker-Upload-UUID": upload,
        "Content-Length": "0",
    }


def _blob_created(repository: str, digest: Digest) -> web.Response:
    headers = {
        **API_VERSION,
        "Location": f"/v2/{repository}/blobs/{digest}",
        "Docker-Content-Digest": str(digest),
        "Content-Length": "0",
    }
    return web.Response(status=201, headers=headers)


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(CHUNK):
        yield chunk


async def _start(request: web.Request, hosted: Hosted, repository: str) -> web.Response:
    mount, source = request.query.get("mount"), request.query.get("from")
    if mount is not None and source is not None:
        digest = _digest(mount)
        source = names.repository(source, docker_hub_rules=False)
        await authorize_pull(request, HOSTED, source)
        if await hosted.mount(repository, source, digest):
            request.app[METRICS].pushes.labels("mount", "ok").inc()
            return _blob_created(repository, digest)
        # Not mountable: an ordinary upload session, as the spec says.
    upload = hosted.uploads.start(repository)
    if "digest" in request.query:
        digest = _digest(request.query["digest"])
        try:
            await hosted.upload(upload, repository, _body(request), 0)
            _count_blob(request, await hosted.finish_upload(upload, repository, digest))
        except BaseException:
            # A failed monolithic upload leaves no session behind.
            with contextlib.suppress(uploads.UploadUnknown):
                hosted.uploads.cancel(upload, repository)
            raise
        return _blob_created(repository, digest)
    return web.Response(status=202, headers=_upload_headers(repository, upload, 0))


async def _upload(
    request: web.Request, hosted: Hosted, repository: str, upload: str
) -> web.Response:
    method = request.method
    if method == "GET":
        size = hosted.uploads.offset(upload, repository)
        return web.Response(status=204, headers=_upload_headers(repository, upload, size))
    if method == "DELETE":
        hosted.uploads.cancel(upload, repository)
        return web.Response(status=204, headers=API_VERSION)
    if method == "PATCH":
        start = _chunk_start(request)
        size = await hosted.upload(upload, repository, _body(request), start)
        return web.Response(status=202, headers=_upload_headers(repository, upload, size))
    if method == "PUT":
        if "digest" not in request.query:
            raise DigestInvalid("PUT of an upload needs ?digest=")
        digest = _digest(request.query["digest"])
        start = _chunk_start(request) if request.headers.get("Content-Range") else None
        await hosted.upload(upload, repository, _body(request), start)
        _count_blob(request, await hosted.finish_upload(upload, repository, digest))
        return _blob_created(repository, digest)
    raise PushUnsupported(f"{method} of an upload")


def _count_blob(request: web.Request, size: int) -> None:
    metrics = request.app[METRICS]
    metrics.pushes.labels("blob", "ok").inc()
    metrics.pushed_bytes.inc(size)


def _chunk_start(request: web.Request) -> int | None:
    """Where a chunk says it starts (Content-Range ``<start>-<end>``), checked
    against its Content-Length; None without a Content-Range (streamed)."""
    raw = request.headers.get("Content-Range")
    if raw is None:
        return None
    match = _CONTENT_RANGE.match(raw.strip())
    if match is None:
        raise BlobUploadInvalid(f"Content-Range {raw[:64]!r} is not <start>-<end>")
    start, end = int(match[1]), int(match[2])
    length = request.content_length
    if end < start or (length is not None and length != end - start + 1):
        raise BlobUploadInvalid(f"Content-Range {raw[:64]!r} and Content-Length {length} differ")
    return start


async def _delete(
    request: web.Request, hosted: Hosted, remove: Callable[[], Awaitable[None]]
) -> web.Response:
    """A DELETE of a blob, manifest or tag: only with delete_enabled."""
    if not hosted.delete_enabled:
        raise PushUnsupported("deletes are disabled (delete_enabled)")
    await remove()
    request.app[METRICS].pushes.labels("delete", "ok").inc()
    return web.Response(status=202, headers=API_VERSION)


async def _blob(
    request: web.Request, hosted: Hosted, repository: str, digest: Digest
) -> web.StreamResponse:
    method = request.method
    if method == "DELETE":
        return await _delete(request, hosted, partial(hosted.delete_blob, repository, digest))
    if method not in ("GET", "HEAD"):
        raise PushUnsupported(f"{method} of a blob")
    size = await hosted.blob_size(repository, digest)
    headers = blob_headers(digest)
    if method == "HEAD":
        headers["Content-Length"] = str(size)
        return web.Response(headers=headers)
    return SentFileResponse(hosted.layout.blob(digest), headers=headers)


async def _manifest(
    request: web.Request, hosted: Hosted, repository: str, raw: str
) -> web.Response:
    method = request.method
    if method == "PUT":
        reference = Reference.parse(raw)
        data = await _read_limited(request, store.MAX_MANIFEST_BYTES)
        checked = await hosted.put_manifest(
            repository, reference, data, request.headers.get("Content-Type", "")
        )
        digest = checked.manifest.digest
        request.app[METRICS].pushes.labels("manifest", "ok").inc()
        headers = {
            **API_VERSION,
            "Location": f"/v2/{repository}/manifests/{digest}",
            "Docker-Content-Digest": str(digest),
            "Content-Length": "0",
        }
        if checked.subject is not None:
            headers["OCI-Subject"] = str(checked.subject)
        return web.Response(status=201, headers=headers)
    reference = manifest_reference(raw)
    if method == "DELETE":
        return await _delete(
            request, hosted, partial(hosted.delete_manifest, repository, reference)
        )
    if method not in ("GET", "HEAD"):
        raise PushUnsupported(f"{method} of a manifest")
    found = await hosted.manifest(repository, reference)
    headers = {
        **API_VERSION,
        "Content-Type": found.media_type,
        "Docker-Content-Digest": str(found.digest),
        "ETag": f'"{found.digest}"',
    }
    if method == "HEAD":
        headers["Content-Length"] = str(len(found.data))
        return web.Response(headers=headers)
    return web.Response(body=found.data, headers=headers)


async def _read_limited(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise SizeInvalid(f"manifests are limited to {limit} bytes")
    data = bytearray()
    async for chunk in request.content.iter_chunked(CHUNK):
        data += chunk
        if len(data) > limit:
            raise SizeInvalid(f"manifests are limited to {limit} bytes")
    return bytes(data)


def _listing(request: web.Request, key: str, items: list[str], *, name: str = "") -> web.Response:
    """A paginated list (``n``, ``last``) with the spec's ``Link`` to the next page."""
    n = None
    if "n" in request.query:
        n = bounded_number("n", request.query["n"], 0, MAX_TAGS_PAGE)
    last = request.query.get("last")
    found = page(items, n, last)
    body: dict[str, object] = {key: found.items}
    if name:
        body = {"name": name, **body}
    headers = dict(API_VERSION)
    if found.more and found.items:
        target = f"/v2/{name}/tags/list" if name else "/v2/_catalog"
        headers["Link"] = f'<{target}?n={n}&last={quote(found.items[-1])}>; rel="next"'
    return web.json_response(body, headers=headers)


async def catalog(request: web.Request) -> web.Response:
    """``GET /v2/_catalog``: the hosted repositories (a mirror cannot list its
    upstreams' repositories, and would not leak which ones it cached)."""
    hosted = request.app.get(HOSTED_KEY)
    repositories = [] if hosted is None else await hosted.catalog()
    access = request.app.get(ACCESS)
    if access is not None:
        user = request.get(USER)
        repositories = [r for r in repositories if access.rights.may_pull(user, HOSTED, r)]
    return _listing(request, "repositories", repositories)


async def registry(request: web.Request) -> web.StreamResponse:
    """``/v2/<path>``: hosted repositories and the catalog here, the rest to the mirror."""
    path = request.match_info["path"]
    if path == "_catalog":
        if request.method != "GET":
            raise PushUnsupported(f"{request.method} of the catalog")
        return await catalog(request)
    if hosted_name(request, path) is not None:
        return await dispatch(request, path)
    return await routes.registry(request)

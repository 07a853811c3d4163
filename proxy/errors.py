"""Registry errors, and the one middleware that turns them into OCI error bodies.

Stores and the upstream client raise these (or cache errors) with data attached;
only the middleware knows about HTTP responses.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Mapping

from aiohttp import web
from aiohttp.typedefs import Handler

from pullthrough.cache.errors import (
    CacheError,
    DigestMismatch,
    DownloadFailed,
    InvalidDigest,
    SizeMismatch,
    StorageUnavailable,
    UnsupportedDigest,
)

log = logging.getLogger(__name__)


class RegistryError(Exception):
    """An error with a distribution-spec error code."""

    code = "UNKNOWN"
    status = 500
    message = "unknown error"

    def __init__(self, detail: object = None, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{self.code}: {self.message} ({detail})")
        self.detail = detail
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()


class BlobUnknown(RegistryError):
    code, status, message = "BLOB_UNKNOWN", 404, "blob unknown to registry"


class ManifestUnknown(RegistryError):
    code, status, message = "MANIFEST_UNKNOWN", 404, "manifest unknown"


class NameUnknown(RegistryError):
    code, status, message = "NAME_UNKNOWN", 404, "repository name not known to registry"


class UpstreamUnknown(RegistryError):
    code, status, message = "NAME_UNKNOWN", 404, "registry not configured on this mirror"


class NameInvalid(RegistryError):
    code, status, message = "NAME_INVALID", 400, "invalid repository name"


class TagInvalid(RegistryError):
    code, status, message = "TAG_INVALID", 400, "invalid tag"


class DigestInvalid(RegistryError):
    code, status, message = "DIGEST_INVALID", 400, "provided digest did not match content"


# What every 401 asks for (RFC 7235): clients log in with Basic credentials.
CHALLENGE = 'Basic realm="pullthrough", charset="UTF-8"'


class Unauthorized(RegistryError):
    code, status, message = "UNAUTHORIZED", 401, "authentication required"

    def __init__(self, detail: object = None, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": CHALLENGE, **(headers or {})})


class Denied(RegistryError):
    code, status, message = "DENIED", 403, "requested access to the resource is denied"


class Unsupported(RegistryError):
    code, status, message = "UNSUPPORTED", 405, "this mirror is read-only: pull only"


class NotFound(RegistryError):
    code, status, message = "NOT_FOUND", 404, "no such endpoint"


class PaginationInvalid(RegistryError):
    code, status, message = "PAGINATION_NUMBER_INVALID", 400, "invalid number of results requested"


class RangeInvalid(RegistryError):
    code, status, message = "RANGE_INVALID", 416, "requested range not satisfiable"


class TooManyRequests(RegistryError):
    code, status, message = "TOOMANYREQUESTS", 429, "too many requests"


class ManifestTooLarge(RegistryError):
    code, status, message = "MANIFEST_INVALID", 502, "upstream manifest exceeds the size limit"


class UpstreamUnavailable(RegistryError):
    code, status, message = "UNAVAILABLE", 503, "upstream registry unavailable"


class Overloaded(RegistryError):
    code, status, message = "UNAVAILABLE", 503, "the mirror is overloaded, try again"


class StorageDown(RegistryError):
    code, status, message = "UNAVAILABLE", 503, "the mirror's storage is unavailable"


class UpstreamInvalid(RegistryError):
    code, status, message = "UNAVAILABLE", 502, "upstream registry sent invalid content"


class RedirectRefused(UpstreamUnavailable):
    """The upstream redirected where the mirror does not follow (a manifest, a
    loopback or private address, https to http)."""

    status, message = 502, "upstream redirect refused"


class RedirectFailed(UpstreamUnavailable):
    """The host an upstream redirect pointed to refused or failed the request."""

    status, message = 502, "upstream redirect target failed"


class BlobUploadUnknown(RegistryError):
    code, status, message = "BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown to registry"


class BlobUploadInvalid(RegistryError):
    code, status, message = "BLOB_UPLOAD_INVALID", 400, "blob upload invalid"


class UploadRangeInvalid(BlobUploadInvalid):
    status, message = 416, "chunk does not start where the upload ends"


class SizeInvalid(RegistryError):
    code, status, message = "SIZE_INVALID", 413, "content exceeds the size limit"


class ManifestInvalid(RegistryError):
    code, status, message = "MANIFEST_INVALID", 400, "manifest invalid"


class ManifestBlobUnknown(RegistryError):
    code, status, message = "MANIFEST_BLOB_UNKNOWN", 400, "manifest references a blob not here"


class StorageFull(RegistryError):
    code, status, message = "UNAVAILABLE", 507, "no space left for the upload"


class PushUnsupported(RegistryError):
    code, status, message = "UNSUPPORTED", 405, "the operation is unsupported"


def from_cache_error(exc: CacheError) -> RegistryError:
    if isinstance(exc, UnsupportedDigest | InvalidDigest):
        return DigestInvalid(str(exc))
    if isinstance(exc, DigestMismatch | SizeMismatch | DownloadFailed):
        return UpstreamInvalid(str(exc))
    if isinstance(exc, StorageUnavailable):
        return StorageDown(str(exc), headers={"Retry-After": "5"})
    return RegistryError(str(exc))


def error_response(err: RegistryError, method: str) -> web.Response:
    headers = {"Docker-Distribution-API-Version": "registry/2.0", **err.headers}
    if method == "HEAD":
        # A HEAD answer carries no body, but says what it would have been.
        return web.Response(status=err.status, headers=headers, content_type="application/json")
    return web.Response(
        status=err.status, body=err.body(), headers=headers, content_type="application/json"
    )


class InternalError(RegistryError):
    code, status, message = "UNKNOWN", 500, "internal error; the mirror logged the details"


# OCI codes for aiohttp's own HTTP errors (unknown path, method, body too large...).
_HTTP_CODES = {
    401: "UNAUTHORIZED",
    403: "DENIED",
    404: "NOT_FOUND",
    405: "UNSUPPORTED",
    413: "SIZE_INVALID",
    416: "RANGE_INVALID",
    429: "TOOMANYREQUESTS",
}
# Headers of aiohttp's own answer that describe its text body, not ours.
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})
# What the access log shows for a request whose client was gone (nginx's code).
CLIENT_GONE = 499


def from_http_exception(exc: web.HTTPException, request: web.Request) -> RegistryError:
    """aiohttp's HTTPException (routing, limits) as an OCI error, headers kept."""
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
    if exc.status == 405:
        return Unsupported(f"{request.method} {request.path}", headers=headers)
    if exc.status == 404:
        return NotFound(request.path, headers=headers)
    err = RegistryError(exc.text or None, headers=headers)
    err.code = _HTTP_CODES.get(exc.status, "UNKNOWN")
    err.status = exc.status
    err.message = exc.reason.lower()
    return err


def _nobody_listening(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _answered_already(request: web.Request) -> bool:
    writer = request.writer
    return writer is not None and writer.output_size > 0


@web.middleware
async def oci_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as an OCI error body: ours, the cache's, aiohttp's, and the
    unexpected (a 500 ``UNKNOWN``, logged once with its traceback)."""
    try:
        return await handler(request)
    except RegistryError as err:
        return error_response(err, request.method)
    except CacheError as exc:
        return error_response(from_cache_error(exc), request.method)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and 304s are answers, not errors
        return error_response(from_http_exception(exc, request), request.method)
    except ConnectionError as exc:
        if not _nobody_listening(request):
            return _unexpected(request, exc)
        # The client went away mid-answer: nobody to tell, nothing went wrong here.
        log.debug("client left during %s %s: %s", request.method, request.path, exc)
        return web.Response(status=CLIENT_GONE)
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            return _unexpected(request, exc)
        # Out of descriptors is a load condition, not a fault: the client may
        # retry, and the operator learns it from one (rate-limited) warning.
        log.warning("out of open files answering %s %s: %s", request.method, request.path, exc)
        overloaded = Overloaded("out of open files", headers={"Retry-After": "1"})
        return error_response(overloaded, request.method)
    except Exception as exc:
        return _unexpected(request, exc)


def _unexpected(request: web.Request, exc: Exception) -> web.Response:
    log.error("unexpected error answering %s %s", request.method, request.path, exc_info=exc)
    if _answered_already(request):
        # Part of an answer is out: cut it short, the only signal left.
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=CLIENT_GONE)
    return error_response(InternalError(), request.method)

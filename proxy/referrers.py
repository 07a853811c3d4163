"""Referrers of mirrored images (distribution-spec 1.1 "Listing Referrers"), pulled through.

The upstream's referrers API answers when it has one; one without it (a 404,
as distribution 2.8 gives) is asked for its referrers tag schema instead: the
index tagged ``<alg>-<hex>``, fetched through the mirror's own tag path. The
answer, filtered by ``artifactType``, is cached like a tag list: fresh for
``tag_ttl``, served stale when the upstream cannot be asked, and served from
the cache alone offline. The referrers' manifests are ordinary manifests,
pulled through by digest.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from yarl import URL

from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import InvalidDigest, UnsupportedDigest
from pullthrough.cache.index import Listing
from pullthrough.cache.mediatypes import OCI_INDEX, is_media_type
from pullthrough.proxy.errors import (
    ManifestUnknown,
    NameUnknown,
    TooManyRequests,
    UpstreamInvalid,
    UpstreamUnavailable,
)
from pullthrough.proxy.inflight import SingleFlight
from pullthrough.proxy.mirror import MAX_MANIFEST_BYTES, Mirror, _read_limited
from pullthrough.proxy.names import Reference
from pullthrough.proxy.upstream import raise_for_status

log = logging.getLogger(__name__)

# Pages of an upstream's paginated answer followed (Link: rel="next") before it
# counts as invalid; all of them together stay under the manifest size limit.
MAX_PAGES = 64
# The spec's tag schema: the algorithm and the hex part, truncated to these.
TAG_ALGORITHM_CHARS = 32
TAG_HEX_CHARS = 64
_NEXT = re.compile(r"""\brel\s*=\s*"?next\b""", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ReferrersAnswer:
    body: bytes  # an OCI image index
    source: str  # "cache", "stale" (upstream could not be asked) or "upstream"


def schema_tag(subject: Digest) -> str:
    """The tag an upstream without the referrers API keeps ``subject``'s referrers under."""
    return f"{subject.algorithm[:TAG_ALGORITHM_CHARS]}-{subject.hex[:TAG_HEX_CHARS]}"


class Referrers:
    """Referrers answers of every mirror; concurrent misses for one subject and
    filter share one upstream fetch (a fleet verifying one signature at once)."""

    def __init__(self) -> None:
        self._flights: SingleFlight[tuple[str, str, str], ReferrersAnswer] = SingleFlight()

    async def get(
        self, mirror: Mirror, repository: str, subject: Digest, artifact_type: str | None
    ) -> ReferrersAnswer:
        """The image index of ``subject``'s referrers, of ``artifact_type`` when given."""
        # Beside the tag list pages, under a key no tag list query can have.
        key = f"referrers/{subject}" + ("" if artifact_type is None else f"?{artifact_type}")
        cached = await mirror.tags.get_listing(mirror.name, repository, key)
        if cached is not None and (mirror.offline or cached.age() < mirror.tag_ttl):
            return ReferrersAnswer(cached.body, "cache")
        if mirror.offline:
            # Nothing cached from a referrers API: what the tag schema's index
            # cached by a pull says (the tag path answers offline from the cache).
            found = await _from_tag_schema(mirror, repository, subject)
            return ReferrersAnswer(_index(_filter(found, artifact_type)), "cache")

        async def fetch() -> ReferrersAnswer:
            try:
                found = await _from_upstream(mirror, repository, subject, artifact_type)
            except (UpstreamUnavailable, TooManyRequests) as exc:
                if cached is None:
                    raise
                reason = "ratelimited" if isinstance(exc, TooManyRequests) else "unavailable"
                mirror.metrics.stale_served.labels(reason).inc()
                log.warning(
                    "serving the referrers of %s@%s from cache: %s", repository, subject, exc
                )
                return ReferrersAnswer(cached.body, "stale")
            # Filtered here too, whatever OCI-Filters-Applied said: filtering
            # twice changes nothing, and an upstream that ignored it is covered.
            body = _index(_filter(found, artifact_type))
            listing = Listing(body, None, time.time())
            await mirror.tags.put_listing(mirror.name, repository, key, listing)
            return ReferrersAnswer(body, "upstream")

        answer, shared = await self._flights.run((mirror.name, repository, key), fetch)
        if shared:
            mirror.metrics.coalesced.labels("referrers").inc()
        return answer


REFERRERS = web.AppKey("referrers", Referrers)


async def _from_upstream(
    mirror: Mirror, repository: str, subject: Digest, artifact_type: str | None
) -> list[dict[str, Any]]:
    """Every page of the upstream's referrers API, else its tag schema's index."""
    query = {} if artifact_type is None else {"artifactType": artifact_type}
    own_path = mirror.upstream.url(repository, "referrers", str(subject)).path
    found: list[dict[str, Any]] = []
    total = 0
    for _ in range(MAX_PAGES):
        resp = await mirror.upstream.request(
            "GET", repository, "referrers", str(subject), accept=(OCI_INDEX,), query=query
        )
        try:
            if resp.status == 404:
                # The spec's sign of a registry without the referrers API.
                resp.release()
                if found:
                    raise UpstreamInvalid("a later page of referrers answered 404")
                return await _from_tag_schema(mirror, repository, subject)
            await raise_for_status(resp, "referrers", str(subject))
            body = await _read_limited(resp, MAX_MANIFEST_BYTES - total, mirror.upstream)
            link = resp.headers.get("Link")
        finally:
            resp.release()
        total += len(body)
        found += _descriptors(body, f"the referrers of {subject}")
        if link is None:
            return found
        following = _next_page(link, own_path)
        if following is None:
            return found
        query = following
    raise UpstreamInvalid(f"the referrers of {subject} take more than {MAX_PAGES} pages")


async def _from_tag_schema(
    mirror: Mirror, repository: str, subject: Digest
) -> list[dict[str, Any]]:
    """The referrers the tag schema's index lists; none when there is no such tag."""
    tag = schema_tag(subject)
    try:
        answer = await mirror.manifest(repository, Reference(tag=tag), (OCI_INDEX,), head=False)
    except (ManifestUnknown, NameUnknown):
        return []
    if answer.data is None or answer.media_type != OCI_INDEX:
        raise UpstreamInvalid(f"{repository}:{tag} is {answer.media_type}, not an image index")
    return _descriptors(answer.data, f"{repository}:{tag}")


def _next_page(link: str, own_path: str) -> dict[str, str] | None:
    """The query of a ``Link: <...>; rel="next"`` header, or None without one.

    Only the same path is followed: a link elsewhere is the upstream's own
    business, not a page of this answer.
    """
    for value in link.split(","):
        target, _, params = value.partition(";")
        if _NEXT.search(params) is not None:
            break
    else:
        return None
    target = target.strip()
    if not (target.startswith("<") and target.endswith(">")):
        raise UpstreamInvalid(f"unreadable Link header {link[:128]!r}")
    try:
        url = URL(target[1:-1])
    except ValueError as exc:
        raise UpstreamInvalid(f"unreadable Link header {link[:128]!r}") from exc
    if url.path != own_path:
        raise UpstreamInvalid(f"the next page of referrers is elsewhere: {url.path[:128]!r}")
    return dict(url.query)


def _descriptors(body: bytes, what: str) -> list[dict[str, Any]]:
    """The ``manifests`` of an image index, each a well-formed descriptor."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise UpstreamInvalid(f"{what} is not JSON (or nested too deeply)") from exc
    manifests = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(manifests, list):
        raise UpstreamInvalid(f"{what} is not an image index")
    for entry in manifests:
        if not _is_descriptor(entry):
            raise UpstreamInvalid(f"{what} lists a malformed descriptor")
    return manifests


def _is_descriptor(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    media_type, digest, size = entry.get("mediaType"), entry.get("digest"), entry.get("size")
    artifact_type = entry.get("artifactType")
    if not (isinstance(media_type, str) and is_media_type(media_type)):
        return False
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return False
    if artifact_type is not None and not isinstance(artifact_type, str):
        return False
    if not isinstance(digest, str):
        return False
    try:
        Digest.parse(digest)
    except (InvalidDigest, UnsupportedDigest):
        return False
    return True


def _filter(found: list[dict[str, Any]], artifact_type: str | None) -> list[dict[str, Any]]:
    if artifact_type is None:
        return found
    return [d for d in found if d.get("artifactType") == artifact_type]


def _index(found: list[dict[str, Any]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}).encode()

"""The mirror: manifests and blobs from the cache, or from the upstream into the cache.

Like distribution's ``registry/proxy`` stores, it answers every request with a
value the route handler only renders: a manifest's bytes, a blob held open in the
cache (``BlobHit``) or a blob read as it downloads (``BlobStream``). Following a
download, retrying one that another worker abandoned and counting coalesced
requests happen here; the handlers never see the storage underneath, which is
reached only through the Protocols of ``cache/storage.py``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass

import aiohttp

from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import Abandoned, DigestMismatch, DownloadFailed
from pullthrough.cache.index import Listing, TagEntry
from pullthrough.cache.manifests import StoredManifest
from pullthrough.cache.mediatypes import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MANIFESTS,
    OCI_INDEX,
    OCI_MANIFEST,
    implied,
    is_media_type,
)
from pullthrough.cache.storage import (
    BlobStorage,
    DownloadSink,
    HeldBlob,
    ManifestStorage,
    TagStorage,
    Tracker,
)
from pullthrough.metrics import Metrics
from pullthrough.proxy.config import DOCKER_HUB_ALIASES
from pullthrough.proxy.errors import (
    BlobUnknown,
    ManifestTooLarge,
    ManifestUnknown,
    NameUnknown,
    TooManyRequests,
    UpstreamInvalid,
    UpstreamUnavailable,
)
from pullthrough.proxy.inflight import SingleFlight
from pullthrough.proxy.names import Reference
from pullthrough.proxy.readahead import ReadAhead
from pullthrough.proxy.upstream import UpstreamClient, raise_for_status

log = logging.getLogger(__name__)

PROBE_SECONDS = 30.0
FETCH_BATCH = 1 << 20
# How often a blob GET may start over when the download it followed in another
# process was abandoned before sending it anything, or after (then it resumes).
FOLLOW_ATTEMPTS = 3
# distribution refuses manifests over 4 MiB; so do we, to bound memory.
MAX_MANIFEST_BYTES = 4 << 20


def manifest_media_type(content_type: str | None, data: bytes) -> str:
    """The manifest's own media type: the upstream's header, else what the JSON says.

    Only a well-formed ``type/subtype`` is taken: the store checks that shape on
    every read, and a value it would reject would make the manifest look damaged
    (and fetched again) every time.
    """
    declared = (content_type or "").split(";")[0].strip()
    if not is_media_type(declared):
        declared = ""
    if declared and declared not in ("application/json", "text/plain", "application/octet-stream"):
        return declared
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # deep nesting: not a manifest either
        return declared or "application/octet-stream"
    if isinstance(doc, dict):
        media_type = doc.get("mediaType")
        if isinstance(media_type, str) and is_media_type(media_type):
            return media_type
        shaped = implied(doc)
        if shaped is not None:
            return shaped
    return declared or "application/json"


# The tag index's Accept key for entries meant for every client.
ANY_CLIENT = "*"
# What `pullthrough warm` asks for: everything, so indexes stay whole.
ACCEPT_ALL = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)


# The manifest media types the mirror tells apart. Anything else a client lists in
# Accept is dropped: it cannot change what a registry answers, and keying on it would
# let each client grow the tag index with values of its choosing.
KNOWN_TYPES = MANIFESTS
# "*/*" or "application/*": the client takes anything. Kept (as "*/*") because some
# registries answer it with an index where a bare Accept gets a single manifest.
ANY_TYPE = "*/*"
# Fresh tags kept in memory per worker, beyond which the oldest go first.
RECENT_TAGS = 4096


def _memory_key(repository: str, tag: str, accept: str) -> str:
    return f"{repository}\0{tag}\0{accept}"


def accepted_types(accept: Sequence[str]) -> tuple[str, ...]:
    """The known manifest types among Accept lines, sorted, without duplicates.

    Case, order, q-values and other parameters are ignored. This is both the
    tag index's key (at most 2**7 values) and what is forwarded upstream, so one
    key always stands for one upstream answer.
    """
    types = set()
    for value in accept:
        for part in value.split(","):
            media_type = part.split(";")[0].strip().lower()
            if media_type in KNOWN_TYPES:
                types.add(media_type)
            elif media_type in ("*/*", "application/*"):
                types.add(ANY_TYPE)
    return tuple(sorted(types))


def accepts(accept: Sequence[str], media_type: str) -> bool:
    types = accepted_types(accept)
    return not types or media_type in types or ANY_TYPE in types


def accept_key(accept: Sequence[str]) -> str:
    """The set of media types a client accepts, normalised, for keying tag lookups."""
    return ",".join(accepted_types(accept))


class RecentTags:
    """Tag entries fresh enough to answer from memory, the oldest dropped past a cap."""

    def __init__(self, capacity: int = RECENT_TAGS) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[float, TagEntry]] = OrderedDict()

    def get(self, key: str) -> TagEntry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, entry = found
        if time.monotonic() >= expires:
            del self._entries[key]
            return None
        return entry

    def set(self, key: str, entry: TagEntry, ttl: float) -> None:
        self._entries[key] = (time.monotonic() + ttl, entry)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    digest: str
    media_type: str
    size: int
    data: bytes | None  # None when a HEAD was answered from the upstream's headers
    source: str  # "cache", "stale" (upstream could not be asked) or "upstream"


@dataclass(frozen=True, slots=True)
class BlobHead:
    size: int | None
    source: str


class Mirror:
    def __init__(
        self,
        upstream: UpstreamClient,
        blobs: BlobStorage,
        manifests: ManifestStorage,
        tags: TagStorage,
        metrics: Metrics,
        *,
        tag_ttl: float = 300.0,
        offline: bool = False,
        library_prefix: bool = False,
        readahead: ReadAhead | None = None,
    ) -> None:
        self.name = upstream.name
        self.library_prefix = library_prefix
        self.upstream = upstream
        self.tag_ttl = tag_ttl
        self.offline = offline
        self.blobs = blobs
        self.manifests = manifests
        self.tags = tags
        self.metrics = metrics
        self.readahead = readahead
        self._probe: tuple[float, str] | None = None
        self._recent_tags = RecentTags()
        # Tags are recorded under the upstream's name, not its URL: the tools
        # (`pullthrough cache ls`, export, pin, gc) find them without the
        # server's --upstream, and a changed URL keeps them.
        self._upstream_key = upstream.name
        self._manifest_flights: SingleFlight[tuple[str, str, str], StoredManifest] = SingleFlight()
        self._head_flights: SingleFlight[tuple[str, str, str], _UpstreamHead] = SingleFlight()

    # -- manifests --------------------------------------------------------------

    async def manifest(
        self, repository: str, reference: Reference, accept: Sequence[str], *, head: bool
    ) -> ManifestAnswer:
        # From here on, and upstream, only the types the mirror knows.
        accept = accepted_types(accept)
        if reference.digest is not None:
            answer = await self._by_digest(repository, reference.digest, accept, head=head)
        else:
            assert reference.tag is not None
            answer = await self._by_tag(repository, reference.tag, accept, head=head)
        self._read_ahead(repository, answer)
        return answer

    def _read_ahead(self, repository: str, answer: ManifestAnswer) -> None:
        """Start fetching what an image manifest a client got needs (the client
        asks for it next). An index names no blobs: its platform manifests start
        read-ahead only when a client asks for them."""
        if self.readahead is None or answer.data is None or self.offline:
            return
        if answer.media_type not in (OCI_MANIFEST, DOCKER_MANIFEST):
            return
        stored = StoredManifest(Digest.parse(answer.digest), answer.media_type, answer.data)
        self.readahead.image(self.name, repository, stored, self.blob_download, self.blobs.stat)

    async def _by_digest(
        self, repository: str, digest: Digest, accept: Sequence[str], *, head: bool
    ) -> ManifestAnswer:
        stored = await self.manifests.get(digest)
        if stored is not None:
            return _answer(stored, "cache")
        if self.offline:
            raise ManifestUnknown(f"{repository}@{digest} is not cached (offline mode)")
        if head:
            # A HEAD must not cost a (rate-limited) GET upstream: ask with a HEAD.
            upstream_head = await self._upstream_head(repository, str(digest), accept)
            if upstream_head.digest != str(digest):
                raise UpstreamInvalid(f"upstream says {upstream_head.digest} for {digest}")
            return upstream_head.answer()
        stored = await self._fetch(repository, str(digest), accept, expected=digest)
        return _answer(stored, "upstream")

    async def _by_tag(
        self, repository: str, tag: str, accept: Sequence[str], *, head: bool
    ) -> ManifestAnswer:
        # Keyed by what the client accepts: the same tag can be a manifest list
        # for one client and a single-platform manifest for another.
        key = accept_key(accept)
        memory_key = _memory_key(repository, tag, key)
        recent = self._recent_tags.get(memory_key)
        if isinstance(recent, TagEntry) and recent.age() < self.tag_ttl:
            known = await self.manifests.get(Digest.parse(recent.digest))
            if known is not None:
                return _answer(known, "cache")
        entry = await self.tags.get(self._upstream_key, repository, tag, key)
        # Recorded by `pullthrough warm` or `import` for any client, as long as
        # this one accepts what it is; the newer of the two wins (an import
        # after a pull moves the tag for everyone, offline too).
        everyone = await self.tags.get(self._upstream_key, repository, tag, ANY_CLIENT)
        if (
            everyone is not None
            and accepts(accept, everyone.media_type)
            and (entry is None or everyone.fetched_at > entry.fetched_at)
        ):
            entry = everyone
        cached = None
        if entry is not None:
            cached = await self.manifests.get(Digest.parse(entry.digest))
        if (
            cached is not None
            and entry is not None
            and (self.offline or entry.age() < self.tag_ttl)
        ):
            await self._keep_in_memory(memory_key, entry)
            return _answer(cached, "cache")
        if self.offline:
            raise ManifestUnknown(f"{repository}:{tag} is not cached (offline mode)")
        if entry is not None and entry.age() < self.tag_ttl:
            # Fresh, but its manifest is not in this store: another node checked
            # the tag (a tag index on Redis is shared) and keeps the manifest in
            # its own, or it was evicted. What the tag points to is known: ask
            # for that digest, not the tag again.
            return await self._by_digest(repository, Digest.parse(entry.digest), accept, head=head)
        if entry is None and not head:
            # A tag never seen: a HEAD first would cost a round trip and save no
            # pull (HEAD + GET and GET alone both spend one on Docker Hub).
            fetched = await self._fetch(repository, tag, accept, expected=None)
            await self._remember(repository, tag, accept, fetched)
            return _answer(fetched, "upstream")
        try:
            # Bounded tightly only when a stale answer is there to fall back on.
            deadline = None if cached is None else self.upstream.options.revalidate_timeout
            return await self._resolve_tag(repository, tag, accept, head=head, deadline=deadline)
        except (UpstreamUnavailable, TooManyRequests) as exc:
            if cached is None:
                raise
            reason = "ratelimited" if isinstance(exc, TooManyRequests) else "unavailable"
            self.metrics.stale_served.labels(reason).inc()
            log.warning("serving %s:%s from cache as %s: %s", repository, tag, cached.digest, exc)
            return _answer(cached, "stale")

    async def _resolve_tag(
        self,
        repository: str,
        tag: str,
        accept: Sequence[str],
        *,
        head: bool,
        deadline: float | None = None,
    ) -> ManifestAnswer:
        # Resolve the tag with a HEAD (free on Docker Hub's rate limit), then get
        # the content by digest, from the cache when we have it.
        upstream_head = await self._upstream_head(repository, tag, accept, deadline=deadline)
        if upstream_head.digest is None:
            # An upstream that does not say the digest: only a GET can tell.
            fetched = await self._fetch(repository, tag, accept, expected=None)
            await self._remember(repository, tag, accept, fetched)
            return _answer(fetched, "upstream")
        digest = Digest.parse(upstream_head.digest)
        cached = await self.manifests.get(digest)
        if cached is not None:
            await self._remember(repository, tag, accept, cached)
            return _answer(cached, "cache")
        if head:
            return upstream_head.answer()
        stored = await self._fetch(repository, str(digest), accept, expected=digest)
        await self._remember(repository, tag, accept, stored)
        return _answer(stored, "upstream")

    async def _remember(
        self, repository: str, tag: str, accept: Sequence[str], stored: StoredManifest
    ) -> None:
        entry = TagEntry(str(stored.digest), stored.media_type, time.time())
        key = accept_key(accept)
        await self.tags.put(self._upstream_key, repository, tag, key, entry)
        await self._keep_in_memory(_memory_key(repository, tag, key), entry)

    async def _keep_in_memory(self, key: str, entry: TagEntry) -> None:
        """Fresh tag entries also live in memory for the rest of their TTL, so a
        pull inside it costs no SQLite read (the index stays the shared truth)."""
        left = self.tag_ttl - entry.age()
        if left > 0 and not self.offline:
            self._recent_tags.set(key, entry, ttl=left)

    async def remember_for_everyone(
        self, repository: str, tag: str, stored: StoredManifest
    ) -> None:
        """Record a tag for any client (warm, import), not one Accept set."""
        entry = TagEntry(str(stored.digest), stored.media_type, time.time())
        await self.tags.put(self._upstream_key, repository, tag, ANY_CLIENT, entry)

    async def _upstream_head(
        self,
        repository: str,
        reference: str,
        accept: Sequence[str],
        *,
        deadline: float | None = None,
    ) -> _UpstreamHead:
        async def call() -> _UpstreamHead:
            resp = await self.upstream.request(
                "HEAD", repository, "manifests", reference, accept, deadline=deadline
            )
            try:
                await raise_for_status(resp, "manifests", reference)
                digest = resp.headers.get("Docker-Content-Digest")
                if digest is not None:
                    Digest.parse(digest)  # an upstream is input too
                return _UpstreamHead(
                    digest=digest,
                    media_type=manifest_media_type(resp.headers.get("Content-Type"), b""),
                    size=resp.content_length,
                )
            finally:
                resp.release()

        key = (repository, reference, accept_key(accept))
        result, shared = await self._head_flights.run(key, call)
        if shared:
            self.metrics.coalesced.labels("manifest").inc()
        return result

    async def _fetch(
        self, repository: str, reference: str, accept: Sequence[str], *, expected: Digest | None
    ) -> StoredManifest:
        async def call() -> StoredManifest:
            resp = await self.upstream.request("GET", repository, "manifests", reference, accept)
            try:
                await raise_for_status(resp, "manifests", reference)
                data = await _read_limited(resp, MAX_MANIFEST_BYTES, self.upstream)
                announced = resp.headers.get("Docker-Content-Digest")
                content_type = resp.headers.get("Content-Type")
            finally:
                resp.release()
            digest = expected
            if digest is None:
                algorithm = announced.partition(":")[0] if announced else "sha256"
                digest = Digest.of(data, algorithm if algorithm == "sha512" else "sha256")
            stored = StoredManifest(digest, manifest_media_type(content_type, data), data)
            if announced is not None and announced != str(digest):
                raise UpstreamInvalid(f"upstream said {announced}, content is {digest}")
            try:
                await self.manifests.put(stored)
            except DigestMismatch as exc:
                raise UpstreamInvalid(str(exc)) from exc
            return stored

        key = (repository, reference, accept_key(accept))
        result, shared = await self._manifest_flights.run(key, call)
        if shared:
            self.metrics.coalesced.labels("manifest").inc()
        return result

    # -- health ---------------------------------------------------------------------

    async def upstream_state(self) -> str:
        """ "reachable", "unreachable" or "offline"; probed at most every 30 seconds."""
        if self.offline:
            return "offline"
        now = time.monotonic()
        if self._probe is None or now - self._probe[0] > PROBE_SECONDS:
            try:
                status = await self.upstream.ping()
                state = "reachable" if status < 500 else "unreachable"
            except UpstreamUnavailable:
                state = "unreachable"
            self._probe = (now, state)
        return self._probe[1]

    async def cache_state(self) -> str:
        """ "writable", "full" (no space: served, not kept) or "not writable"."""
        return await self.blobs.state()

    # -- tag listings -------------------------------------------------------------

    async def tag_list(self, repository: str, query: dict[str, str]) -> tuple[Listing, str]:
        """A page of ``tags/list``, under the same freshness rule as tags."""
        key = "&".join(f"{k}={v}" for k, v in sorted(query.items()))
        cached = await self.tags.get_listing(self._upstream_key, repository, key)
        if cached is not None and (self.offline or cached.age() < self.tag_ttl):
            return cached, "cache"
        if self.offline:
            raise NameUnknown(f"no tag list of {repository} is cached (offline mode)")
        try:
            resp = await self.upstream.request(
                "GET", repository, "tags", "list", accept=("application/json",), query=query
            )
            try:
                await raise_for_status(resp, "tags", "list")
                body = await _read_limited(resp, MAX_MANIFEST_BYTES, self.upstream)
                link = resp.headers.get("Link")
            finally:
                resp.release()
        except (UpstreamUnavailable, TooManyRequests) as exc:
            if cached is None:
                raise
            self.metrics.stale_served.labels("unavailable").inc()
            log.warning("serving the tag list of %s from cache: %s", repository, exc)
            return cached, "stale"
        listing = Listing(body, link, time.time())
        await self.tags.put_listing(self._upstream_key, repository, key, listing)
        return listing, "upstream"

    # -- blobs ------------------------------------------------------------------

    async def blob(self, repository: str, digest: Digest) -> BlobHit | BlobStream:
        """A blob GET: the cached file held open, or a stream of the download.

        A download that fails before it has an answer from the upstream raises
        (the client gets an error); one this mirror only followed (another worker
        ran it) and that was abandoned is tried again, ours this time.
        """
        for attempt in range(1, FOLLOW_ATTEMPTS + 1):
            held = await self.blobs.open(digest)
            if held is not None:
                hit = BlobHit(held)
                hit.prefetched = self._claimed(digest)
                return hit
            # Not cached (or evicted just now): from the upstream.
            tracker = await self.blob_download(repository, digest)
            if tracker is None:
                continue  # committed in the meantime
            try:
                size = await tracker.size()
            except DownloadFailed:
                tracker.close()
                if attempt == FOLLOW_ATTEMPTS:
                    raise
                continue
            except BaseException:
                tracker.close()
                raise
            if tracker.joined:
                self.metrics.coalesced.labels("blob").inc()
            stream = BlobStream(self, repository, digest, tracker, size)
            stream.prefetched = self._claimed(digest)
            return stream
        raise DownloadFailed(f"could not follow the download of {digest}")

    def _claimed(self, digest: Digest) -> bool:
        """Was (or is) this blob being fetched by read-ahead, not yet asked for?"""
        return self.readahead is not None and self.readahead.claim(self.name, digest)

    async def blob_hit(self, digest: Digest) -> int | None:
        """The cached blob's size (its use recorded), or None."""
        return await self.blobs.hit(digest)

    async def blob_download(
        self, repository: str, digest: Digest, *, committed: bool = False
    ) -> Tracker | None:
        """Follow the upstream download of ``digest``, starting one if none runs.

        None when it is cached, unless ``committed``: then a tracker reading it."""
        if self.offline:
            raise BlobUnknown(f"{digest} is not cached (offline mode)")

        async def fetch(sink: DownloadSink) -> None:
            self.metrics.downloads_in_flight.inc()
            shown = self.metrics.activity.download(self.name, repository, str(digest))
            try:
                with shown as progress:

                    async def write(chunk: bytes) -> None:
                        await sink.write(chunk)
                        progress.add(len(chunk))

                    resp = await self.upstream.request("GET", repository, "blobs", str(digest))
                    try:
                        await raise_for_status(resp, "blobs", str(digest))
                        progress.size = resp.content_length
                        await sink.begin(resp.content_length)
                        await self.upstream.copy_body(resp, write, FETCH_BATCH)
                    finally:
                        resp.release()
            finally:
                self.metrics.downloads_in_flight.dec()

        return await self.blobs.track(digest, fetch, committed=committed)

    async def blob_head(self, repository: str, digest: Digest) -> BlobHead:
        size = await self.blobs.stat(digest)
        if size is not None:
            return BlobHead(size, "cache")
        if self.offline:
            raise BlobUnknown(f"{digest} is not cached (offline mode)")
        resp = await self.upstream.request("HEAD", repository, "blobs", str(digest))
        try:
            await raise_for_status(resp, "blobs", str(digest))
            return BlobHead(resp.content_length, "upstream")
        finally:
            resp.release()

    async def settle(self) -> None:
        """Wait until the blob downloads running now have finished (committed or not)."""
        await self.blobs.settle()


class BlobHit:
    """A cached blob, held open until ``close``: eviction cannot take it meanwhile.

    Answered by a redirect to ``location`` when it has one, else from the local
    file at ``path`` when it has one, else with the bytes ``read`` gives."""

    def __init__(self, held: HeldBlob) -> None:
        self._held = held
        self.size = held.size
        self.prefetched = False  # committed by read-ahead for this pull
        self.location = held.location
        # Taken once: the filesystem's is a /proc path built per call.
        self.path = None if self.location is not None else held.serve_path

    async def read(self, start: int, stop: int | None) -> AsyncGenerator[bytes, None]:
        """Bytes ``start`` to ``stop`` (exclusive; None: to the end), from storage."""
        async for chunk in self._held.read(start, self.size if stop is None else stop):
            yield chunk

    def close(self) -> None:
        self._held.close()


class BlobStream:
    """A blob being downloaded, read while it arrives.

    ``size`` is what the upstream announced (None: not said). A failed download
    ends ``read`` with its error once the bytes before it were given: the last
    byte always waits until the whole blob is verified.
    """

    def __init__(
        self, mirror: Mirror, repository: str, digest: Digest, tracker: Tracker, size: int | None
    ) -> None:
        self.size = size
        self.prefetched = False  # a download read-ahead started
        self._mirror = mirror
        self._repository = repository
        self._digest = digest
        self._tracker = tracker

    async def read(self, start: int, stop: int | None) -> AsyncGenerator[bytes, None]:
        """Bytes ``start`` to ``stop`` (exclusive; None: to the end)."""
        pos = start
        try:
            for attempt in range(1, FOLLOW_ATTEMPTS + 1):
                try:
                    async for chunk in self._tracker.read(pos, stop):
                        pos += len(chunk)
                        yield chunk
                    return
                except Abandoned:
                    # The worker whose download we followed gave it up (its disk
                    # full, or it died): go on from here with one of our own. What
                    # was given stays valid: the last byte still waits for a digest.
                    if attempt == FOLLOW_ATTEMPTS:
                        raise
                    self._tracker.close()
                    again = await self._mirror.blob_download(
                        self._repository, self._digest, committed=True
                    )
                    assert again is not None  # asked with committed=True
                    self._tracker = again
                    await again.size()
        finally:
            self.close()

    def close(self) -> None:
        """Done with it (also unread): the download goes on without this reader."""
        self._tracker.close()


@dataclass(frozen=True, slots=True)
class _UpstreamHead:
    digest: str | None
    media_type: str
    size: int | None

    def answer(self) -> ManifestAnswer:
        assert self.digest is not None
        return ManifestAnswer(self.digest, self.media_type, self.size or 0, None, "upstream")


def _answer(stored: StoredManifest, source: str) -> ManifestAnswer:
    return ManifestAnswer(
        str(stored.digest), stored.media_type, len(stored.data), stored.data, source
    )


async def _read_limited(
    resp: aiohttp.ClientResponse, limit: int, upstream: UpstreamClient
) -> bytes:
    if resp.content_length is not None and resp.content_length > limit:
        raise ManifestTooLarge(f"{resp.content_length} bytes")
    data = bytearray()
    try:
        async for chunk in resp.content.iter_any():
            data += chunk
            if len(data) > limit:
                raise ManifestTooLarge(f"more than {limit} bytes")
    except (aiohttp.ClientError, TimeoutError) as exc:
        total = upstream.options.manifest_timeout
        raise UpstreamUnavailable(upstream.failure(exc, resp.url, total=total)) from exc
    return bytes(data)


class Mirrors:
    """Every configured upstream's mirror, found by the host name clients use."""

    def __init__(self, default: Mirror, others: Sequence[Mirror] = ()) -> None:
        self.default = default
        self._by_name = {m.name: m for m in others}

    def find(self, name: str) -> Mirror | None:
        if name.lower() in DOCKER_HUB_ALIASES:
            return self.default
        return self._by_name.get(name.lower())

    def __iter__(self) -> Iterator[Mirror]:
        yield self.default
        yield from self._by_name.values()

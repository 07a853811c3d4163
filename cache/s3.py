"""Blobs and manifests on S3-compatible object storage (AWS S3, SeaweedFS, MinIO).

The client is aiobotocore: it speaks every part of the S3 API this design needs,
where obstore (object_store underneath) has no call to list or abort the multipart
uploads a dead download leaves, nor a conditional CompleteMultipartUpload; it is
botocore underneath, so credentials come from the standard AWS chain (environment,
``~/.aws/config`` and profiles, instance and pod roles) exactly as the aws CLI
finds them; and types-aiobotocore types it fully for ``mypy --strict``. Manifests
(a few KiB, also read by blocking callers) use botocore's own synchronous client
in threads, as the filesystem store reads its files in threads.

In the bucket, under the prefix::

    blobs/<alg>/<hex>                    committed blobs, verified before they appear
    manifests/<alg>/<hex>                "<media type>\\n<bytes>", verified on every read
    quarantine/manifests/<alg>/<hex>     corrupt manifests, set aside

A cold blob is fetched once per fleet: the process holding the fetch lock
``blob:<digest>`` (``cache/coordination.py``) streams it from the upstream into a
staging file on its own disk (``<cache_dir>/tmp/s3``), which its local readers
follow from byte 0, while a multipart upload sends the staged file to the blob's
final key part by part (memory stays at one part). Only after the digest is
verified is the upload completed, with ``If-None-Match: *``: until then S3 shows
nothing under the key. Where completion is not atomic with the condition
(SeaweedFS lets two racers both complete) the loser rewrites the very bytes the
winner wrote: both were verified against the same digest, so a final key never
holds partial or unverified bytes, whoever won. A holder whose lease was lost (a
stalled node) may therefore still complete safely. Blobs under one part go up
with one conditional PutObject.

Processes that find the lock taken wait for its release (``FetchLocks.wait``,
re-checking the bucket every few seconds) and then read the committed object;
if the holder let go without a commit or died (its lease expired), a waiter takes
the lock and fetches itself. Uploads of downloads that died midway are aborted by
``clean_uploads`` (at start-up, for those older than ``STALE_UPLOAD_SECONDS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import botocore.config
import botocore.session
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from cachetools import LRUCache

from pullthrough.cache.coordination import FetchLocks, Lease
from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import (
    DigestMismatch,
    DownloadFailed,
    InvalidDigest,
    SizeMismatch,
    StorageUnavailable,
)
from pullthrough.cache.manifests import MEMORY_BYTES, StoredManifest, damage
from pullthrough.cache.quarantine import Corrupt
from pullthrough.cache.s3_location import S3Location
from pullthrough.cache.storage import DownloadSink, Tracker

if TYPE_CHECKING:
    from hashlib import _Hash

    from types_aiobotocore_s3 import S3Client

log = logging.getLogger(__name__)

# Multipart part size: S3's minimum is 5 MiB for every part but the last. A blob
# is at most 10,000 parts: larger ones (when the upstream says their size) get
# larger parts; one of unknown size can be up to 78 GiB.
PART_BYTES = 8 << 20
MAX_PARTS = 10_000


def part_size(size: int | None) -> int:
    """The part size for a blob of ``size`` bytes (None: unknown), whole MiB."""
    if size is None or size <= PART_BYTES * MAX_PARTS:
        return PART_BYTES
    mib = 1 << 20
    return -(-size // MAX_PARTS // mib) * mib + mib


READ_CHUNK = 1 << 20
# A waiter re-checks the bucket and the lock this often even without a word from
# the holder (a release it missed, a holder that died without a lease expiring).
WAIT_RECHECK_SECONDS = 2.0
# Multipart uploads older than this belong to dead downloads.
STALE_UPLOAD_SECONDS = 3600.0
# How long a presigned blob URL (``redirect = true``) stays valid.
PRESIGN_SECONDS = 1200
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
_TAKEN = frozenset({"412", "PreconditionFailed", "ConditionalRequestConflict"})


def _missing(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code", "") in _MISSING


def _taken(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code", "") in _TAKEN


# How both clients (the async one for blobs, botocore's blocking one for manifests
# and the command line) talk to S3.
_CLIENT_OPTIONS: dict[str, Any] = {
    # SigV4 also for presigned URLs (botocore would presign with SigV2 here).
    "signature_version": "s3v4",
    "s3": {"addressing_style": "path"},
    # Checksums only where S3 demands them: not every S3-compatible server
    # takes the trailing ones newer botocore sends by default.
    "request_checksum_calculation": "when_required",
    "response_checksum_validation": "when_required",
    "retries": {"max_attempts": 3, "mode": "standard"},
    "connect_timeout": 10,
    "read_timeout": 60,
}


def _aio_config() -> AioConfig:
    return AioConfig(**_CLIENT_OPTIONS, max_pool_connections=64)


def blocking_client(location: S3Location) -> Any:
    """botocore's blocking S3 client, configured as the async one."""
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=location.endpoint_url,
        region_name=location.region,
        aws_access_key_id=location.access_key,
        aws_secret_access_key=location.secret_key,
        config=botocore.config.Config(**_CLIENT_OPTIONS),
    )


class S3Connection:
    """One aiobotocore client, opened on first use (so a store can be made outside
    the event loop) and closed with ``close``."""

    def __init__(self, location: S3Location) -> None:
        self.location = location
        self._stack = contextlib.AsyncExitStack()
        self._client: S3Client | None = None
        self._opening = asyncio.Lock()

    async def client(self) -> S3Client:
        if self._client is None:
            async with self._opening:
                if self._client is None:
                    where = self.location
                    made = get_session().create_client(
                        "s3",
                        endpoint_url=where.endpoint_url,
                        region_name=where.region,
                        aws_access_key_id=where.access_key,
                        aws_secret_access_key=where.secret_key,
                        config=_aio_config(),
                    )
                    self._client = await self._stack.enter_async_context(made)
        return self._client

    async def check(self) -> None:
        """Raise unless the bucket is there and these credentials may use it."""
        client = await self.client()
        await client.head_bucket(Bucket=self.location.bucket)

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None


@contextlib.contextmanager
def _unavailable(location: S3Location) -> Iterator[None]:
    """S3 failing (not a missing object: callers look for that) as StorageUnavailable,
    which the mirror answers 503."""
    try:
        yield
    except ClientError as exc:
        if _missing(exc):
            raise
        error = exc.response.get("Error", {})
        reason = error.get("Message") or error.get("Code", "")
        raise StorageUnavailable(f"{location}: {reason}") from exc
    except BotoCoreError as exc:
        raise StorageUnavailable(f"{location}: {exc}") from exc


async def check_location(location: S3Location, within: float = 15.0) -> None:
    """Raise StorageUnavailable (a one-line reason) unless ``location`` is usable."""
    connection = S3Connection(location)
    try:
        async with asyncio.timeout(within):
            await connection.check()
    except TimeoutError:
        raise StorageUnavailable(f"{location}: no answer within {within:.0f} s") from None
    except NoCredentialsError:
        raise StorageUnavailable(
            f"{location}: no AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "~/.aws/credentials or an instance role)"
        ) from None
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        reason = "the bucket does not exist" if code in _MISSING else error.get("Message") or code
        raise StorageUnavailable(f"{location}: {reason} ({code})") from None
    except BotoCoreError as exc:
        raise StorageUnavailable(f"{location}: {exc}") from None
    finally:
        await connection.close()


class _State(Enum):
    WAITING = "waiting"  # another process holds the lock
    RUNNING = "running"
    VERIFIED = "verified"  # every byte is in and hashes right; being completed
    COMMITTED = "committed"
    FAILED = "failed"


_DONE = frozenset({_State.VERIFIED, _State.COMMITTED})


@dataclass(eq=False)
class _Download:
    """One digest's download as this process sees it, shared by its readers."""

    digest: Digest
    state: _State = _State.WAITING
    size: int | None = None
    written: int = 0  # bytes in the staging file
    staged: Path | None = None
    # Committed by another process: readers read the object, not a staging file.
    remote: bool = False
    stopped: bool = False  # the fetch failed: no more parts are sent
    error: BaseException | None = None
    task: asyncio.Task[None] | None = None
    size_known: asyncio.Event = field(default_factory=asyncio.Event)
    _progress: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def progress_event(self) -> asyncio.Event:
        return self._progress

    async def until(self, written: int) -> bool:
        """Wait until ``written`` bytes are staged; False when no more will come."""
        while self.written < written:
            if self.state is not _State.RUNNING or self.stopped:
                return False
            await self._progress.wait()
        return True


class _Sink:
    """What the fetch function writes to: the staging file, hashed on the way."""

    def __init__(self, download: _Download, fd: int) -> None:
        self._download = download
        self._fd = fd
        self._hasher: _Hash = download.digest.hasher()

    async def begin(self, size: int | None) -> None:
        self._download.size = size
        self._download.size_known.set()

    async def write(self, chunk: bytes) -> None:
        self._hasher.update(chunk)
        if len(chunk) > 256 * 1024:
            await asyncio.to_thread(_write_all, self._fd, chunk)
        else:
            _write_all(self._fd, chunk)
        self._download.written += len(chunk)
        self._download.notify()

    def verify(self) -> None:
        download = self._download
        if download.size is not None and download.written != download.size:
            raise SizeMismatch(download.size, download.written)
        actual = f"{download.digest.algorithm}:{self._hasher.hexdigest()}"
        if actual != str(download.digest):
            raise DigestMismatch(str(download.digest), actual)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Upload:
    """The staged bytes going to the final key: parts while the fetch runs, the
    completion (conditional) only once the digest is verified."""

    def __init__(self, client: S3Client, bucket: str, key: str, fd: int) -> None:
        self._client = client
        self._bucket = bucket
        self._key = key
        self._fd = fd
        self.upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self.sent = 0
        self.part = PART_BYTES

    async def stream(self, download: _Download) -> None:
        """Send every full part as it is staged, until the fetch ends."""
        # Bytes are staged only after the size was announced (or said unknown).
        while await download.until(self.sent + PART_BYTES):
            self.part = part_size(download.size)
            if not await download.until(self.sent + self.part):
                return
            await self._part(self.part)

    async def _part(self, count: int) -> None:
        if self.upload_id is None:
            made = await self._client.create_multipart_upload(Bucket=self._bucket, Key=self._key)
            self.upload_id = made["UploadId"]
        body = await asyncio.to_thread(os.pread, self._fd, count, self.sent)
        number = len(self._parts) + 1
        done = await self._client.upload_part(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=body,
        )
        self._parts.append({"PartNumber": number, "ETag": done["ETag"]})
        self.sent += len(body)

    async def finish(self, total: int) -> None:
        """Send what is left and make the object visible, unless it is already."""
        try:
            if self.upload_id is None:
                body = await asyncio.to_thread(os.pread, self._fd, total, 0)
                await self._client.put_object(
                    Bucket=self._bucket, Key=self._key, Body=body, IfNoneMatch="*"
                )
                return
            while self.sent < total:
                await self._part(min(self.part, total - self.sent))
            await self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self._parts},  # type: ignore[typeddict-item]
                IfNoneMatch="*",
            )
            self.upload_id = None
        except ClientError as exc:
            if not _taken(exc):
                raise
            # Someone committed it first: the same verified bytes are there.
            await self.abort()

    async def abort(self) -> None:
        upload_id, self.upload_id = self.upload_id, None
        if upload_id is not None:
            with contextlib.suppress(ClientError, BotoCoreError):
                await self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=self._key, UploadId=upload_id
                )


class _S3Blob:
    """A committed blob on S3, served by ranged GETs or a presigned redirect."""

    serve_path = None

    def __init__(
        self,
        read: Callable[[int, int], AsyncIterator[bytes]],
        size: int,
        location: str | None,
    ) -> None:
        self.size = size
        self._read = read
        self._location = location

    @property
    def location(self) -> str | None:
        return self._location

    def read(self, start: int, end: int) -> AsyncIterator[bytes]:
        return self._read(start, end)

    def close(self) -> None:
        """Nothing is held: S3 keeps an object whole until it is deleted."""


class _Tracker:
    """One reader of a download: it follows the staging file while this process
    fetches, or reads the object once another process committed it."""

    def __init__(self, store: S3BlobStore, download: _Download, *, joined: bool) -> None:
        self.joined = joined
        self._store = store
        self._download = download

    async def size(self) -> int | None:
        download = self._download
        await download.size_known.wait()
        if download.state is _State.FAILED and download.written == 0:
            raise _failure(download.error)
        return download.size

    def close(self) -> None:
        """Nothing is held between reads."""

    async def read(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        download = self._download
        await download.size_known.wait()
        fd = None
        if not download.remote and download.staged is not None:
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(download.staged, os.O_RDONLY | os.O_CLOEXEC)
        if fd is None:
            # Committed elsewhere, or committed here before we looked.
            if download.state is _State.FAILED:
                raise _failure(download.error)
            size = download.size if download.remote else await self._store.stat(download.digest)
            if size is None:
                raise DownloadFailed(f"{download.digest} was neither staged nor committed")
            async for chunk in self._store.read_range(
                download.digest, start, size if end is None else min(end, size)
            ):
                yield chunk
            return
        try:
            async for chunk in _follow(download, fd, start, end):
                yield chunk
        finally:
            os.close(fd)


async def _follow(
    download: _Download, fd: int, start: int, end: int | None
) -> AsyncIterator[bytes]:
    """Bytes ``start`` to ``end`` of the staging file as they arrive; the last one
    waits for the digest's verdict."""
    pos = start
    while True:
        event = download.progress_event()
        if download.state is _State.FAILED:
            raise _failure(download.error)
        have = download.written
        target = end if end is not None else download.size
        done = download.state in _DONE
        if done:
            stop = have if target is None else min(target, have)
        else:
            stop = min(have, (have if target is None else target) - 1)
        if pos < stop:
            chunk = await asyncio.to_thread(os.pread, fd, min(READ_CHUNK, stop - pos), pos)
            if not chunk:
                raise DownloadFailed("the staging file was truncated")
            pos += len(chunk)
            yield chunk
        elif done:
            return
        else:
            await event.wait()


def _failure(error: BaseException | None) -> BaseException:
    if isinstance(error, Exception):
        return error
    return DownloadFailed("the download was cancelled")


Fetch = Callable[[DownloadSink], Awaitable[None]]


class S3BlobStore:
    """Blobs in a bucket; one upstream fetch per digest across every process that
    shares the bucket and ``locks``. See the module doc."""

    def __init__(
        self,
        location: S3Location,
        *,
        locks: FetchLocks,
        staging: Path,
        redirect: bool = False,
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        self.location = location
        self.connection = S3Connection(location)
        self._locks = locks
        self._staging = staging
        self._redirect = redirect
        self._on_commit = on_commit
        self._downloads: dict[Digest, _Download] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- committed blobs --------------------------------------------------------------

    async def stat(self, digest: Digest) -> int | None:
        try:
            with _unavailable(self.location):
                client = await self.connection.client()
                head = await client.head_object(
                    Bucket=self.location.bucket, Key=self.location.key("blobs", digest)
                )
        except ClientError:  # _unavailable lets only "no such object" through
            return None
        return head["ContentLength"]

    async def hit(self, digest: Digest) -> int | None:
        """``stat``: S3 keeps no access time, so no use is recorded here."""
        return await self.stat(digest)

    async def open(self, digest: Digest) -> _S3Blob | None:
        size = await self.stat(digest)
        if size is None:
            return None
        location = None
        if self._redirect:
            client = await self.connection.client()  # stat made it: no I/O here
            location = await client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.location.bucket, "Key": self.location.key("blobs", digest)},
                ExpiresIn=PRESIGN_SECONDS,
            )
        return _S3Blob(lambda start, end: self.read_range(digest, start, end), size, location)

    async def read_range(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``start`` to ``end`` (exclusive) of the committed blob."""
        if start >= end:
            return
        with _unavailable(self.location):
            client = await self.connection.client()
            resp = await client.get_object(
                Bucket=self.location.bucket,
                Key=self.location.key("blobs", digest),
                Range=f"bytes={start}-{end - 1}",
            )
            async with resp["Body"] as body:
                async for chunk in body.iter_chunks(READ_CHUNK):
                    yield chunk

    async def remove(self, digest: Digest) -> bool:
        if await self.stat(digest) is None:
            return False
        with _unavailable(self.location):
            client = await self.connection.client()
            await client.delete_object(
                Bucket=self.location.bucket, Key=self.location.key("blobs", digest)
            )
        return True

    async def digests(self) -> AsyncIterator[Digest]:
        start = f"{self.location.prefix}blobs/"
        with _unavailable(self.location):
            client = await self.connection.client()
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=start
            )
            async for page in pages:
                for entry in page.get("Contents", []):
                    algorithm, _, hex_ = entry.get("Key", "")[len(start) :].partition("/")
                    try:
                        yield Digest.parse(f"{algorithm}:{hex_}")
                    except InvalidDigest:
                        continue  # not ours

    async def state(self) -> str:
        try:
            await self.connection.check()
        except (ClientError, BotoCoreError) as exc:
            log.warning("%s: %s", self.location, exc)
            return "not writable"
        return "writable"

    # -- downloads ------------------------------------------------------------------

    async def track(
        self, digest: Digest, fetch: Fetch, *, committed: bool = False
    ) -> Tracker | None:
        download = self._downloads.get(digest)
        if download is None:
            size = await self.stat(digest)
            download = self._downloads.get(digest)  # started while we looked?
            if download is None and size is not None:
                if not committed:
                    return None
                done = _Download(digest, _State.COMMITTED, size, remote=True)
                done.size_known.set()
                return _Tracker(self, done, joined=False)
        if download is not None:
            return _Tracker(self, download, joined=True)
        download = _Download(digest)
        self._downloads[digest] = download
        try:
            lease = await self._locks.acquire(f"blob:{digest}")
        except BaseException:
            del self._downloads[digest]
            raise
        task = asyncio.create_task(self._run(download, fetch, lease), name=f"download {digest}")
        download.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # Joined: another process fetches; this one waits for its object.
        return _Tracker(self, download, joined=lease is None)

    async def _run(self, download: _Download, fetch: Fetch, lease: Lease | None) -> None:
        digest = download.digest
        key = f"blob:{digest}"
        committed = False
        try:
            while lease is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WAIT_RECHECK_SECONDS):
                        await self._locks.wait(key)
                size = await self.stat(digest)
                if size is not None:
                    download.size, download.remote = size, True
                    download.state = _State.COMMITTED
                    return
                # Released without a commit, or the holder died: our turn.
                lease = await self._locks.acquire(key)
            size = await self.stat(digest)
            if size is not None:  # committed between our look and our lock
                download.size, download.remote = size, True
                download.state = _State.COMMITTED
                committed = True
                return
            download.state = _State.RUNNING
            await self._fetch(download, fetch, lease)
            committed = True
        except BaseException as exc:
            download.state = _State.FAILED
            download.error = exc
            if isinstance(exc, ClientError | BotoCoreError):
                download.error = StorageUnavailable(f"{self.location}: {exc}")
            if not isinstance(exc, Exception):
                raise
            log.warning("download of %s failed: %s", digest, download.error)
        finally:
            if lease is not None:
                await asyncio.shield(lease.release(committed=committed))
            if self._downloads.get(digest) is download:
                del self._downloads[digest]
            download.size_known.set()
            download.notify()

    async def _fetch(self, download: _Download, fetch: Fetch, lease: Lease) -> None:
        self._staging.mkdir(parents=True, exist_ok=True)
        staged = self._staging / f"{download.digest.hex}.{uuid.uuid4().hex}.partial"
        fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        download.staged = staged
        upload = _Upload(
            await self.connection.client(),
            self.location.bucket,
            self.location.key("blobs", download.digest),
            fd,
        )
        uploading = asyncio.create_task(upload.stream(download))
        try:
            sink = _Sink(download, fd)
            await fetch(sink)
            sink.verify()
            # Readers may have their last byte: the bytes are right. The object
            # becomes visible below, for everyone else.
            download.state = _State.VERIFIED
            download.notify()
            await uploading
            if lease.lost:
                log.warning("lost the lease on %s; completing its verified bytes", download.digest)
            await upload.finish(download.written)
            download.state = _State.COMMITTED
            self._on_commit()
        except BaseException:
            # Not cancelled: a part upload cut off midway (its CreateMultipartUpload
            # sent, its UploadId not yet known) would leave an upload nobody aborts.
            download.stopped = True
            download.notify()
            await asyncio.shield(_drop(uploading, upload))
            raise
        finally:
            # Readers hold their own descriptors; later ones read the object.
            staged.unlink(missing_ok=True)
            os.close(fd)

    async def clean_uploads(self, older_than: float = STALE_UPLOAD_SECONDS) -> int:
        """Abort the multipart uploads of downloads that died; returns how many."""
        with _unavailable(self.location):
            return await self._clean_uploads(older_than)

    async def _clean_uploads(self, older_than: float) -> int:
        client = await self.connection.client()
        cutoff = time.time() - older_than
        aborted = 0
        pages = client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.location.bucket, Prefix=f"{self.location.prefix}blobs/"
        )
        async for page in pages:
            for upload in page.get("Uploads", []):
                started = upload.get("Initiated")
                if started is not None and started.timestamp() > cutoff:
                    continue
                with contextlib.suppress(ClientError):
                    await client.abort_multipart_upload(
                        Bucket=self.location.bucket,
                        Key=upload.get("Key", ""),
                        UploadId=upload.get("UploadId", ""),
                    )
                    aborted += 1
        return aborted

    def remove_stale(self) -> int:
        """Remove staging files left by a crash of this node. Returns the count."""
        removed = 0
        if self._staging.is_dir():
            for path in self._staging.glob("*.partial"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    async def settle(self) -> None:
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Stop the downloads still running (their uploads are aborted).

        Verified ones are let finish: their readers had every byte, and the
        object is one completion away (at most the last part to send)."""
        finishing = [d.task for d in self._downloads.values() if d.state is _State.VERIFIED]
        await asyncio.gather(*[t for t in finishing if t is not None], return_exceptions=True)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._downloads.clear()
        await self.connection.close()


async def _drop(uploading: asyncio.Task[None], upload: _Upload) -> None:
    """Let the part being sent finish, then abort the whole upload."""
    with contextlib.suppress(Exception):
        await uploading
    await upload.abort()


class S3ManifestStore:
    """Manifests in a bucket: a line with the media type, then the bytes; verified
    on every read from S3, the most recently used kept in memory."""

    def __init__(
        self,
        location: S3Location,
        *,
        memory_bytes: int = MEMORY_BYTES,
        on_corrupt: Callable[[], None] = lambda: None,
    ) -> None:
        self.location = location
        self._on_corrupt = on_corrupt
        self._memory: LRUCache[Digest, StoredManifest] = LRUCache(
            maxsize=memory_bytes, getsizeof=lambda m: len(m.data) + 256
        )
        self._client: Any = blocking_client(location)

    def read(self, digest: Digest, *, touch: bool = True) -> StoredManifest | None:
        found = self.check(digest, touch=touch)
        return found if isinstance(found, StoredManifest) else None

    def check(
        self, digest: Digest, *, touch: bool = False, log: bool = True
    ) -> StoredManifest | Corrupt | None:
        """Read ``digest`` from S3 (never from memory) and verify it; a corrupt one
        is moved under ``quarantine/``. ``touch`` is moot: S3 keeps no use times."""
        key = self.location.key("manifests", digest)
        try:
            resp = self._client.get_object(Bucket=self.location.bucket, Key=key)
            raw: bytes = resp["Body"].read()
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        media_type, newline, data = raw.partition(b"\n")
        problem = damage(digest, media_type, newline, data)
        if problem is None:
            return StoredManifest(digest, media_type.decode("ascii"), data)
        aside = f"{self.location.prefix}quarantine/manifests/{digest.algorithm}/{digest.hex}"
        bucket = self.location.bucket
        self._client.copy_object(
            Bucket=bucket, Key=aside, CopySource={"Bucket": bucket, "Key": key}
        )
        self._client.delete_object(Bucket=bucket, Key=key)
        self._on_corrupt()
        if log:
            _log_corrupt(digest, problem, f"s3://{bucket}/{aside}")
        return Corrupt("manifest", digest, problem, None)

    def raw(self, digest: Digest) -> bytes:
        """The stored record of ``digest`` as it is in S3, unverified."""
        resp = self._client.get_object(
            Bucket=self.location.bucket, Key=self.location.key("manifests", digest)
        )
        data: bytes = resp["Body"].read()
        return data

    def replace_raw(self, digest: Digest, record: bytes) -> None:
        """Store ``record`` as ``digest``'s, unverified (tests damage manifests so)."""
        self._client.put_object(
            Bucket=self.location.bucket, Key=self.location.key("manifests", digest), Body=record
        )

    def write(self, manifest: StoredManifest) -> None:
        actual = Digest.of(manifest.data, manifest.digest.algorithm)
        if actual != manifest.digest:
            raise DigestMismatch(str(manifest.digest), str(actual))
        if "\n" in manifest.media_type:
            raise ValueError("a media type has no newline")
        # Unconditional: a manifest's bytes are its name, a rewrite changes nothing.
        self._client.put_object(
            Bucket=self.location.bucket,
            Key=self.location.key("manifests", manifest.digest),
            Body=manifest.media_type.encode() + b"\n" + manifest.data,
        )

    async def get(self, digest: Digest) -> StoredManifest | None:
        """From memory or S3; None also while S3 fails (logged): the mirror then
        fetches the manifest from the upstream, as for any miss."""
        found = self._memory.get(digest)
        if found is None:
            try:
                found = await asyncio.to_thread(self.read, digest)
            except (ClientError, BotoCoreError) as exc:
                log.warning("manifest %s not read from %s: %s", digest, self.location, exc)
                return None
            if found is not None:
                self._memory[digest] = found
        return found

    async def put(self, manifest: StoredManifest) -> None:
        """Store it; one S3 would not take is still answered from memory."""
        try:
            await asyncio.to_thread(self.write, manifest)
        except (ClientError, BotoCoreError) as exc:
            log.warning("manifest %s not stored in %s: %s", manifest.digest, self.location, exc)
        self._memory[manifest.digest] = manifest

    def close(self) -> None:
        self._client.close()


def _log_corrupt(digest: Digest, problem: str, where: str) -> None:
    log.warning(
        "corrupt manifest %s in S3 (%s): moved to %s; fetched again from the upstream "
        "when asked for",
        digest,
        problem,
        where,
    )

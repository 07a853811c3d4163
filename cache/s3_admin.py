"""One S3 store seen by the operator's tools: what it holds, re-hashed, collected.

The mirror's own S3 classes (``cache/s3.py``) serve requests on the event loop;
the command line and the metrics' scrape-time measure are blocking code, so this
module lists, reads and deletes with botocore's synchronous client. The keys are
``s3.py``'s (``blobs/``, ``manifests/``, ``quarantine/`` under the prefix); a blob
found corrupt goes to ``quarantine/blobs/<alg>/<hex>`` as a corrupt manifest
goes to ``quarantine/manifests/``, so the mirror no longer finds it and fetches
it again from the upstream when asked for.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from pullthrough.cache.blobs import STALE_TMP_SECONDS
from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import InvalidDigest
from pullthrough.cache.gc import left_alone, references
from pullthrough.cache.manifests import StoredManifest
from pullthrough.cache.quarantine import Corrupt
from pullthrough.cache.s3 import STALE_UPLOAD_SECONDS, S3ManifestStore, blocking_client
from pullthrough.cache.s3_location import S3Location
from pullthrough.cache.scrub import VerifyReport

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
# Imports send blobs over this size in parts (S3 takes at most 5 GiB in one PUT).
UPLOAD_PART_BYTES = 64 << 20
_TAKEN = frozenset({"412", "PreconditionFailed", "ConditionalRequestConflict"})


def report(found: Corrupt) -> None:
    """The operator's WARNING for a corrupt object on S3."""
    where = f"moved to {found.moved_to}" if found.moved_to else "replaced meanwhile"
    log.warning(
        "corrupt %s %s in S3 (%s): %s; a miss from now on, fetched again from the "
        "upstream when asked for",
        found.kind,
        found.digest,
        found.detail,
        where,
    )


@dataclass(frozen=True, slots=True)
class S3Object:
    kind: str  # "blob" or "manifest"
    digest: Digest
    size: int  # a manifest's counts its media type line
    modified: float  # when it was written (S3 keeps no access time)
    key: str
    etag: str = ""  # changes when the object is written again


class S3Admin:
    """One store (``s3://bucket/prefix``) for blocking callers; close it when done."""

    def __init__(self, location: S3Location) -> None:
        self.location = location
        self._client = blocking_client(location)
        self.manifests = S3ManifestStore(location)

    def _keys(self, sub: str) -> Iterator[dict[str, Any]]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.location.bucket, Prefix=f"{self.location.prefix}{sub}"
        )
        for page in pages:
            yield from page.get("Contents", [])

    def objects(self, kind: str) -> Iterator[S3Object]:
        """Every committed blob (``kind="blob"``) or manifest, by listing."""
        start = f"{self.location.prefix}{kind}s/"
        for entry in self._keys(f"{kind}s/"):
            key = entry["Key"]
            algorithm, _, hex_ = key[len(start) :].partition("/")
            try:
                digest = Digest.parse(f"{algorithm}:{hex_}")
            except InvalidDigest:
                continue  # not ours
            modified = entry["LastModified"].timestamp()
            yield S3Object(kind, digest, entry["Size"], modified, key, entry.get("ETag", ""))

    def every(self) -> Iterator[S3Object]:
        yield from self.objects("manifest")
        yield from self.objects("blob")

    def usage(self) -> tuple[int, int, int]:
        """(bytes, blobs, manifests) committed: one listing of the prefix."""
        size = blobs = manifests = 0
        for obj in self.every():
            size += obj.size
            if obj.kind == "blob":
                blobs += 1
            else:
                manifests += 1
        return size, blobs, manifests

    def quarantined(self) -> tuple[int, int]:
        """(objects, bytes) set aside as corrupt."""
        count = size = 0
        for entry in self._keys("quarantine/"):
            count += 1
            size += entry["Size"]
        return count, size

    def read(self, digest: Digest, *, touch: bool = False) -> StoredManifest | None:
        """A manifest, verified (the ``ManifestStore.read`` the graph walks take)."""
        return self.manifests.read(digest, touch=touch)

    def check_blob(self, obj: S3Object, on_bytes: Callable[[int], None]) -> Corrupt | None:
        """Re-hash a blob from S3; quarantine it when its bytes are not its digest."""
        try:
            resp = self._client.get_object(Bucket=self.location.bucket, Key=obj.key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey"}:
                return None  # removed while we walked
            raise
        hasher = obj.digest.hasher()
        size = 0
        for chunk in resp["Body"].iter_chunks(READ_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
            on_bytes(len(chunk))
        actual = f"{obj.digest.algorithm}:{hasher.hexdigest()}"
        if actual == str(obj.digest):
            return None
        detail = f"{size} bytes hashing to {actual}"
        return Corrupt("blob", obj.digest, detail, self._set_aside(obj, resp["ETag"]))

    def _set_aside(self, obj: S3Object, etag: str) -> str | None:
        """Move the object read (``etag``) under quarantine/; None when it was
        replaced meanwhile (a node committed the right bytes again)."""
        bucket = self.location.bucket
        aside = f"{self.location.prefix}quarantine/{obj.kind}s/{obj.digest.algorithm}/"
        aside += obj.digest.hex
        try:
            self._client.copy_object(
                Bucket=bucket,
                Key=aside,
                CopySource={"Bucket": bucket, "Key": obj.key},
                CopySourceIfMatch=etag,
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"412", "PreconditionFailed"}:
                return None
            raise
        self._client.delete_object(Bucket=bucket, Key=obj.key)
        return f"s3://{bucket}/{aside}"

    def check_manifest(self, obj: S3Object) -> Corrupt | None:
        found = self.manifests.check(obj.digest, log=False)
        if not isinstance(found, Corrupt):
            return None
        aside = f"s3://{self.location.bucket}/{self.location.prefix}quarantine/manifests/"
        return dataclasses.replace(
            found, moved_to=f"{aside}{obj.digest.algorithm}/{obj.digest.hex}"
        )

    def blob(self, digest: Digest) -> S3Object | None:
        """The committed blob ``digest``, or None."""
        key = self.location.key("blobs", digest)
        try:
            head = self._client.head_object(Bucket=self.location.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey"}:
                return None
            raise
        modified = head["LastModified"].timestamp()
        return S3Object("blob", digest, head["ContentLength"], modified, key, head.get("ETag", ""))

    def small_blob(self, digest: Digest, limit: int) -> bytes | None:
        """A blob's bytes when it is at most ``limit`` long (an image config), else
        None; unverified, for display only."""
        obj = self.blob(digest)
        if obj is None or obj.size > limit:
            return None
        resp = self._client.get_object(Bucket=self.location.bucket, Key=obj.key)
        data: bytes = resp["Body"].read(limit + 1)
        return data if len(data) <= limit else None

    def download(self, obj: S3Object, target: Path) -> Corrupt | None:
        """Copy a blob to the local file ``target``, hashing it on the way; a blob
        whose bytes are not its digest is quarantined on S3 (and ``target`` removed)."""
        resp = self._client.get_object(Bucket=self.location.bucket, Key=obj.key)
        hasher = obj.digest.hasher()
        with target.open("wb") as f:
            for chunk in resp["Body"].iter_chunks(READ_CHUNK):
                hasher.update(chunk)
                f.write(chunk)
        actual = f"{obj.digest.algorithm}:{hasher.hexdigest()}"
        if actual == str(obj.digest):
            return None
        target.unlink()
        detail = f"content hashes to {actual}"
        return Corrupt("blob", obj.digest, detail, self._set_aside(obj, resp["ETag"]))

    def upload(self, digest: Digest, source: Path) -> bool:
        """Store the verified local file ``source`` as blob ``digest`` unless one
        is there; True when this call added it. Conditional like the mirror's
        commits (``If-None-Match: *``): a racing writer's bytes are the same."""
        key = self.location.key("blobs", digest)
        size = source.stat().st_size
        try:
            if size <= UPLOAD_PART_BYTES:
                self._client.put_object(
                    Bucket=self.location.bucket, Key=key, Body=source.read_bytes(), IfNoneMatch="*"
                )
            else:
                self._upload_parts(key, source)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _TAKEN:
                return False
            raise
        return True

    def _upload_parts(self, key: str, source: Path) -> None:
        bucket = self.location.bucket
        upload_id = self._client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            with source.open("rb") as f:
                while body := f.read(UPLOAD_PART_BYTES):
                    number = len(parts) + 1
                    done = self._client.upload_part(
                        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                    )
                    parts.append({"PartNumber": number, "ETag": done["ETag"]})
            self._client.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        except BaseException:
            self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise

    def remove(self, obj: S3Object) -> None:
        self._client.delete_object(Bucket=self.location.bucket, Key=obj.key)

    def dead_uploads(self, older_than: float = STALE_UPLOAD_SECONDS) -> list[dict[str, Any]]:
        """Multipart uploads started over ``older_than`` seconds ago: their
        downloads died (a live one completes or aborts within minutes)."""
        cutoff = time.time() - older_than
        pages = self._client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.location.bucket, Prefix=f"{self.location.prefix}blobs/"
        )
        return [
            upload
            for page in pages
            for upload in page.get("Uploads", [])
            if upload["Initiated"].timestamp() <= cutoff
        ]

    def abort(self, upload: dict[str, Any]) -> None:
        self._client.abort_multipart_upload(
            Bucket=self.location.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
        )

    def close(self) -> None:
        self.manifests.close()
        self._client.close()


# -- cache verify -----------------------------------------------------------------------


def total_bytes(stores: Sequence[S3Admin]) -> int:
    return sum(obj.size for store in stores for obj in store.every())


def verify_all(
    stores: Sequence[S3Admin],
    *,
    progress: Callable[[int], None] = lambda n: None,
    found: Callable[[Corrupt], None] = lambda c: None,
) -> VerifyReport:
    """Re-hash every manifest and blob on S3 now, quarantining what fails."""
    started = time.monotonic()
    result = VerifyReport()
    for store in stores:
        for obj in store.every():
            if obj.kind == "blob":
                corrupt = store.check_blob(obj, progress)
                result.blobs += 1
            else:
                corrupt = store.check_manifest(obj)
                progress(obj.size)
                result.manifests += 1
            result.bytes += obj.size
            if corrupt is not None:
                result.corrupt.append(corrupt)
                found(corrupt)
    result.seconds = time.monotonic() - started
    return result


# -- gc ---------------------------------------------------------------------------------


@dataclass
class S3Garbage:
    unreferenced: list[str] = field(default_factory=list)  # keys
    unreferenced_bytes: int = 0
    uploads: int = 0  # multipart uploads of dead downloads
    skipped: list[str] = field(default_factory=list)


def collect(
    stores: Sequence[S3Admin],
    *,
    protected: Collection[Digest],
    delete: bool,
    grace: float = STALE_TMP_SECONDS,
    upload_age: float = STALE_UPLOAD_SECONDS,
) -> S3Garbage:
    """Blobs no manifest in their store names, and multipart uploads older than
    ``upload_age``; only counts unless ``delete``. Like the filesystem's gc
    (gc.py): never a ``protected`` digest, no blob written in the last ``grace``
    seconds (a pull whose manifest is on its way), and a store with a manifest
    gc cannot read keeps all its blobs."""
    result = S3Garbage()
    for store in stores:
        manifests = (store.read(obj.digest) for obj in store.objects("manifest"))
        referenced, unreadable = references(manifests)
        if unreadable:
            result.skipped.append(left_alone(str(store.location), unreadable))
        else:
            cutoff = time.time() - grace
            for obj in store.objects("blob"):
                if obj.digest in referenced or obj.digest in protected:
                    continue
                if obj.modified >= cutoff:
                    continue
                result.unreferenced.append(obj.key)
                result.unreferenced_bytes += obj.size
                if delete:
                    store.remove(obj)
        dead = store.dead_uploads(upload_age)
        result.uploads += len(dead)
        if delete:
            for upload in dead:
                store.abort(upload)
    return result

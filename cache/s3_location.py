"""Where an S3 store lives (``s3://bucket/prefix``): parsed and checked without the
S3 client, so settings validate whether or not the ``s3`` extra is installed."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pullthrough.cache.digests import Digest

# S3's bucket naming rules; prefixes in AWS's "safe characters" for object keys.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX = re.compile(r"[A-Za-z0-9/!_.*'()-]*")


@dataclass(frozen=True)
class S3Location:
    """Where a store lives: ``s3://bucket/prefix`` and how to reach it.

    Credentials left None come from the standard AWS chain."""

    bucket: str
    prefix: str = ""  # "" or ending in "/"
    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str, **options: Any) -> S3Location:
        """``s3://bucket[/prefix]``; ValueError with a one-line reason otherwise."""
        rest = url.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        if rest == url or not _BUCKET.fullmatch(bucket):
            raise ValueError(
                f"storage must be s3://bucket/prefix (bucket: 3-63 of a-z 0-9 . -), not {url!r}"
            )
        prefix = prefix.strip("/")
        if not _PREFIX.fullmatch(prefix) or ".." in prefix.split("/"):
            raise ValueError(f"storage {url!r}: the prefix takes A-Z a-z 0-9 / ! - _ . * ' ( )")
        return cls(bucket, f"{prefix}/" if prefix else "", **options)

    def under(self, sub: str) -> S3Location:
        """The same place with ``sub/`` added to the prefix ("" : itself)."""
        if not sub:
            return self
        return S3Location(
            self.bucket,
            f"{self.prefix}{sub.strip('/')}/",
            self.endpoint_url,
            self.region,
            self.access_key,
            self.secret_key,
        )

    def key(self, kind: str, digest: Digest) -> str:
        return f"{self.prefix}{kind}/{digest.algorithm}/{digest.hex}"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def store_location(location: S3Location, root: Path, store: Path) -> S3Location:
    """Where on S3 the store that would be the folder ``store`` of cache root
    ``root`` lives: an upstream with credentials keeps its sub-prefix
    (``upstreams/<name>/``), as on disk."""
    return location.under(store.relative_to(root).as_posix().strip("."))

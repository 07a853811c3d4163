"""Errors raised by the cache; they carry data, the HTTP side decides the status."""

from __future__ import annotations


class CacheError(Exception):
    """Base class of everything the cache raises."""


class InvalidDigest(CacheError):
    def __init__(self, value: str, reason: str) -> None:
        super().__init__(f"invalid digest {value!r}: {reason}")
        self.value = value
        self.reason = reason


class UnsupportedDigest(InvalidDigest):
    """A well-formed digest whose algorithm we cannot verify."""


class DigestMismatch(CacheError):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"content digest {actual} does not match {expected}")
        self.expected = expected
        self.actual = actual


class SizeMismatch(CacheError):
    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"content is {actual} bytes, expected {expected}")
        self.expected = expected
        self.actual = actual


class DownloadFailed(CacheError):
    """The download a reader was following was abandoned before it was committed."""


class Abandoned(DownloadFailed):
    """The writer in another process went away without committing: its disk was
    full (it goes on in pass-through for its own readers only), the bytes were
    wrong, or it crashed. A reader may go on with a download of its own."""


class StorageUnavailable(CacheError):
    """The storage backend (object storage) is unreachable or refused a request."""

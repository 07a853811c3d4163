"""Digest parsing and hashing (OCI image-spec "Digests")."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pullthrough.cache.errors import InvalidDigest, UnsupportedDigest

if TYPE_CHECKING:
    from hashlib import _Hash

# digest ::= algorithm ":" encoded, algorithm ::= component (separator component)*
_GRAMMAR = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_LOWER_HEX = re.compile(r"^[a-f0-9]+$")


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, value: str) -> Digest:
        """Validate ``value``; only what we can verify (sha256, sha512) is accepted.

        Since the hex part is checked against ``[a-f0-9]{64|128}``, a parsed
        digest is always safe to use as a file name.
        """
        if len(value) > 256 or not _GRAMMAR.match(value):
            raise InvalidDigest(value, "not of the form algorithm:hex")
        algorithm, _, encoded = value.partition(":")
        length = _HEX_LENGTHS.get(algorithm)
        if length is None:
            raise UnsupportedDigest(value, f"algorithm {algorithm!r} is not supported")
        if len(encoded) != length or not _LOWER_HEX.match(encoded):
            raise InvalidDigest(value, f"{algorithm} needs {length} lowercase hex digits")
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> _Hash:
        return hashlib.new(self.algorithm)

"""Repository names, tags and references, checked against the distribution-spec grammar."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cache.digests import Digest
from proxy.errors import NameInvalid, TagInvalid

# distribution-spec "Pulling manifests": <name> and <reference> grammar.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
MAX_NAME_LENGTH = 255


def repository(raw: str, *, docker_hub_rules: bool) -> str:
    """Validate a repository name; one-part Docker Hub names live under ``library/``."""
    if len(raw) > MAX_NAME_LENGTH or not _NAME.match(raw):
        raise NameInvalid(raw)
    if docker_hub_rules and "/" not in raw:
        return f"library/{raw}"
    return raw


@dataclass(frozen=True, slots=True)
class Reference:
    """A manifest reference: exactly one of ``tag`` and ``digest``."""

    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, raw: str) -> Reference:
        if ":" in raw:
            return cls(digest=Digest.parse(raw))
        if not _TAG.match(raw):
            raise TagInvalid(raw)
        return cls(tag=raw)

    def __str__(self) -> str:
        return str(self.digest) if self.digest is not None else str(self.tag)

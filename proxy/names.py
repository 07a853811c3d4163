"""Repository names, tags and references, checked against the distribution-spec grammar."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pullthrough.cache.digests import Digest
from pullthrough.proxy.config import DOCKER_HUB_ALIASES, DOCKER_HUB_NAME
from pullthrough.proxy.errors import NameInvalid, TagInvalid

# distribution-spec "Pulling manifests": <name> and <reference> grammar.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
MAX_NAME_LENGTH = 255


def is_registry_host(component: str) -> bool:
    """Docker's rule for a reference's first component: with a dot or a colon, or
    ``localhost``, it names a registry (``ghcr.io``); otherwise it is a path."""
    return "." in component or ":" in component or component == "localhost"


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


@dataclass(frozen=True, slots=True)
class ImageRef:
    """An image as people write it: ``alpine:3.19``, ``ghcr.io/owner/app@sha256:...``."""

    upstream: str  # the registry's name: "docker.io", "ghcr.io"
    repository: str  # as the registry knows it ("library/alpine")
    reference: Reference

    def __str__(self) -> str:
        sep = "@" if self.reference.digest is not None else ":"
        return f"{self.upstream}/{self.repository}{sep}{self.reference}"

    @classmethod
    def parse(cls, raw: str) -> ImageRef:
        """Docker's reference rules: a first component with a dot or colon (or
        ``localhost``) is a registry; without one, Docker Hub and ``library/``."""
        name, at, digest = raw.strip().partition("@")
        tag = None
        head, slash, last = name.rpartition("/")
        if ":" in last:
            last, tag = last.split(":", 1)
            name = f"{head}{slash}{last}"
        first, slash, rest = name.partition("/")
        if slash and is_registry_host(first):
            upstream, path = first.lower(), rest
        else:
            upstream, path = DOCKER_HUB_NAME, name
        if upstream in DOCKER_HUB_ALIASES:
            upstream = DOCKER_HUB_NAME
        repo = repository(path, docker_hub_rules=upstream == DOCKER_HUB_NAME)
        if at:
            ref = Reference.parse(digest)
            if ref.digest is None:
                raise NameInvalid(f"{raw}: what follows @ must be a digest")
        else:
            ref = Reference.parse(tag or "latest")
        return cls(upstream, repo, ref)

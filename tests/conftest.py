"""Shared fixtures: a token server, a real seeded upstream registry, skopeo.

``upstream`` is session-scoped and shared by every test: do not move its
seeded tags or stop it; push to a fresh repository name (``make_image``) or
use ``make_registry`` for a private instance you may break.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.support.binaries import require_binary
from tests.support.images import Image, push_images, seed_images
from tests.support.mirror import MirrorProcess
from tests.support.redis import RedisServer
from tests.support.registry import Registry, RegistryFactory
from tests.support.seaweed import SeaweedS3
from tests.support.skopeo import Skopeo
from tests.support.tokenserver import TokenServer


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    """A running Docker-Hub-like token server (its own thread and event loop)."""
    server = TokenServer(workdir=tmp_path_factory.mktemp("tokens"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def registry_binary() -> str:
    """Path of distribution's ``docker-registry`` (skip or fail when missing)."""
    return require_binary("docker-registry")


@pytest.fixture(scope="session")
def skopeo() -> str:
    """Path of ``skopeo`` (skip or fail when missing)."""
    return require_binary("skopeo")


@pytest.fixture
def skopeo_cli(skopeo: str, tmp_path: Path) -> Skopeo:
    """``skopeo`` isolated from the machine's config (policy, registries, auth)."""
    return Skopeo(skopeo, tmp_path / "skopeo")


@pytest.fixture(scope="session")
def upstream(
    registry_binary: str,
    token_server: TokenServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Registry]:
    """A token-auth distribution registry seeded with :func:`seed_images`.

    ``upstream.images`` maps ``"name:tag"`` to the pushed :class:`Image`,
    ``upstream.tokens`` is the :class:`TokenServer`.
    """
    registry = Registry(
        tmp_path_factory.mktemp("upstream"), tokens=token_server, binary=registry_binary
    )
    try:
        registry.start()
        images = seed_images()
        push_images(registry.url, images.values())
        registry.images = images
        yield registry
    finally:
        registry.stop()


@pytest.fixture
def make_registry(
    registry_binary: str, token_server: TokenServer, tmp_path: Path
) -> Iterator[RegistryFactory]:
    """Start extra registries for one test (all stopped at teardown).

    ``make_registry(seed=[image, ...])`` gives a token-auth registry holding
    those images; ``make_registry(proxy_remote_url=upstream.url)`` a
    distribution pull-through cache of another registry.
    """
    created: list[Registry] = []

    def factory(
        *,
        seed: Sequence[Image] = (),
        proxy_remote_url: str | None = None,
        start: bool = True,
    ) -> Registry:
        registry = Registry(
            tmp_path / f"registry-{len(created)}",
            tokens=None if proxy_remote_url else token_server,
            proxy_remote_url=proxy_remote_url,
            binary=registry_binary,
        )
        created.append(registry)
        if start:
            registry.start()
            if seed:
                push_images(registry.url, seed)
                registry.images.update({img.ref: img for img in seed})
        return registry

    try:
        yield factory
    finally:
        for registry in created:
            registry.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3 server (SeaweedFS ``weed mini``, one bucket) shared by the session.

    ``seaweed.endpoint`` is a relay that records every request
    (``seaweed.relayed()``); ``direct_endpoint`` skips it. Keep each user's
    objects under a prefix of its own (``S3Registry`` does).
    """
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real Redis (Debian's redis-server) shared by the session: keep each
    test's keys under ``redis_server.prefix()``."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def stop_later() -> Iterator[list[MirrorProcess]]:
    """Mirror processes a test started: stopped when it ends, whatever happened."""
    mirrors: list[MirrorProcess] = []
    yield mirrors
    for mirror in mirrors:
        mirror.stop()

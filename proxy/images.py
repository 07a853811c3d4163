"""Image names in the cache: which stores and manifests an image reference names,
what pinned images protect, and where an archive's images go.

The server and the command line see the cache through one ``CachedImages``; the
command line opens it with ``open_images`` (no network, beside a running server
or without one).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from pullthrough.cache import stores
from pullthrough.cache.archive import ExportImage
from pullthrough.cache.digests import Digest
from pullthrough.cache.errors import InvalidDigest
from pullthrough.cache.graph import closure
from pullthrough.cache.index import TagEntry, TagIndex
from pullthrough.cache.layout import Layout
from pullthrough.cache.listing import ImageRow, Stat, list_images
from pullthrough.cache.manifests import ManifestStore, StoredManifest
from pullthrough.cache.mediatypes import DOCKER_LIST, OCI_INDEX
from pullthrough.cache.redis_tags import RedisTags
from pullthrough.cache.s3_location import store_location
from pullthrough.cache.space import WriteFailures
from pullthrough.cache.storage import ManifestStorage, TagStorage
from pullthrough.cache.stores import KnownUpstream
from pullthrough.proxy.config import Settings
from pullthrough.proxy.errors import RegistryError
from pullthrough.proxy.mirror import ANY_CLIENT
from pullthrough.proxy.names import ImageRef

if TYPE_CHECKING:
    from pullthrough.cache.s3_admin import S3Admin

log = logging.getLogger(__name__)

INDEXES = (OCI_INDEX, DOCKER_LIST)

# The tag index: in the cache folder, or on Redis shared by several nodes. Both
# have the command line's blocking ``get_sync``/``put_sync`` beside TagStorage.
Tags = TagIndex | RedisTags


def open_tags(settings: Settings, failures: WriteFailures | None = None) -> Tags:
    """The tag index these settings name (Redis with ``redis_url``); blocking."""
    if settings.redis_url is not None:
        return RedisTags(settings.redis_url, failures=failures)
    return TagIndex(stores.index_dir(settings.cache_dir.resolve()), failures)


class NoCache(Exception):
    """A command that only reads the cache was pointed where there is none."""


class TransferError(Exception):
    """Images that cannot be exported or imported as asked; the text says what to do."""


@dataclass
class CachedImages:
    root: Path  # the cache root, which is also the shared store's
    layouts: dict[str, Layout]  # each upstream's store, by upstream name
    tags: Tags
    pinned: Sequence[str] = ()  # pins from the settings, beside those stored in the cache
    # Stores no configured upstream uses (found on disk by the command line):
    # counted, collected and evicted, never read for an upstream's name.
    more_layouts: list[Layout] = field(default_factory=list)
    # With storage = s3://...: each store's objects on S3, by the root of the
    # folder it stands for (the local folders then hold no content).
    s3: dict[Path, S3Admin] | None = None

    def rows(self) -> list[ImageRow]:
        """Every cached image, for ``cache ls`` and the status page (blocking)."""
        if self.s3 is None:
            return list_images(self.tags, self.layouts, self.shared, self.pins())
        return list_images(
            self.tags,
            self.layouts,
            self.shared,
            self.pins(),
            manifests=self.manifest_store,
            stat=self._s3_stat(),
            small_blob=lambda layout, digest, limit: self._s3_of(layout).small_blob(digest, limit),
        )

    def _s3_of(self, layout: Layout) -> S3Admin:
        assert self.s3 is not None
        return self.s3[layout.root]

    def _s3_stat(self) -> Stat:
        """Sizes and write times from one listing of each S3 store (not a HEAD per
        object); S3 keeps no access time, so "last used" is when it was written."""
        listed: dict[Path, dict[tuple[str, Digest], tuple[int, float]]] = {}

        def stat(layout: Layout, kind: str, digest: Digest) -> tuple[int, float] | None:
            if layout.root not in listed:
                listed[layout.root] = {
                    (o.kind, o.digest): (o.size, o.modified) for o in self._s3_of(layout).every()
                }
            return listed[layout.root].get((kind, digest))

        return stat

    def manifest_store(self, layout: Layout) -> ManifestStorage:
        if self.s3 is not None:
            return self.s3[layout.root].manifests
        return ManifestStore(layout)

    @property
    def shared(self) -> Layout:
        return Layout(self.root)

    def distinct_layouts(self) -> list[Layout]:
        every = [*self.layouts.values(), *self.more_layouts]
        return list({layout.root: layout for layout in every}.values())

    def pins(self) -> set[str]:
        return set(self.pinned) | self.tags.pins()

    def unattributed(self) -> set[str]:
        """Upstream keys in the tag index that name no upstream this cache knows:
        a URL from before tags were keyed by name, or a server's upstream that was
        never recorded here."""
        return {name for name, *_ in self.tags.tags() if name not in self.layouts}

    def resolve(self, image: ImageRef) -> list[tuple[StoredManifest, Layout]]:
        """The cached top manifests an image reference names (one per Accept set
        seen), with the store each is in: the upstream's own, else the shared
        one (content an anonymous pull of the same name put there)."""
        own = self.layouts.get(image.upstream)
        if own is None:
            return []
        return self._read(self._tagged(image), [own, self.shared])

    def _tagged(self, image: ImageRef) -> set[str]:
        """Digests recorded for the image's tag by its upstream."""
        if image.reference.digest is not None:
            return {str(image.reference.digest)}
        return {
            entry.digest
            for upstream, repository, tag, _, entry in self.tags.tags()
            if (upstream, repository, tag)
            == (image.upstream, image.repository, image.reference.tag)
        }

    def _read(
        self, digests: set[str], layouts: Sequence[Layout]
    ) -> list[tuple[StoredManifest, Layout]]:
        found = []
        for raw in sorted(digests):
            with contextlib.suppress(InvalidDigest):
                digest = Digest.parse(raw)
                for layout in dict.fromkeys(layouts):
                    manifest = self.manifest_store(layout).read(digest, touch=False)
                    if manifest is not None:
                        found.append((manifest, layout))
                        break
        return found

    def protected(self) -> set[Digest]:
        """Every manifest and blob a pinned image needs.

        Generous on purpose: a pin protects its repository and tag as recorded
        under any upstream (also one this process does not know, or an old
        URL key), in every store, so no attribution gap can cost a pin.
        """
        images = []
        for pin in self.pins():
            try:
                images.append(ImageRef.parse(pin))
            except (RegistryError, InvalidDigest):
                log.warning("ignoring pin %r: not an image reference", pin)
        tagged: dict[tuple[str, str], set[str]] = {}
        if any(image.reference.tag is not None for image in images):
            for _, repository, tag, _, entry in self.tags.tags():  # one pass for all pins
                tagged.setdefault((repository, tag), set()).add(entry.digest)
        keep: set[Digest] = set()
        everywhere = self.distinct_layouts()
        for image in images:
            if image.reference.digest is not None:
                digests = {str(image.reference.digest)}
            else:
                digests = tagged.get((image.repository, str(image.reference.tag)), set())
            for top, layout in self._read(digests, everywhere):
                walked = closure(top, partial(self.manifest_store(layout).read, touch=False))
                keep.update(m.digest for m in walked.manifests)
                keep.update(walked.blobs)
                keep.update(walked.missing_manifests)
        return keep


def set_pins(tags: TagStorage, images: Iterable[str], *, remove: bool = False) -> set[str]:
    """Add (or remove) pins, stored with the cache; returns the pins now set."""
    pins = tags.pins()
    for raw in images:
        name = str(ImageRef.parse(raw))
        if remove:
            pins.discard(name)
            pins.discard(raw)
        else:
            pins.add(name)
    tags.set_pins(pins)
    return pins


def known_upstreams(settings: Settings) -> dict[str, KnownUpstream]:
    """The upstreams this cache has seen: those a server recorded in it, with
    these settings' own on top."""
    known = stores.read_record(settings.cache_dir.resolve())
    for up in settings.all_upstreams():
        known[up.name] = KnownUpstream(up.name, str(up.url), up.has_credentials)
    return known


def rekey_tags(tags: TagStorage, known: dict[str, KnownUpstream]) -> int:
    """Tags recorded under an upstream's URL (before they were keyed by name) go
    under its name; a URL two names share cannot be attributed and stays."""
    by_url: dict[str, set[str]] = {}
    for up in known.values():
        by_url.setdefault(up.url, set()).add(up.name)
    return tags.rekey({url: names.pop() for url, names in by_url.items() if len(names) == 1})


def has_cache(root: Path) -> bool:
    return (root / "index").is_dir() or (root / "blobs").is_dir()


@contextlib.contextmanager
def open_images(settings: Settings, *, create: bool = True) -> Iterator[CachedImages]:
    """The cache, for commands that need no network.

    It sees every upstream a server recorded in the cache as well as those in
    ``settings``, so it finds what the server pulled without its flags; an
    upstream with credentials in either has its own store. ``create=False``
    (commands that only read) raises NoCache rather than making one.
    """
    root = settings.cache_dir.resolve()
    location = settings.s3_location()
    if not create and location is None and not has_cache(root):
        raise NoCache(f"no cache at {root}")
    known = stores.read_record(root)
    creds = {name: k.has_credentials for name, k in known.items()}
    for up in settings.all_upstreams():
        creds[up.name] = creds.get(up.name, False) or up.has_credentials
    by_upstream = stores.layouts(root, creds.items())
    if create:
        for layout in by_upstream.values():
            layout.create()
    tags = open_tags(settings)
    s3: dict[Path, S3Admin] | None = None
    try:
        rekey_tags(tags, known_upstreams(settings))
        if location is not None:
            from pullthrough.cache.s3_admin import S3Admin  # the s3 extra

            s3 = {}
            for layout in [Layout(root), *by_upstream.values()]:
                if layout.root not in s3:
                    s3[layout.root] = S3Admin(store_location(location, root, layout.root))
        yield CachedImages(
            root,
            by_upstream,
            tags,
            settings.pinned,
            # On S3 the stores are those the settings and the record name.
            more_layouts=stores.private_stores(root) if location is None else [],
            s3=s3,
        )
    finally:
        tags.close()
        for admin in (s3 or {}).values():
            admin.close()


# -- archives -------------------------------------------------------------------------


def plan_export(
    images: CachedImages, refs: Sequence[str], platforms: frozenset[str] | None
) -> tuple[list[ExportImage], Layout]:
    """What to write for these image references, and the one store it comes from."""
    items, layout = [], None
    for raw in refs:
        image = ImageRef.parse(raw)
        tops = images.resolve(image)
        if not tops:
            raise TransferError(_not_cached(images, image, raw))
        # Of the answers cached for different clients, the index is the whole image.
        top, where = next(((t, w) for t, w in tops if t.media_type in INDEXES), tops[0])
        if layout is not None and where != layout:
            raise TransferError("export images of upstreams with credentials separately")
        layout = where
        items.append(ExportImage(str(image), top, platforms))
    assert layout is not None  # refs is never empty
    return items, layout


def _not_cached(images: CachedImages, image: ImageRef, raw: str) -> str:
    if image.upstream not in images.layouts:
        return (
            f"{image} is not cached: no server on this cache was configured with "
            f"{image.upstream} (known: {', '.join(sorted(images.layouts))})"
        )
    return f"{image} is not cached; `pullthrough warm {raw}` first"


def import_store(images: CachedImages, ref_names: list[str | None]) -> Layout:
    """The store an archive goes into: that of the upstream its images name (an
    upstream with credentials has its own); the shared one for images that name
    no known upstream. One store per import, as one archive is one transaction."""
    chosen: dict[Layout, list[str]] = {}
    for ref_name in ref_names:
        with contextlib.suppress(RegistryError, InvalidDigest):
            upstream = ImageRef.parse(ref_name or "").upstream
            if ref_name and upstream in images.layouts:
                chosen.setdefault(images.layouts[upstream], []).append(ref_name)
    if len(chosen) > 1:
        parts = "; ".join(f"{', '.join(names)} -> {lay.root}" for lay, names in chosen.items())
        raise TransferError(
            f"the archive holds images of upstreams with separate stores ({parts}): "
            "export and import them separately"
        )
    if chosen:
        return next(iter(chosen))
    return images.shared


def tag_import(images: CachedImages, ref_name: str | None, digest: Digest, media_type: str) -> str:
    """Record an imported image's tag, when its ref name has one; say what happened."""
    last = (ref_name or "").rsplit("/", 1)[-1]
    if not ref_name or ":" not in last or "@" in ref_name:
        return f"(no tag in ref name {ref_name!r}: pull it by digest)"
    try:
        image = ImageRef.parse(ref_name)
    except RegistryError:
        return f"(ref name {ref_name!r} is not an image reference: pull it by digest)"
    if image.upstream not in images.layouts or image.reference.tag is None:
        return f"(registry {image.upstream} is not configured: pull it by digest)"
    entry = TagEntry(str(digest), media_type, time.time())
    images.tags.put_sync(image.upstream, image.repository, image.reference.tag, ANY_CLIENT, entry)
    return str(image)

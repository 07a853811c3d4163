"""The cache's record of its upstreams, tags keyed by upstream name, and pins that
hold whatever key their tag was recorded under."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from yarl import URL

from pullthrough.cache import stores
from pullthrough.cache.digests import Digest
from pullthrough.cache.index import TagEntry, TagIndex
from pullthrough.cache.layout import Layout
from pullthrough.cache.manifests import ManifestStore, StoredManifest
from pullthrough.cache.stores import KnownUpstream
from pullthrough.metrics import Metrics
from pullthrough.proxy.config import ConfigError, Settings, parse_upstreams
from pullthrough.proxy.images import TransferError, import_store, open_images, rekey_tags
from pullthrough.proxy.resources import open_mirrors

OLD_URL = "http://127.0.0.1:5999"


def test_the_record_keeps_every_upstream_and_survives_damage(tmp_path: Path) -> None:
    stores.record_upstreams(tmp_path, [KnownUpstream("docker.io", OLD_URL, False)])
    stores.record_upstreams(
        tmp_path, [KnownUpstream("registry.local:5000", "http://10.0.0.5:5000", True)]
    )
    known = stores.read_record(tmp_path)
    assert known == {
        "docker.io": KnownUpstream("docker.io", OLD_URL, False),
        "registry.local:5000": KnownUpstream("registry.local:5000", "http://10.0.0.5:5000", True),
    }
    doc = json.loads((tmp_path / stores.RECORD).read_text())
    assert doc["upstreams"]["registry.local:5000"]["store"] == "upstreams/registry.local_5000"
    # A name that would build a path outside the cache is never believed.
    doc["upstreams"]["../../etc"] = {"url": "http://x", "has_credentials": True}
    (tmp_path / stores.RECORD).write_text(json.dumps(doc))
    assert "../../etc" not in stores.read_record(tmp_path)
    (tmp_path / stores.RECORD).write_text("{not json")
    assert stores.read_record(tmp_path) == {}


def entry(digest: str = "sha256:" + "1" * 64, at: float = 1.0) -> TagEntry:
    return TagEntry(digest, "application/vnd.oci.image.manifest.v1+json", at)


def test_tags_under_a_url_move_to_the_upstreams_name(tmp_path: Path) -> None:
    tags = TagIndex(tmp_path / "index")
    try:
        tags.put_sync(OLD_URL, "library/alpine", "3.19", "*", entry())
        tags.put_sync(OLD_URL, "library/hello", "latest", "*", entry(at=1.0))
        tags.put_sync("docker.io", "library/hello", "latest", "*", entry(at=2.0))  # newer
        tags.put_sync("http://shared:5000", "team/app", "1", "*", entry())
        known = {
            "docker.io": KnownUpstream("docker.io", OLD_URL, False),
            # Two names, one URL: which one pulled it cannot be told.
            "a.example": KnownUpstream("a.example", "http://shared:5000", False),
            "b.example": KnownUpstream("b.example", "http://shared:5000", False),
        }
        assert rekey_tags(tags, known) == 2
        assert tags.get_sync("docker.io", "library/alpine", "3.19", "*") == entry()
        assert tags.get_sync("docker.io", "library/hello", "latest", "*") == entry(at=2.0)
        assert tags.get_sync(OLD_URL, "library/alpine", "3.19", "*") is None
        assert tags.get_sync("http://shared:5000", "team/app", "1", "*") == entry()
        assert rekey_tags(tags, known) == 0
    finally:
        tags.close()


def test_a_pin_protects_its_image_under_a_key_nobody_knows(tmp_path: Path) -> None:
    layer = Digest("sha256", "2" * 64)
    data = json.dumps(
        {
            "schemaVersion": 2,
            "config": {"digest": f"sha256:{'3' * 64}", "size": 2},
            "layers": [{"digest": str(layer), "size": 5}],
        }
    ).encode()
    manifest = StoredManifest(Digest.of(data), "application/vnd.oci.image.manifest.v1+json", data)
    Layout(tmp_path).create()
    ManifestStore(Layout(tmp_path)).write(manifest)
    tags = TagIndex(tmp_path / "index")
    tags.put_sync("http://gone:5000", "team/app", "1", "*", entry(str(manifest.digest)))
    tags.set_pins({"docker.io/team/app:1"})
    tags.close()
    settings = Settings(cache_dir=tmp_path)
    with open_images(settings, create=False) as keeper:
        assert keeper.unattributed() == {"http://gone:5000"}
        assert {manifest.digest, layer} <= keeper.protected()


def test_tools_see_the_store_a_server_recorded(tmp_path: Path) -> None:
    stores.record_upstreams(tmp_path, [KnownUpstream("docker.io", OLD_URL, True)])
    Layout(tmp_path).create()
    with open_images(Settings(cache_dir=tmp_path), create=False) as keeper:
        assert keeper.layouts["docker.io"].root == tmp_path.resolve() / "upstreams" / "docker.io"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "127.0.0.1", "localhost", "mirror.example."])
def test_hosts_that_can_work(host: str) -> None:
    assert Settings(host=host).host == host


@pytest.mark.parametrize("host", ["999.1.1.1", "1.2.3", "", "my host", "-x.example", "a..b"])
def test_hosts_that_cannot(host: str) -> None:
    with pytest.raises(ConfigError, match="host"):
        Settings(host=host)


def test_record_is_written_atomically_beside_the_index(tmp_path: Path) -> None:
    stores.record_upstreams(tmp_path, [KnownUpstream("docker.io", OLD_URL, False)])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "tmp",
        stores.RECORD,
        f"{stores.RECORD}.lock",
    ]
    assert (
        time.time()
        - json.loads((tmp_path / stores.RECORD).read_text())["upstreams"]["docker.io"][
            "recorded_at"
        ]
        < 60
    )


async def test_opening_an_old_cache_moves_its_url_keys_to_names(tmp_path: Path) -> None:
    tags = TagIndex(tmp_path / "index")
    tags.put_sync(OLD_URL, "library/alpine", "3.19", "*", entry())
    tags.set_pins({"docker.io/library/alpine:3.19"})
    tags.close()
    settings = Settings(cache_dir=tmp_path, upstream=URL(OLD_URL), offline=True)
    async with open_mirrors(settings, Metrics()) as resources:
        assert resources.images.tags.get_sync("docker.io", "library/alpine", "3.19", "*") == entry()
        assert resources.images.tags.get_sync(OLD_URL, "library/alpine", "3.19", "*") is None
        assert resources.images.tags.pins() == {"docker.io/library/alpine:3.19"}


def test_import_goes_to_the_store_of_the_upstream_the_images_name(tmp_path: Path) -> None:
    settings = Settings(
        cache_dir=tmp_path,
        upstream_username="bot",
        upstream_password="s3cret",
        upstreams=parse_upstreams("ghcr.io"),
    )
    root = tmp_path.resolve()
    with open_images(settings) as keeper:
        private = root / "upstreams" / "docker.io"
        assert import_store(keeper, ["docker.io/library/alpine:3.19"]).root == private
        assert import_store(keeper, ["alpine:3.19", None]).root == private
        assert import_store(keeper, ["ghcr.io/owner/app:1"]).root == root
        assert import_store(keeper, [None, "quay.io/x/y:1", "not a name"]).root == root
        with pytest.raises(TransferError, match="separate stores"):
            import_store(keeper, ["alpine:3.19", "ghcr.io/owner/app:1"])

"""Driving ``skopeo`` in isolation from the machine's container configuration.

Every run gets its own HOME, an accept-anything ``policy.json``, an empty
``registries.conf`` and an empty auth file, so nothing configured on the host
(mirrors, credentials, signature policy) can change what a test sees.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class SkopeoError(RuntimeError):
    def __init__(self, result: subprocess.CompletedProcess[bytes]) -> None:
        super().__init__(
            f"skopeo exited with {result.returncode}: {' '.join(result.args)}\n"
            f"stdout:\n{result.stdout.decode(errors='replace')}\n"
            f"stderr:\n{result.stderr.decode(errors='replace')}"
        )
        self.result = result


class Skopeo:
    """``skopeo`` with an isolated configuration under ``workdir``.

    ``platform`` (``"os/arch"``) pins which instance of an index a non-``--all``
    copy picks, independent of the machine running the tests.
    """

    def __init__(self, binary: str, workdir: Path, *, platform: str = "linux/amd64") -> None:
        self.binary = binary
        self.workdir = workdir
        self.platform = platform
        self.home = workdir / "home"
        self.tmpdir = workdir / "tmp"
        for d in (self.home, self.tmpdir):
            d.mkdir(parents=True, exist_ok=True)
        self.policy_path = workdir / "policy.json"
        self.policy_path.write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]}) + "\n"
        )
        self.registries_conf = workdir / "registries.conf"
        self.registries_conf.write_text("unqualified-search-registries = []\n")
        self.authfile = workdir / "auth.json"
        self.authfile.write_text('{"auths": {}}\n')

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "TMPDIR": str(self.tmpdir),
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "REGISTRY_AUTH_FILE": str(self.authfile),
        }

    def run(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[bytes]:
        os_, _, arch = self.platform.partition("/")
        cmd = [
            self.binary,
            "--policy",
            str(self.policy_path),
            "--tmpdir",
            str(self.tmpdir),
            "--override-os",
            os_,
            "--override-arch",
            arch,
            *args,
        ]
        result = subprocess.run(
            cmd,
            capture_output=True,
            env=self.env(),
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise SkopeoError(result)
        return result

    @staticmethod
    def _creds(prefix: str, creds: tuple[str, str] | None) -> list[str]:
        """``--PREFIX-no-creds`` or ``--PREFIX-creds USER:PASS`` (no prefix: ``--creds``)."""
        flag = f"--{prefix}-" if prefix else "--"
        if creds is None:
            return [f"{flag}no-creds"]
        return [f"{flag}creds", f"{creds[0]}:{creds[1]}"]

    def copy(
        self,
        src: str,
        dest: str,
        *,
        all_images: bool = False,
        src_creds: tuple[str, str] | None = None,
        extra: Sequence[str] = (),
        check: bool = True,
    ) -> subprocess.CompletedProcess[bytes]:
        """``skopeo copy`` from a plain-HTTP ``docker://`` source (anonymous by default)."""
        args = ["copy", "--src-tls-verify=false", *self._creds("src", src_creds)]
        if dest.startswith("docker://"):
            args += ["--dest-tls-verify=false", "--dest-authfile", str(self.authfile)]
        if all_images:
            args.append("--all")
        return self.run(*args, *extra, src, dest, check=check)

    def inspect_raw(self, ref: str, *, creds: tuple[str, str] | None = None) -> bytes:
        """The manifest bytes of ``ref`` (``docker://...``), unmodified."""
        result = self.run("inspect", "--raw", "--tls-verify=false", *self._creds("", creds), ref)
        return result.stdout

    def inspect(self, ref: str, *, creds: tuple[str, str] | None = None) -> dict[str, Any]:
        """``skopeo inspect`` of ``ref`` for :attr:`platform`, parsed."""
        result = self.run("inspect", "--tls-verify=false", *self._creds("", creds), ref)
        parsed: dict[str, Any] = json.loads(result.stdout)
        return parsed


def dir_manifest(path: Path, digest: str | None = None) -> bytes:
    """The manifest skopeo wrote to a ``dir:`` destination: the top one, or the
    instance ``digest`` of a multi-image (``--all``) copy."""
    if digest is None:
        return (path / "manifest.json").read_bytes()
    return (path / f"{digest.removeprefix('sha256:')}.manifest.json").read_bytes()


def dir_blob_digests(path: Path) -> set[str]:
    """The digests of the blobs in a ``dir:`` destination."""
    return {
        "sha256:" + p.name
        for p in path.iterdir()
        if p.is_file() and len(p.name) == 64 and all(c in "0123456789abcdef" for c in p.name)
    }

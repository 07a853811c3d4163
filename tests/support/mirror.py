"""Running pullthrough in tests: in-process apps and real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from yarl import URL

from pullthrough.proxy.config import Settings
from tests.support import processes
from tests.support.processes import free_port, wait_ready


def settings_for(cache_dir: Path, upstream: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "cache_dir": cache_dir,
        "upstream": URL(upstream),
        "connect_timeout": 5.0,
        "read_timeout": 15.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def blob_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "blobs").rglob("*") if p.is_file())


COMMIT_WAIT_SECONDS = 5.0


async def eventually_blob_files(cache_dir: Path, count: int) -> list[Path]:
    """The cache's blob files once there are ``count`` of them: a blob is made
    durable just after its last byte reaches the client."""
    deadline = time.monotonic() + COMMIT_WAIT_SECONDS
    while True:
        found = blob_files(cache_dir)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.01)


def temp_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "tmp").iterdir())


class MirrorProcess:
    """``python -m proxy serve`` as a real process, the way an operator runs it."""

    def __init__(
        self,
        cache_dir: Path,
        upstream: str,
        *,
        workers: int = 1,
        env: dict[str, str] | None = None,
        config: Path | None = None,
        open_files: int | None = None,
        args: tuple[str, ...] = (),
        ca: Path | None = None,
    ) -> None:
        self.config = config
        # More flags for `serve`; with ``ca`` the mirror speaks HTTPS, trusted by it.
        self.args = args
        self.ca = ca
        # An open-file limit (soft and hard) for the server, as `ulimit -n` sets.
        self.open_files = open_files
        self.cache_dir = cache_dir
        self.upstream = upstream
        self.workers = workers
        self.env = env or {}
        self.port = free_port()
        self.url = f"{'https' if ca else 'http'}://127.0.0.1:{self.port}"
        self.log = cache_dir.parent / f"mirror-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PULLTHROUGH_LOG_LEVEL": "DEBUG", **self.env}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pullthrough",
                    "serve",
                    "--host=127.0.0.1",
                    f"--port={self.port}",
                    f"--cache-dir={self.cache_dir}",
                    f"--upstream={self.upstream}",
                    f"--workers={self.workers}",
                    "--read-timeout=15",
                    *([f"--config={self.config}"] if self.config else []),
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=None if self.open_files is None else self._limit_open_files,
            )
        context = None if self.ca is None else ssl.create_default_context(cafile=self.ca)

        def probe() -> str | None:
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=1, context=context):
                    return None
            except urllib.error.HTTPError:
                return None  # an answer (401 when users must log in): it serves

        try:
            wait_ready(self.proc, probe, what="mirror", timeout=20, log=self.log.read_text)
        except TimeoutError:
            self.kill()  # a mirror that never answered must not outlive the test
            raise

    def _limit_open_files(self) -> None:
        assert self.open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def kill(self) -> None:
        """SIGKILL the whole process group: no clean-up code runs, as in a crash."""
        if self.proc is not None:
            processes.kill(self.proc, group=True)

    def stop(self) -> None:
        if self.proc is not None:
            processes.stop(self.proc, group=True)


def run_cli(
    *args: str, cache: Path, upstream: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``pullthrough ARGS`` as a user runs it, on ``cache`` with ``upstream``."""
    return subprocess.run(
        [sys.executable, "-m", "pullthrough", *args],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PULLTHROUGH_CACHE_DIR": str(cache),
            "PULLTHROUGH_UPSTREAM": upstream,
            **(env or {}),
        },
        timeout=120,
        check=False,
    )


def workers_of(pid: int) -> set[int]:
    """The worker processes of server ``pid`` (not multiprocessing's helper)."""
    found = set()
    with contextlib.suppress(FileNotFoundError):  # it may be exiting
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(FileNotFoundError):
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.add(int(child))
    return found

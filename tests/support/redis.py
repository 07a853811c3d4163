"""A real Redis for tests: Debian's ``redis-server`` on a free loopback port,
without persistence, in a directory of its own (ready in about 50 ms).

Tests sharing one server keep their keys apart with a key prefix of their own
(``RedisServer.prefix()``), so the server can live for the whole session.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
from pathlib import Path

from tests.support import processes
from tests.support.binaries import require_binary
from tests.support.processes import Service, free_port, wait_ready

_PREFIXES = itertools.count(1)


class RedisServer(Service):
    def __init__(self, workdir: Path, *, binary: str | None = None) -> None:
        self.workdir = workdir
        self.binary = binary or require_binary("redis-server")
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def prefix(self) -> str:
        """A key prefix no other user of this server has."""
        return f"pt-test-{next(_PREFIXES)}:"

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        try:
            wait_ready(self._proc, self._ping, what="redis-server", timeout=timeout, log=self.log)
        except BaseException:
            self.stop()
            raise

    def _ping(self) -> str | None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            answer = sock.recv(64)
        return None if answer.startswith(b"+PONG") else f"PING answered {answer!r}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            processes.stop(proc)

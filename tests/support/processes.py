"""Test servers as child processes: a free port, waiting until one answers,
stopping it (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

Process = subprocess.Popen[bytes]


class ExitedEarly(RuntimeError):
    """The process exited before it answered."""


class Service:
    """A server a test starts and stops; ``with`` starts it, then closes it."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop, and let go of whatever else it holds (by default nothing)."""
        self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(
    proc: Process,
    probe: Callable[[], str | None],
    *,
    what: str,
    timeout: float,
    log: Callable[[], str],
    interval: float = 0.05,
) -> None:
    """Call ``probe`` until it returns None (ready); otherwise it returns what it
    saw (an OSError it raises counts as that), for the timeout's message.

    Raises ExitedEarly when the process exits first, TimeoutError when time runs
    out; both carry ``log()`` (the process's log, or its tail)."""
    deadline = time.monotonic() + timeout
    seen = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ExitedEarly(f"{what} exited with {proc.returncode} during start-up:\n{log()}")
        try:
            answer = probe()
        except OSError as exc:
            answer = repr(exc)
        if answer is None:
            return
        seen = answer
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout}s ({seen}):\n{log()}")


def _signal(proc: Process, signum: signal.Signals, group: bool) -> None:
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)


def kill(proc: Process, *, group: bool = False) -> None:
    """SIGKILL the process (or its whole process group): no clean-up code runs."""
    if proc.poll() is None:
        _signal(proc, signal.SIGKILL, group)
        proc.wait()


def stop(proc: Process, timeout: float = 10.0, *, group: bool = False) -> None:
    """SIGTERM the process (or its whole process group); SIGKILL it if it has not
    exited after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    _signal(proc, signal.SIGTERM, group)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill(proc, group=group)

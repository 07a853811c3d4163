"""What the server is doing now, for the status page: the blob downloads running
(with their progress) and the last warnings and errors it logged.

Each process keeps its own in memory and, with several workers, publishes it
about once a second to a file of its own in the multiprocess metrics directory;
``gather`` merges its own fresh state with the other workers' files (those of
processes that are gone are skipped), so every worker shows the same table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

PREFIX = "status-activity-"
# Recent errors kept per process, and shown.
MAX_ERRORS = 50
# How much of one log message is kept (they may quote client input).
MAX_MESSAGE = 500


@dataclass(slots=True)
class Download:
    upstream: str
    repository: str
    digest: str
    started: float  # seconds since the epoch
    size: int | None = None  # as the upstream announced it
    received: int = 0

    def add(self, count: int) -> None:
        self.received += count


@dataclass(frozen=True, slots=True)
class LoggedError:
    time: float
    level: str
    message: str


@dataclass(slots=True)
class _Published:
    downloads: list[Download] = field(default_factory=list)
    errors: list[LoggedError] = field(default_factory=list)


class Activity:
    def __init__(self, directory: Path | None = None, *, pid: int | None = None) -> None:
        self._directory = directory
        self._pid = os.getpid() if pid is None else pid
        self._downloads: dict[int, Download] = {}
        self._errors: deque[LoggedError] = deque(maxlen=MAX_ERRORS)
        self._published: object = None

    @contextlib.contextmanager
    def download(self, upstream: str, repository: str, digest: str) -> Iterator[Download]:
        """Shown as running until the block ends; the caller counts its bytes."""
        entry = Download(upstream, repository, digest, time.time())
        self._downloads[id(entry)] = entry
        try:
            yield entry
        finally:
            del self._downloads[id(entry)]

    def error(self, level: str, message: str, when: float | None = None) -> None:
        self._errors.append(
            LoggedError(time.time() if when is None else when, level, message[:MAX_MESSAGE])
        )

    def own(self) -> _Published:
        return _Published(
            [Download(**asdict(d)) for d in self._downloads.values()], list(self._errors)
        )

    def publish(self) -> None:
        """Write this process's state for the other workers, when it changed."""
        if self._directory is None:
            return
        state = self.own()
        body = json.dumps(
            {
                "downloads": [asdict(d) for d in state.downloads],
                "errors": [asdict(e) for e in state.errors],
            }
        )
        if body == self._published:
            return
        target = self._directory / f"{PREFIX}{self._pid}.json"
        tmp = self._directory / f".{PREFIX}{self._pid}.tmp"
        tmp.write_text(body)
        tmp.replace(target)
        self._published = body

    def withdraw(self) -> None:
        """At shutdown: this process shows nothing any more."""
        if self._directory is not None:
            (self._directory / f"{PREFIX}{self._pid}.json").unlink(missing_ok=True)

    def gather(self) -> tuple[list[Download], list[LoggedError]]:
        """Every live process's downloads (longest running first) and the most
        recent errors (newest first)."""
        states = [self.own()]
        if self._directory is not None:
            for path in self._directory.glob(f"{PREFIX}*.json"):
                pid = path.name.removeprefix(PREFIX).removesuffix(".json")
                if pid == str(self._pid):
                    continue
                if not _alive(pid):  # a worker that died; the server started another
                    path.unlink(missing_ok=True)
                    continue
                with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                    raw = json.loads(path.read_bytes())
                    states.append(
                        _Published(
                            [Download(**d) for d in raw["downloads"]],
                            [LoggedError(**e) for e in raw["errors"]],
                        )
                    )
        downloads = sorted((d for s in states for d in s.downloads), key=lambda d: d.started)
        errors = sorted((e for s in states for e in s.errors), key=lambda e: -e.time)
        return downloads, errors[:MAX_ERRORS]


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class ErrorLog(logging.Handler):
    """Keeps the warnings and errors logged in ``Activity``."""

    def __init__(self, activity: Activity) -> None:
        super().__init__(logging.WARNING)
        self._activity = activity

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        self._activity.error(record.levelname.lower(), message, record.created)

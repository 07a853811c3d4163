"""Logging: one line per request, readable or JSON, never a credential in it, and
never a flood: repeated messages are rate-limited before they reach the disk."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, Request, Response, StreamResponse

from pullthrough.proxy.forwarded import CLIENT
from pullthrough.proxy.keys import BODY_BYTES, SOURCE

ACCESS_LOGGER = "pullthrough.access"
# Each distinct message (logger and format string, whatever its arguments) is
# written at most LOG_BURST times per LOG_INTERVAL seconds; the rest are counted
# and reported in one line. Request lines are exempt: one per request is the
# point of an access log.
LOG_BURST = 20
LOG_INTERVAL = 60.0
# Distinct messages tracked at once; the least recently seen are forgotten.
LOG_KEYS = 1024
# All rate-limited messages together, per LOG_INTERVAL: messages that differ in
# their text itself (not only in arguments) cannot flood either.
LOG_TOTAL = 1000
# Summary lines written at once; further ones are summed into one.
SUMMARIES = 10
# A request path longer than this is cut in the request line (the parser lets
# 8 KiB through); registry paths are far shorter.
LOGGED_PATH = 512

# What a request's source (proxy/keys.py SOURCE) is called in the access log
# and in pullthrough_requests_total's result label.
RESULTS = {"cache": "hit", "stale": "stale", "upstream": "miss", "prefetched": "prefetched"}
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class JsonFormatter(logging.Formatter):
    """Every record as one JSON object; request lines carry their fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


class RateLimit(logging.Filter):
    """A handler filter: at most ``burst`` records per (logger, message) per
    ``interval``; the suppressed ones are reported as one WARNING line once the
    interval is over (when the message comes again, or any other does)."""

    def __init__(
        self,
        handler: logging.Handler,
        *,
        burst: int = LOG_BURST,
        total: int = LOG_TOTAL,
        interval: float = LOG_INTERVAL,
        exempt: frozenset[str] = frozenset({ACCESS_LOGGER}),
    ) -> None:
        super().__init__()
        self._handler = handler
        self.burst = burst
        self.total = total
        self.interval = interval
        self.exempt = exempt
        # (logger, template) -> [window start, records in window, suppressed]
        self._windows: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        self._lock = threading.Lock()
        self._swept = time.monotonic()
        # [window start, records in window] over every key.
        self._all = [self._swept, 0.0]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in self.exempt or getattr(record, "rate_limit_summary", False):
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        due: list[tuple[tuple[str, str], int]] = []
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.interval:
                if window is not None and window[2]:
                    due.append((key, int(window[2])))
                window = [now, 0, 0]
                self._windows[key] = window
            self._windows.move_to_end(key)
            while len(self._windows) > LOG_KEYS:
                self._windows.popitem(last=False)
            if now - self._all[0] >= self.interval:
                self._all = [now, 0.0]
            window[1] += 1
            allowed = window[1] <= self.burst and self._all[1] < self.total
            if allowed:
                self._all[1] += 1
            else:
                window[2] += 1
            if now - self._swept >= self.interval:
                self._swept = now
                for other, w in self._windows.items():
                    if other != key and w[2] and now - w[0] >= self.interval:
                        due.append((other, int(w[2])))
                        w[2] = 0
        for (name, template), count in due[:SUMMARIES]:
            self._summarize(name, template, count)
        if len(due) > SUMMARIES:
            rest = due[SUMMARIES:]
            self._summarize("pullthrough", f"{len(rest)} other messages", sum(c for _, c in rest))
        return allowed

    def _summarize(self, name: str, template: str, count: int) -> None:
        summary = logging.LogRecord(
            name,
            logging.WARNING,
            __file__,
            0,
            "suppressed %d similar messages in %g s: %r",
            (count, self.interval, template),
            None,
        )
        summary.rate_limit_summary = True
        self._handler.handle(summary)


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RateLimit(handler))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def body_bytes(request: BaseRequest, response: StreamResponse) -> int:
    """Body bytes really sent: counted by the blob routes (sendfile included),
    else a whole in-memory body once its end was written, else none."""
    counted = request.get(BODY_BYTES)
    if counted is not None:
        return int(counted)
    if request.method == "HEAD" or not response.body_length:
        return 0
    body = response.body if isinstance(response, Response) else None
    return len(body) if isinstance(body, bytes | bytearray) else 0


class AccessLogger(AbstractAccessLogger):
    """method, repository, reference, result, status, body bytes and duration of a
    request.

    Only the path is logged: no header, and no query string beyond the path.
    """

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        source = request.get(SOURCE, "") if isinstance(request, Request) else ""
        sent = body_bytes(request, response)
        path = request.path[:LOGGED_PATH]
        fields: dict[str, object] = {
            "method": request.method,
            "path": path,
            "status": response.status,
            "bytes": sent,
            "duration_ms": round(time * 1000, 2),
            "remote": request.get(CLIENT) or request.remote,
        }
        parts = path.split("/")
        if len(parts) >= 5 and parts[1] == "v2" and parts[-2] in ("manifests", "blobs"):
            fields["repository"] = "/".join(parts[2:-2])
            fields["reference"] = parts[-1]
        if source:
            fields["result"] = RESULTS.get(source, source)
        # Probes and scrapes come every few seconds: keep them out of INFO.
        level = logging.DEBUG if request.path in QUIET_PATHS else logging.INFO
        self.logger.log(
            level,
            "%s %s %s %s %dB %.1fms",
            request.method,
            path,
            response.status,
            fields.get("result", "-"),
            sent,
            time * 1000,
            extra={"fields": fields},
        )

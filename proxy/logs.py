"""One log line per request, readable or JSON, and never a credential in it."""

from __future__ import annotations

import json
import logging
import time

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, Request, StreamResponse

from proxy.keys import SOURCE

RESULTS = {"cache": "hit", "stale": "stale", "upstream": "miss"}
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


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class AccessLogger(AbstractAccessLogger):
    """method, repository, reference, result, status, bytes and duration of a request.

    Only the path is logged: no header, and no query string beyond the path.
    """

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        source = request.get(SOURCE, "") if isinstance(request, Request) else ""
        fields: dict[str, object] = {
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "bytes": response.body_length,
            "duration_ms": round(time * 1000, 2),
            "remote": request.remote,
        }
        parts = request.path.split("/")
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
            request.path,
            response.status,
            fields.get("result", "-"),
            response.body_length,
            time * 1000,
            extra={"fields": fields},
        )

"""Typed keys for what lives on the application (no module globals)."""

from __future__ import annotations

from aiohttp import web

from pullthrough.metrics import Metrics
from pullthrough.proxy.config import Settings
from pullthrough.proxy.mirror import Mirrors

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
MIRRORS = web.AppKey("mirrors", Mirrors)
# Where a request's bytes came from: "cache", "stale" or "upstream".
SOURCE = web.RequestKey("source", str)
# The ?ns= a request was routed by, echoed back as OCI-Namespace.
NAMESPACE = web.RequestKey("namespace", str)
# Body bytes a blob response really sent (sendfile or stream), for the access log.
BODY_BYTES = web.RequestKey("body_bytes", int)
# A response cut short because its download failed.
ABORTED = web.RequestKey("aborted", bool)

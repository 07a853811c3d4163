"""The status page at ``/`` and its JSON at ``/status.json``: rendering, headers
and who may see it (the data is gathered in proxy/status.py).

Everything it needs is served from here (no CDN: air-gapped sites); the HTML is
rendered with autoescaping on (image names come from clients and upstreams) and
sent under a Content-Security-Policy that allows this origin's script and style
only, nothing inline.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import jinja2
from aiohttp import web

from pullthrough.proxy.access import ACCESS, DEFAULT_RULE, USER, Access
from pullthrough.proxy.config import ANONYMOUS, EVERY_USER
from pullthrough.proxy.console import human
from pullthrough.proxy.errors import Denied, Unauthorized
from pullthrough.proxy.keys import METRICS, MIRRORS, SETTINGS
from pullthrough.proxy.status import IMAGES, STATES, Status, Visible, running, upstream_states

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ASSETS = {
    "status.css": "text/css",
    "status.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pullthrough.proxy", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["bytes"] = human
    env.filters["percent"] = lambda r: "n/a" if r is None else f"{100 * r:.1f}%"
    env.filters["utc"] = lambda t: time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))
    env.filters["utc_seconds"] = lambda t: time.strftime("%H:%M:%S", time.gmtime(t))
    env.filters["count"] = lambda n: f"{n:,.0f}"
    env.filters["short"] = lambda digest: digest.partition(":")[2][:12]
    return env


TEMPLATES = web.AppKey("status_templates", jinja2.Environment)


def _viewer(request: web.Request) -> tuple[Visible, bool]:
    """What the client may see: the repositories it may pull, and whether the
    logged errors (which may name any repository) are shown. Refuses a client
    that may pull nothing, as pulls are refused."""
    access = request.app.get(ACCESS)
    if access is None:
        return (lambda upstream, repository: True), True
    user = request.get(USER)
    if not _may_pull_something(access, user):
        if user is None:
            # The authenticate middleware makes its challenge one a browser answers.
            raise Unauthorized("log in with the mirror's user name and password")
        raise Denied({"action": "pull", "reason": "no pull right on any repository"})
    rights, credentialed = access.rights, access.credentialed

    def visible(upstream: str, repository: str) -> bool:
        # Anonymous clients pull an upstream with credentials only where the
        # upstream says a repository is public, which is not asked here.
        if user is None and upstream in credentialed:
            return False
        return rights.may_pull(user, upstream, repository)

    return visible, user is not None


def _may_pull_something(access: Access, user: str | None) -> bool:
    """Does some rule let ``user`` pull? Rules after one matching everything
    never decide, nor does the default rule then."""
    wanted = {ANONYMOUS} if user is None else {user, EVERY_USER}
    for rule in (*access.rights.rules, DEFAULT_RULE):
        if wanted & set(rule.pull):
            return True
        if rule.upstream == "*" and rule.repository == "*":
            return False
    return False


def _status(request: web.Request) -> Status:
    app = request.app
    return Status(app[SETTINGS], app[METRICS], app[MIRRORS], app[IMAGES], app[STATES])


async def page(request: web.Request) -> web.Response:
    """The page; ``?part=live`` leaves out the images list (the script's refresh
    takes the rest)."""
    visible, errors = _viewer(request)
    live = request.query.get("part") == "live"
    doc = await _status(request).document(visible, errors=errors, images=not live)
    metrics_here = request.app[SETTINGS].metrics_listen is None
    html = (
        request.app[TEMPLATES]
        .get_template("status.html")
        .render(chart=chart(doc), metrics_here=metrics_here, **doc)
    )
    return web.Response(text=html, content_type="text/html", charset="utf-8", headers=HEADERS)


async def document(request: web.Request) -> web.Response:
    visible, errors = _viewer(request)
    doc = await _status(request).document(visible, errors=errors)
    return web.json_response(doc, headers=HEADERS)


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    body = resources.files("pullthrough.proxy").joinpath("static", name).read_bytes()
    headers = {**HEADERS, "Cache-Control": "max-age=300"}
    return web.Response(body=body, content_type=ASSETS[name], headers=headers)


async def favicon(request: web.Request) -> web.Response:
    """Browsers ask for it whatever the page says."""
    raise web.HTTPMovedPermanently("/static/favicon.svg")


# The chart's drawing area, in SVG user units.
CHART_WIDTH, CHART_HEIGHT = 600, 120


def chart(doc: dict[str, Any]) -> dict[str, Any]:
    """Bars of bytes served per interval (from cache, from upstream stacked on
    it) and the hit ratio as a line, scaled to the drawing area."""
    points = doc["history"]["points"]
    if not points:
        return {"bars": [], "line": "", "peak": 0}
    peak = max(p["saved_bytes"] + p["upstream_bytes"] for p in points) or 1
    start = doc["time"] - 3600
    bars, line = [], []
    slot = CHART_WIDTH / 60
    for p in points:
        x = max(0.0, (p["end"] - start) / 3600 * CHART_WIDTH - slot)
        cached = p["saved_bytes"] / peak * CHART_HEIGHT
        fetched = p["upstream_bytes"] / peak * CHART_HEIGHT
        bars.append(
            {
                "x": round(x, 1),
                "width": round(slot * 0.8, 1),
                "cached": round(cached, 1),
                "fetched": round(fetched, 1),
                "cached_y": round(CHART_HEIGHT - cached, 1),
                "fetched_y": round(CHART_HEIGHT - cached - fetched, 1),
                "title": f"{human(p['saved_bytes'])} from cache, "
                f"{human(p['upstream_bytes'])} from upstream",
            }
        )
        if p["answered"]:
            # A step over the bar: one interval alone still draws a line.
            y = CHART_HEIGHT - p["hits"] / p["answered"] * CHART_HEIGHT
            line.append(f"{x:.1f},{y:.1f} {x + slot:.1f},{y:.1f}")
    return {"bars": bars, "line": " ".join(line), "peak": peak}


async def _serve(app: web.Application) -> AsyncIterator[None]:
    async with running(app[METRICS]):
        yield


def install(app: web.Application) -> None:
    """The page, its JSON and its assets; the history and activity tasks. Call
    after the mirrors' cleanup_ctx is added (the page reads what it opens)."""
    app[TEMPLATES] = _environment()
    app[STATES] = upstream_states(app[METRICS].shared_dir)
    app.cleanup_ctx.append(_serve)
    app.router.add_get("/", page)
    app.router.add_get("/status.json", document)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/favicon.ico", favicon)

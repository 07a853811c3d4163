"""``pullthrough``: the command line. It parses, then hands over to a command
(proxy/commands/) or to the server (proxy/server.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from pullthrough.proxy import commands, server
from pullthrough.proxy.commands import archive, cache, gc, stats, warm
from pullthrough.proxy.config import ConfigError, Settings, load_settings, prepare_cache_dir
from pullthrough.proxy.logs import configure as configure_logs

log = logging.getLogger("pullthrough")


SETTING_FLAGS = (
    "host",
    "port",
    "cache_dir",
    "upstream",
    "upstream_username",
    "tag_ttl",
    "offline",
    "max_size",
    "max_age_days",
    "workers",
    "connect_timeout",
    "read_timeout",
    "log_level",
    "log_format",
    "event_loop",
    "tls_cert",
    "tls_key",
    "htpasswd",
)


def _settings_flags(parser: argparse.ArgumentParser, *, server: bool) -> None:
    parser.add_argument("--config", type=Path, help="TOML file with settings")
    parser.add_argument("--cache-dir", help="cache folder (default ./pullthrough-cache)")
    parser.add_argument(
        "--upstream", help="registry to mirror (default https://registry-1.docker.io)"
    )
    parser.add_argument(
        "--upstream-username",
        help="user for the upstream; the password comes from PULLTHROUGH_UPSTREAM_PASSWORD "
        "or the config file, never the command line",
    )
    parser.add_argument("--max-size", help="cache size cap, e.g. 50GiB (default: none)")
    parser.add_argument("--max-age-days", type=float, help="evict what was not used for this long")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    if not server:
        return
    parser.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to listen on (default 5000)")
    parser.add_argument(
        "--tag-ttl", type=float, help="seconds a tag's digest is trusted (default 300)"
    )
    parser.add_argument(
        "--offline",
        action="store_const",
        const=True,
        help="never contact the upstream; serve only what is cached",
    )
    parser.add_argument("--workers", type=int, help="worker processes (default 1)")
    parser.add_argument("--connect-timeout", type=float, help="seconds (default 10)")
    parser.add_argument("--read-timeout", type=float, help="seconds (default 60)")
    parser.add_argument("--log-format", help="text or json (default text)")
    parser.add_argument("--event-loop", help="asyncio (default) or uvloop")
    parser.add_argument("--tls-cert", help="PEM certificate (chain): serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--htpasswd", help="users, as `htpasswd -B` writes them")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pullthrough", description="Container registry mirror and pull-through cache."
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {metadata.version('pullthrough')}"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the mirror")
    _settings_flags(serve, server=True)

    stats = commands.add_parser("stats", help="hit ratio and bytes saved of a running mirror")
    stats.add_argument(
        "--url", default="http://127.0.0.1:5000", help="the mirror (default %(default)s)"
    )

    warm = commands.add_parser(
        "warm", help="fetch images into the cache (of a running or stopped mirror)"
    )
    warm.add_argument("images", nargs="*", help="e.g. alpine:3.19 ghcr.io/owner/app:1")
    warm.add_argument("--file", type=Path, help="a file with one image per line")
    warm.add_argument(
        "--platform",
        action="append",
        help="only this platform of multi-platform images (repeatable; default: all)",
    )
    _settings_flags(warm, server=False)

    export = commands.add_parser(
        "export", help="write cached images to an OCI image layout archive"
    )
    export.add_argument("images", nargs="+")
    export.add_argument("-o", "--output", type=Path, required=True, help="archive to write")
    export.add_argument("--platform", action="append", help="only this platform (repeatable)")
    _settings_flags(export, server=False)

    load = commands.add_parser(
        "import", help="load an OCI image layout archive into the cache, verifying it"
    )
    load.add_argument("archive", type=Path)
    _settings_flags(load, server=False)

    cache = commands.add_parser("cache", help="look at and manage the cache")
    actions = cache.add_subparsers(dest="action", required=True)
    _settings_flags(actions.add_parser("ls", help="cached images"), server=False)
    _settings_flags(actions.add_parser("du", help="disk use"), server=False)
    _settings_flags(
        actions.add_parser(
            "verify",
            help="re-hash every cached blob and manifest; quarantine what is corrupt "
            "(exit status 1 if anything was)",
        ),
        server=False,
    )
    for name, text in (("pin", "never evict these images"), ("unpin", "evictable again")):
        action = actions.add_parser(name, help=text)
        action.add_argument("images", nargs="+")
        _settings_flags(action, server=False)

    gc = commands.add_parser(
        "gc",
        help="remove blobs no cached manifest uses, crash leftovers, and what the size "
        "and age limits evict (only reports unless --delete)",
    )
    gc.add_argument("--delete", action="store_true", help="remove, not just report")
    _settings_flags(gc, server=False)
    return parser


def settings_from_args(args: argparse.Namespace, environ: dict[str, str]) -> Settings:
    config = args.config or (
        Path(environ["PULLTHROUGH_CONFIG"]) if "PULLTHROUGH_CONFIG" in environ else None
    )
    overrides = {name: getattr(args, name, None) for name in SETTING_FLAGS}
    return load_settings(config_file=config, environ=environ, overrides=overrides)


# Commands that write to the cache: they may create it. The others only read
# it, and a missing cache is an error for them (a mistyped --cache-dir must not
# leave an empty cache behind).
WRITERS = frozenset({"serve", "warm", "import", "cache pin", "cache unpin"})


COMMANDS: dict[str, commands.Command] = {
    "warm": warm.run,
    "export": archive.export,
    "import": archive.load,
    "cache": cache.run,
    "gc": gc.run,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done; 1 the command failed (nothing cached there, an image not
    cached, an upstream error); 2 a usage or configuration error (argparse's code
    too), always one line on stderr."""
    args = _parser().parse_args(argv)
    if args.command == "stats":
        return stats.run(args.url)
    if args.command == "serve":
        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    try:
        settings = settings_from_args(args, dict(os.environ))
        if command in WRITERS:
            prepare_cache_dir(settings.cache_dir)
    except ConfigError as exc:
        print(f"pullthrough: {exc}", file=sys.stderr)
        return 2
    if args.command != "serve":
        configure_logs(settings.log_level if args.log_level else "WARNING", "text")
        return commands.run(COMMANDS[args.command], args, settings)
    configure_logs(settings.log_level, settings.log_format)
    try:
        return server.serve(settings)
    except server.StartupError as exc:
        print(f"pullthrough: {exc}", file=sys.stderr)
        return 1

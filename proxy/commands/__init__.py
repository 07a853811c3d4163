"""The commands that work on the cache, one module per family; this one runs
any of them under one error policy: 0 done, 1 failed with one line on stderr."""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
from collections.abc import Callable

from redis.exceptions import RedisError
from rich.console import Console

from pullthrough.cache.errors import CacheError
from pullthrough.proxy import console
from pullthrough.proxy.config import Settings, redis_display
from pullthrough.proxy.errors import RegistryError
from pullthrough.proxy.images import NoCache, TransferError

Command = Callable[[argparse.Namespace, Settings, Console], int]

# S3 failing under a command (storage = s3://...), when the s3 extra is installed.
S3_ERRORS: tuple[type[Exception], ...] = ()
with contextlib.suppress(ImportError):
    from botocore.exceptions import BotoCoreError, ClientError

    S3_ERRORS = (BotoCoreError, ClientError)


class CommandError(Exception):
    """Something the operator must fix; printed without a traceback."""


def run(command: Command, args: argparse.Namespace, settings: Settings) -> int:
    name = " ".join(filter(None, (args.command, getattr(args, "action", None))))

    def fail(text: object) -> int:
        console.err().print(f"pullthrough {name}: {text}", style="red", markup=False)
        return 1

    try:
        return command(args, settings, console.out())
    except NoCache as exc:
        # Only reading, and nothing to read: a mistyped --cache-dir must not
        # leave a new empty cache behind.
        return fail(f"{exc} (check --cache-dir)")
    except RegistryError as exc:
        return fail(f"{exc.code}: {exc.message} ({exc.detail})")
    except (CommandError, TransferError, CacheError) as exc:
        return fail(exc)
    except S3_ERRORS as exc:
        return fail(f"storage {settings.storage}: {exc}")
    except RedisError as exc:
        # The shared tag index (redis_url) is unreachable or refused.
        return fail(f"redis_url {redis_display(settings.redis_url or '')}: {exc}")
    except (OSError, sqlite3.Error) as exc:
        # An unreadable cache, a full disk (the tag index is SQLite): one line,
        # no traceback.
        return fail(exc)


def image_args(args: argparse.Namespace) -> list[str]:
    """The images named on the command line and in ``--file``."""
    images = list(args.images)
    if getattr(args, "file", None) is not None:
        try:
            lines = args.file.read_text().splitlines()
        except OSError as exc:
            raise CommandError(f"cannot read {args.file}: {exc}") from None
        images += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not images:
        raise CommandError("name at least one image (or --file)")
    return images


def platform_args(args: argparse.Namespace) -> frozenset[str] | None:
    return frozenset(args.platform) if args.platform else None

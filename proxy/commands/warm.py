"""``pullthrough warm``: fetch images into the cache, with progress bars."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from rich.console import Console
from rich.progress import Progress, TaskID

from pullthrough.cache import stores
from pullthrough.proxy.commands import image_args, platform_args
from pullthrough.proxy.config import Settings
from pullthrough.proxy.console import byte_progress, human
from pullthrough.proxy.errors import RegistryError
from pullthrough.proxy.warm import warm


class _Bars:
    """A warm's progress: one bar per blob and one for the total."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.total = TaskID(0)
        self.tasks: dict[int, TaskID] = {}

    def begin(self) -> None:
        self.progress.start()
        self.total = self.progress.add_task("[bold]total", total=0)

    def end(self) -> None:
        self.progress.stop()

    def expect(self, more_bytes: int) -> None:
        self.progress.update(
            self.total, total=(self.progress.tasks[self.total].total or 0) + more_bytes
        )

    def started(self, label: str, size: int | None) -> int:
        task = self.progress.add_task(label, total=size)
        self.tasks[int(task)] = task
        return int(task)

    def fetched(self, key: int, n: int) -> None:
        self.progress.advance(self.tasks[key], n)
        self.progress.advance(self.total, n)

    def finished(self, key: int, size: int) -> None:
        self.progress.update(self.tasks[key], completed=size)

    def failed(self, image: str, error: RegistryError) -> None:
        self.progress.console.print(f"[red]{image}: {error.code}: {error.message} ({error.detail})")


def run(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    _note_other_route(settings)
    started = time.monotonic()
    refs = image_args(args)
    bars = _Bars(byte_progress(console, eta=True))
    summary = asyncio.run(warm(settings, refs, platforms=platform_args(args), watcher=bars))
    console.print(
        f"warmed {summary.images} image(s) in {time.monotonic() - started:.1f}s: "
        f"fetched {summary.fetched} blob(s) ({human(summary.fetched_bytes)}), "
        f"{summary.cached} already cached ({human(summary.cached_bytes)}), "
        f"{summary.manifests} manifest(s)"
    )
    if summary.failed:
        console.print(f"[red]failed: {', '.join(summary.failed)}")
        return 1
    return 0


def _note_other_route(settings: Settings) -> None:
    recorded = stores.read_record(settings.cache_dir.resolve())
    for up in settings.all_upstreams():
        known = recorded.get(up.name)
        if known is not None and known.url != str(up.url):
            # Not an error (a warm may use another route), but rarely meant.
            print(
                f"pullthrough warm: note: the server on this cache fetches {up.name} from "
                f"{known.url}; this warm fetches it from {up.url} (--upstream or --config "
                "to match)",
                file=sys.stderr,
            )

"""What the command line prints: byte sizes, progress bars, the image table, errors."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from pullthrough.cache.listing import ImageRow


def out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def human(n: float) -> str:
    """Bytes for a person: 412.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def byte_progress(console: Console, *, eta: bool = False) -> Progress:
    """Bars counting bytes, one per task (its description is the label)."""
    columns: list[ProgressColumn] = [
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    ]
    if eta:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console)


def image_table(rows: Sequence[ImageRow], console: Console) -> None:
    """A table on a terminal; tab-separated columns for a pipe or a file."""
    header = ("IMAGE", "DIGEST", "SIZE", "LAST USED", "NOTES")
    lines = []
    for row in rows:
        notes = ", ".join(
            n for n, on in (("pinned", row.pinned), ("partial", not row.complete)) if on
        )
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.last_used))
        lines.append((row.image, row.digest[:19], human(row.size), used, notes or "-"))
    if not console.is_terminal:
        for line in (header, *lines):
            console.print("\t".join(line), soft_wrap=True)
        return
    table = Table(*header)
    for line in lines:
        table.add_row(*line)
    console.print(table)

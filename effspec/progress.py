"""Progress bars for long work, on stderr so `--json` stdout stays machine-readable.

Bars show only on an interactive terminal (or with EFFSPEC_PROGRESS=1) and never
when EFFSPEC_PROGRESS=0, so logs and CI output stay clean.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def enabled() -> bool:
    flag = os.environ.get("EFFSPEC_PROGRESS")
    return flag == "1" or (flag != "0" and sys.stderr.isatty())


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate `items`, drawing a bar with rate and time left when enabled."""
    if not enabled():
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total if total is not None else (len(items) if hasattr(items, "__len__") else None))
        for item in items:
            yield item
            bar.advance(task)

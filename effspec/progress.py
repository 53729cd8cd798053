"""Progress bars for long work, on stderr so `--json` stdout stays machine-readable.

Bars show only on an interactive terminal (or with EFFSPEC_PROGRESS=1) and never
when EFFSPEC_PROGRESS=0, so logs and CI output stay clean.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


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


@contextlib.contextmanager
def status_bar(description: str, total: int, start: int = 0) -> Iterator[Callable[..., None]]:
    """A bar over `total` steps that also shows named figures (loss, tokens/s); yields `advance(**figures)`.

    Without a terminal it logs one line per tenth of the work instead, so long runs stay observable.
    """
    done = [start]

    def fmt(figures: dict) -> str:
        return " ".join(f"{k}={v:.4g}" for k, v in figures.items())

    if not enabled():
        every = max(1, total // 10)

        def advance(**figures) -> None:
            done[0] += 1
            if done[0] % every == 0 or done[0] == total:
                log.info("%s: %d/%d %s", description, done[0], total, fmt(figures))
        yield advance
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[figures]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total, completed=start, figures="")

        def advance(**figures) -> None:
            bar.update(task, advance=1, figures=fmt(figures))
        yield advance

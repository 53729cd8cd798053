"""Progress bars for long work, on stderr so `--json` stdout stays machine-readable.

Bars show only on an interactive terminal (or with EFFSPEC_PROGRESS=1) and never
when EFFSPEC_PROGRESS=0, so logs and CI output stay clean. Without a bar, long
work logs a line per tenth instead (INFO, shown with `-v` and in benchmark
worker logs), so a half-hour rank search is not a silent half hour.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
QUIET_SECONDS = 10.0  # a loop without a bar logs its tenths only once it has run this long


def enabled() -> bool:
    flag = os.environ.get("EFFSPEC_PROGRESS")
    return flag == "1" or (flag != "0" and sys.stderr.isatty())


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate `items`, drawing a bar with rate and time left when enabled (else logging tenths of long loops)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if not enabled():
        yield from _logged(items, description, total)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


def _logged(items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    """`items`, with a log line at each tenth of `total` once QUIET_SECONDS have passed (short loops stay quiet)."""
    every = max(1, total // 10) if total else 0
    start = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        if every and (i % every == 0 or i == total):
            elapsed = time.perf_counter() - start
            if elapsed >= QUIET_SECONDS:
                log.info("%s: %d/%d, %.0f s, about %.0f s left", description, i, total, elapsed,
                         elapsed / i * (total - i))


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

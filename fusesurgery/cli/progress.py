"""A byte progress bar on stderr with its total, speed and ETA, shared by the writing commands."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from fusesurgery.cli.errors import stderr


@contextmanager
def byte_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """Yields ``update(done_bytes, total_bytes)``; the bar disappears when done."""
    # only on a terminal: in a pipe or a log file a transient bar leaves a blank line behind
    progress = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=stderr, transient=True,
                        disable=not stderr.is_terminal)
    with progress:
        task = progress.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update

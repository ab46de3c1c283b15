"""A byte progress bar on stderr with its total, speed and ETA, shared by the writing commands."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from fusesurgery._sizes import format_bytes
from fusesurgery.cli.errors import stderr


class BytesColumn(ProgressColumn):
    """``1.23 GB/4.98 GB``: bytes done and the total, in the one size convention."""

    def render(self, task: Task) -> Text:
        total = "?" if task.total is None else format_bytes(task.total)
        return Text(f"{format_bytes(task.completed)}/{total}", style="progress.download")


class RateColumn(ProgressColumn):
    """``412 MB/s``, in the same units as every other size fusesurgery prints."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        text = "?" if speed is None else f"{format_bytes(speed)}/s"
        return Text(text, style="progress.data.speed")


@contextmanager
def byte_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """Yields ``update(done_bytes, total_bytes)``; the bar disappears when done."""
    # only on a terminal: in a pipe or a log file a transient bar leaves a blank line behind
    progress = Progress(TextColumn(label), BarColumn(), TaskProgressColumn(), BytesColumn(),
                        RateColumn(), TimeRemainingColumn(), console=stderr, transient=True,
                        disable=stderr.quiet or not stderr.is_terminal)
    with progress:
        task = progress.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update

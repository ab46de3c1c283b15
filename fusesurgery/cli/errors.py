"""The one place that turns exceptions into one-line messages and exit codes."""

from __future__ import annotations

import os
import traceback

from rich.console import Console
from rich.markup import escape

from fusesurgery.errors import FuseSurgeryError

# Exit codes, like diff(1): 0 same/success, 1 a difference found, 2 trouble.
EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_ERROR = 2
EXIT_BUG = 3

# Exception type -> (exit code, message prefix); the first match in order wins.
ERROR_TABLE: tuple[tuple[type[BaseException], int, str], ...] = (
    (FuseSurgeryError, EXIT_ERROR, "error"),
    (PermissionError, EXIT_ERROR, "permission denied"),
    (FileNotFoundError, EXIT_ERROR, "not found"),
    (OSError, EXIT_ERROR, "I/O error"),
    (MemoryError, EXIT_ERROR, "out of memory"),
)

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def debug_enabled() -> bool:
    return os.environ.get("FUSESURGERY_DEBUG", "") not in ("", "0")


def report(exc: BaseException) -> int:
    """Print ``exc`` as one line on stderr (a traceback too when debugging); return the
    exit code."""
    if debug_enabled():
        stderr.print(escape("".join(traceback.format_exception(exc))), end="")
    for exc_type, code, prefix in ERROR_TABLE:
        if isinstance(exc, exc_type):
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            stderr.print(f"[bold red]{prefix}:[/] {escape(message)}")
            return code
    stderr.print(
        f"[bold red]internal error:[/] {escape(type(exc).__name__)}: "
        f"{escape(str(exc).splitlines()[0] if str(exc) else '')} "
        "(a bug in fusesurgery; rerun with FUSESURGERY_DEBUG=1 for the traceback)"
    )
    return EXIT_BUG

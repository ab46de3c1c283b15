"""The one place that turns exceptions into one-line messages and exit codes."""

from __future__ import annotations

import os
import signal
import sys
import traceback

from rich.console import Console
from rich.markup import escape

from fusesurgery import _json as standard_json
from fusesurgery.errors import FuseSurgeryError

# Exit codes, like diff(1): 0 same/success, 1 a difference found, 2 trouble.
EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_ERROR = 2
EXIT_BUG = 3
EXIT_INTERRUPTED = 128 + signal.SIGINT

# Exception type -> (exit code, message prefix); the first match in order wins.
ERROR_TABLE: tuple[tuple[type[BaseException], int, str], ...] = (
    (FuseSurgeryError, EXIT_ERROR, "error"),
    (PermissionError, EXIT_ERROR, "permission denied"),
    (FileNotFoundError, EXIT_ERROR, "not found"),
    (OSError, EXIT_ERROR, "I/O error"),
    (MemoryError, EXIT_ERROR, "out of memory"),
)

# Progress bars and informational messages: silenced by --quiet (see set_quiet).
stderr = Console(stderr=True, highlight=False, soft_wrap=True)
# Errors and interruptions: never silenced.
_error_stderr = Console(stderr=True, highlight=False, soft_wrap=True)


# stdout's width when it is a pipe or a file and COLUMNS is unset: rich would assume 80 columns
# and fold long key names across lines, which grep cannot match; tables keep their natural
# width (they never stretch to this).
PIPE_WIDTH = 10_000


def stdout_console() -> Console:
    """A console for a command's data on stdout, made when the command prints: on a terminal
    (or with COLUMNS set) as wide as that; piped, wide enough that no row wraps."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH
    return console


def set_quiet(quiet: bool) -> None:
    """``--quiet``: no progress bars or informational messages on stderr from now on.

    Errors still show (they print on a console of their own), and stdout data is untouched.
    huggingface_hub's own bars (downloads of Hub sources, uploads of push) go quiet too, and
    also when stderr is not a terminal (a log), unless HF_HUB_DISABLE_PROGRESS_BARS is set.
    """
    stderr.quiet = quiet
    if (quiet or not stderr.is_terminal) and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub loads
        if "huggingface_hub" in sys.modules:  # already loaded (a library user, a test)
            sys.modules["huggingface_hub"].utils.disable_progress_bars()


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: unwound like Ctrl-C, so every writer removes its partial
    output on the way out (they clean up on any BaseException)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def handle_termination() -> None:
    """Treat SIGTERM (kill, systemd, Kubernetes, CI) and SIGHUP (a closed terminal) as Ctrl-C.

    Signals left ignored by the parent (``nohup`` ignores SIGHUP) stay ignored.
    """
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _raise_terminated)


def interrupted(exc: KeyboardInterrupt) -> int:
    """Report an interruption on stderr; return its exit code (130 Ctrl-C, 143 SIGTERM)."""
    what = "interrupted" if not isinstance(exc, Terminated) else f"terminated ({exc})"
    _error_stderr.print(f"[bold red]{what}[/]: stopped; no partial output is left behind")
    return exc.exit_code if isinstance(exc, Terminated) else EXIT_INTERRUPTED


def debug_enabled() -> bool:
    return os.environ.get("FUSESURGERY_DEBUG", "") not in ("", "0")


def report(exc: BaseException, as_json: bool = False) -> int:
    """Print ``exc`` as one line on stderr (a traceback too when debugging); return the
    exit code. With ``as_json`` (the command was given ``--json``) the error is also a JSON
    object on stdout, ``{"error": message, "kind": prefix, "code": exit code}``, so a script
    reading stdout always gets JSON."""
    if debug_enabled():
        _error_stderr.print(escape("".join(traceback.format_exception(exc))), end="")
    for exc_type, code, prefix in ERROR_TABLE:
        if isinstance(exc, exc_type):
            # the fix as this interface spells it: --overwrite, not overwrite=True
            text = exc.cli_message() if isinstance(exc, FuseSurgeryError) else str(exc)
            message = text.splitlines()[0] if text else type(exc).__name__
            _error_stderr.print(f"[bold red]{prefix}:[/] {escape(message)}")
            if as_json:
                print(standard_json.dumps({"error": message, "kind": prefix, "code": code}))
            return code
    message = type(exc).__name__ + (f": {str(exc).splitlines()[0]}" if str(exc) else "")
    _error_stderr.print(
        f"[bold red]internal error:[/] {escape(message)} "
        "(a bug in fusesurgery; rerun with FUSESURGERY_DEBUG=1 for the traceback)"
    )
    if as_json:
        print(standard_json.dumps({"error": message, "kind": "internal error",
                                   "code": EXIT_BUG}))
    return EXIT_BUG


def report_usage(message: str, command_path: str | None = None, as_json: bool = False) -> int:
    """Print a usage error (an unknown option or command, a bad or missing value) as one line
    on stderr, as git and hf do: ``error: Invalid value for '--every': 'abc' is not a valid
    integer (see 'fusesurgery fuse --help')``; return the exit code (2). With ``as_json`` it
    is also ``{"error": message, "kind": "usage error", "code": 2}`` on stdout."""
    message = " ".join(message.split()).removesuffix(".")
    hint = f" (see '{command_path} --help')" if command_path else ""
    _error_stderr.print(f"[bold red]error:[/] {escape(message + hint)}")
    if as_json:
        print(standard_json.dumps({"error": message, "kind": "usage error",
                                   "code": EXIT_ERROR}))
    return EXIT_ERROR

"""The rules every command that writes follows, so that no input is ever lost.

One module decides, for every writer (``convert``, ``fuse``, ``unfuse``, ``save_fused``):

- which path an output really is: ``realpath``, so ``..``, symlinks and relative spellings
  cannot hide that two paths are the same; the empty string is not a path;
- that an output never is, contains, lies inside or links to an input, with or without
  ``overwrite``;
- that ``overwrite`` replaces only a directory fusesurgery itself wrote, recognised by the
  marker file :data:`MARKER_FILE` every output carries;
- how temporary directories are named (``.NAME.partial-TAG-PID-RANDOM``) so that one left by a
  killed run is recognised and removed by the next run writing the same output, and how an old
  output moved aside during a replace (``.NAME.old-TAG-PID-RANDOM``) is restored or removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Iterable
from pathlib import Path

from fusesurgery._version import __version__
from fusesurgery.errors import WriteError
from fusesurgery.io._files import utf8_path

MARKER_FILE = ".fusesurgery.json"
# The permission to replace an earlier output, as the command line and the Python API spell it.
OVERWRITE_FLAG = "--overwrite"
OVERWRITE_ARGUMENT = "overwrite=True"


def resolve_output(out: str | os.PathLike[str]) -> Path:
    """The absolute, symlink-free path an output will be written at.

    Raises:
        WriteError: an empty path, one naming no directory of its own (``/``), or one that
            is not valid UTF-8.
    """
    raw = utf8_path(out, "output path", WriteError)
    if not raw.strip():
        raise WriteError("the output path is empty; name the output directory")
    resolved = Path(os.path.realpath(raw))
    if not resolved.name:
        raise WriteError(f"output directory {resolved} has no name; choose a subdirectory")
    return resolved


def _resolved_inputs(inputs: Iterable[str | os.PathLike[str] | None]) -> list[Path]:
    return [Path(os.path.realpath(os.fspath(path))) for path in inputs if path is not None]


def check_not_an_input(out_dir: Path, inputs: Iterable[str | os.PathLike[str] | None]) -> None:
    """Refuse an output that is, contains, lies inside or (through links) is an input.

    Args:
        out_dir: the resolved output (see :func:`resolve_output`).
        inputs: every path the command reads: the paths the user gave and the files actually
            opened (which may lie elsewhere, as Hugging Face cache snapshots link to blobs).

    Raises:
        WriteError: the output overlaps an input.
    """
    cwd = Path(os.path.realpath(os.getcwd()))
    for source in _resolved_inputs(inputs):
        if out_dir == source:
            relation = "is the input"
        elif source.is_relative_to(out_dir):
            relation = "contains the input"
        elif out_dir.is_relative_to(source):
            relation = "lies inside the input"
        else:
            continue
        raise WriteError(
            f"output {out_dir} {relation} {source}; inputs are never written to, not even to "
            "replace an earlier output: choose an output directory outside every input"
        )
    if cwd.is_relative_to(out_dir):
        raise WriteError(
            f"output {out_dir} is or contains the current directory; choose another output "
            "directory"
        )


def is_fusesurgery_output(directory: Path) -> bool:
    """Whether ``directory`` holds the marker fusesurgery writes into every output."""
    try:
        mode = os.lstat(directory / MARKER_FILE).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode)


def marker_content(**details: object) -> str:
    """The marker file's text: who wrote the directory, and what it holds."""
    return json.dumps({"written_by": "fusesurgery", "version": __version__, **details},
                      indent=2, sort_keys=True) + "\n"


def check_destination(out_dir: Path, overwrite: bool) -> bool:
    """Refuse an unusable destination up front. Returns whether an old output is replaced.

    Raises:
        WriteError: ``out_dir`` is not a directory; is not empty and ``overwrite`` is not set;
            or is not empty and was not written by fusesurgery (never replaced).
    """
    try:
        mode = os.stat(out_dir).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise WriteError(f"cannot inspect output path {out_dir}: {exc.strerror}") from exc
    if not stat.S_ISDIR(mode):
        raise WriteError(f"output path {out_dir} exists and is not a directory; choose another")
    try:
        with os.scandir(out_dir) as entries:
            is_empty = next(entries, None) is None
    except OSError as exc:
        raise WriteError(f"cannot list output directory {out_dir}: {exc.strerror}") from exc
    if is_empty:
        return False
    if not is_fusesurgery_output(out_dir):
        raise WriteError(
            f"output directory {out_dir} is not empty and was not written by fusesurgery (it has "
            f"no {MARKER_FILE}); it is never replaced: choose another directory or empty it "
            "yourself"
        )
    if not overwrite:
        raise WriteError(
            f"output directory {out_dir} holds an earlier fusesurgery output; choose another "
            "directory or replace it",
            flag=OVERWRITE_FLAG,
            argument=OVERWRITE_ARGUMENT,
        )
    return True


# --------------------------------------------------------------------------------------------
# Temporary and backup directories beside the output.


def _host_tag() -> str:
    """Eight hex digits naming this machine and boot: a PID means something only there."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as handle:
            boot = handle.read().strip()
    except OSError:
        boot = b""
    return hashlib.sha256(socket.gethostname().encode() + b"/" + boot).hexdigest()[:8]


def _sibling_pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"\.{re.escape(name)}\.(partial|old)-([0-9a-f]{{8}})-([0-9]+)-[0-9a-f]{{8}}"
    )


def _sibling_name(name: str, kind: str) -> str:
    return f".{name}.{kind}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0  # someone else's process (or a PID we cannot even ask about)
    return True


def clean_stale_siblings(out_dir: Path) -> None:
    """Remove what killed runs left beside ``out_dir``: temporary directories of runs whose
    process is gone (on this machine), and restore an old output moved aside by a replace that
    was killed before the new output moved in (or remove it, when the new one is in place).

    Only directories with fusesurgery's own naming, of dead processes, are touched.
    """
    parent, pattern, tag = out_dir.parent, _sibling_pattern(out_dir.name), _host_tag()
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for entry in sorted(names):
        match = pattern.fullmatch(entry)
        if not match or match.group(2) != tag or _process_alive(int(match.group(3))):
            continue
        path = parent / entry
        if match.group(1) == "old" and not os.path.lexists(out_dir):
            try:
                os.rename(path, out_dir)  # the replace died halfway: the old output returns
            except OSError:
                pass
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def make_temp_dir(out_dir: Path) -> Path:
    """A new, empty ``.NAME.partial-...`` directory beside ``out_dir`` (same filesystem, so
    the final rename is atomic), after removing stale ones of killed runs.

    Raises:
        OSError: the parent cannot be created or written.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_siblings(out_dir)
    while True:
        candidate = out_dir.parent / _sibling_name(out_dir.name, "partial")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate


def move_into_place(temp_dir: Path, out_dir: Path, replace_existing: bool) -> None:
    """Rename the finished ``temp_dir`` to ``out_dir``; with ``replace_existing``, the old
    output is moved aside first and deleted only once the new one is in place.

    Raises:
        WriteError: ``out_dir`` was filled by someone else meanwhile.
        OSError: a rename failed (the old output is back where it was).
    """
    if not replace_existing:
        try:
            # rename(2) atomically replaces an empty directory, and refuses a non-empty one.
            os.replace(temp_dir, out_dir)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise WriteError(
                    f"output directory {out_dir} was filled by someone else while writing; "
                    "choose another directory"
                ) from exc
            raise
        return
    if not is_fusesurgery_output(out_dir):  # checked again: it may have changed meanwhile
        raise WriteError(f"output directory {out_dir} changed while writing and is no longer "
                         "a fusesurgery output; it is not replaced")
    # No portable atomic directory swap: move the old output aside, move the new one in, then
    # delete the old one. A reader sees the old or the new complete output (or, for an
    # instant, none), never a mixture; a run killed in between is repaired by the next one.
    backup = out_dir.parent / _sibling_name(out_dir.name, "old")
    os.rename(out_dir, backup)
    try:
        os.rename(temp_dir, out_dir)
    except BaseException:
        os.rename(backup, out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


__all__ = [
    "MARKER_FILE",
    "check_destination",
    "check_not_an_input",
    "clean_stale_siblings",
    "is_fusesurgery_output",
    "make_temp_dir",
    "marker_content",
    "move_into_place",
    "resolve_output",
]

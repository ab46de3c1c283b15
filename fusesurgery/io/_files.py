"""Opening files for reading, with OS errors turned into one-line CheckpointErrors."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fusesurgery.errors import CheckpointError


def describe_os_error(path: Path, error: OSError) -> CheckpointError:
    """The CheckpointError to raise for an OSError met while reading ``path``."""
    if isinstance(error, FileNotFoundError):
        return CheckpointError(f"{path}: no such file or directory")
    if isinstance(error, PermissionError):
        return CheckpointError(
            f"{path}: permission denied; make it readable (e.g. chmod u+r) or run as its owner"
        )
    if isinstance(error, IsADirectoryError):
        return CheckpointError(f"{path}: is a directory where a file was expected")
    reason = error.strerror or errno.errorcode.get(error.errno or 0, "") or str(error)
    return CheckpointError(f"{path}: cannot read: {reason}")


@contextlib.contextmanager
def open_for_reading(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """Open ``path`` in binary mode and give ``(file, size_in_bytes)``.

    Only errors raised while opening or stat-ing are translated; what the caller raises inside
    the ``with`` block passes through untouched.

    Raises:
        CheckpointError: the file is missing, unreadable or not a regular file.
    """
    try:
        handle = open(path, "rb")  # noqa: SIM115 -- closed below, after the caller's block
    except OSError as error:
        raise describe_os_error(path, error) from None
    try:
        try:
            size = os.fstat(handle.fileno()).st_size
        except OSError as error:
            raise describe_os_error(path, error) from None
        yield handle, size
    finally:
        handle.close()


def read_exactly(handle: BinaryIO, path: Path, count: int) -> bytes:
    """Read ``count`` bytes or raise: a short read means the file changed or is truncated.

    Raises:
        CheckpointError: fewer bytes than asked for, or an I/O error.
    """
    try:
        data = handle.read(count)
    except OSError as error:
        raise describe_os_error(path, error) from None
    if len(data) != count:
        raise CheckpointError(f"{path}: file ended after {len(data)} of {count} expected bytes")
    return data

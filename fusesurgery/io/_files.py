"""Opening files for reading, with OS errors turned into one-line CheckpointErrors."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fusesurgery._sizes import format_bytes
from fusesurgery.errors import CheckpointError, FuseSurgeryError


def utf8_path(path: str | bytes | os.PathLike[str], what: str,
              error: type[FuseSurgeryError] = CheckpointError) -> str:
    """``path`` as text, refused unless it is valid UTF-8: fusesurgery records paths in its
    JSON files and prints them, and neither can hold bytes that are no text.

    Args:
        path: the path as given (a str, bytes or path-like).
        what: what the path is, for the message (``"checkpoint path"``).
        error: the error class to raise.

    Raises:
        FuseSurgeryError: ``error``: not a path, or not UTF-8 (named by its bytes, escaped).
    """
    if not isinstance(path, str | bytes | os.PathLike):
        raise error(f"{what} must be a str or os.PathLike, not {path!r} "
                    f"({type(path).__name__})")
    raw = os.fspath(path)
    data = raw if isinstance(raw, bytes) else os.fsencode(raw)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        shown = repr(data)[2:-1]  # \xff for each byte that is not UTF-8
        raise error(f"{what} {shown} is not valid UTF-8; fusesurgery writes paths into its "
                    "JSON files and messages, so rename it (or use a link with a UTF-8 "
                    "name)") from None


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


# Config files and shard indexes are kilobytes; a "config" of more is not one (or /dev/zero).
MAX_JSON_FILE_BYTES = 64 * 2**20

_FILE_KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def require_regular_file(path: Path) -> None:
    """Refuse anything but a regular file (after following links) before it is opened: a
    FIFO would block the open forever, a device would never end.

    Raises:
        CheckpointError: missing, unreadable, or not a regular file.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise describe_os_error(path, error) from None
    if not stat.S_ISREG(mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise CheckpointError(f"{path}: is {kind}, not a regular file")


@contextlib.contextmanager
def open_for_reading(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """Open ``path`` in binary mode and give ``(file, size_in_bytes)``.

    Only errors raised while opening or stat-ing are translated; what the caller raises inside
    the ``with`` block passes through untouched.

    Raises:
        CheckpointError: the file is missing, unreadable or not a regular file.
    """
    require_regular_file(path)
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


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice (``json`` would silently keep the last)."""


def reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``object_pairs_hook`` for ``json.loads``: a key given twice is an error, never a
    silent "last one wins".

    Raises:
        DuplicateKeyError: with the key as its argument.
    """
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(key)
        result[key] = value
    return result


def read_json_file(path: Path, what: str, error_type: type[Exception] = CheckpointError) -> dict:
    """Read a small JSON object file (a config, a shard index): a regular file of at most
    :data:`MAX_JSON_FILE_BYTES`, UTF-8, no key given twice.

    Raises:
        CheckpointError: the file is missing, unreadable, not a regular file, or too large.
        error_type: not UTF-8, not JSON, duplicate keys, or not an object (``what`` and
            ``path`` name it in the message).
    """
    with open_for_reading(path) as (handle, size):
        if size > MAX_JSON_FILE_BYTES:
            raise CheckpointError(
                f"{path}: {format_bytes(size)} is far too large for a {what}"
            )
        raw = read_exactly(handle, path, size)
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicate_keys)
    except DuplicateKeyError as error:
        raise error_type(f"{path}: {what} names {error.args[0]!r} twice") from None
    except UnicodeDecodeError:
        raise error_type(f"{path}: {what} is not UTF-8 text") from None
    except RecursionError:
        raise error_type(f"{path}: {what} JSON is nested too deeply") from None
    except ValueError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise error_type(f"{path}: {what} is not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise error_type(f"{path}: {what} holds a JSON {type(data).__name__}, not an object")
    return data


# Small files carried beside weights (tokenizers, processor configs): a Llama 3 tokenizer.json
# is 9 MB; anything past this is not such a file.
MAX_SIDE_FILE_BYTES = 256 * 2**20
# What ``file_fingerprint`` hashes of a file that is not safetensors.
FINGERPRINT_HEAD_BYTES = 2**20


def read_side_file(path: Path) -> bytes:
    """The bytes of a small regular file that travels beside a checkpoint.

    Raises:
        CheckpointError: missing, unreadable, not a regular file, or larger than
            :data:`MAX_SIDE_FILE_BYTES`.
    """
    with open_for_reading(path) as (handle, size):
        if size > MAX_SIDE_FILE_BYTES:
            raise CheckpointError(f"{path}: {format_bytes(size)} is too large for a file "
                                  "that travels beside the weights")
        return read_exactly(handle, path, size)


def file_fingerprint(path: Path) -> dict[str, object]:
    """Name, size and a sha256 of a checkpoint file's header, without reading its data: the
    8-byte length and JSON header of a safetensors file, else its first
    :data:`FINGERPRINT_HEAD_BYTES` (a torch archive's pickle and directory lie at its ends).

    Raises:
        CheckpointError: the file cannot be read.
    """
    with open_for_reading(path) as (handle, size):
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if path.suffix == ".safetensors" and 0 <= length <= size - 8:
            hashed = head + read_exactly(handle, path, length)
        else:
            hashed = head + handle.read(FINGERPRINT_HEAD_BYTES - len(head))
    return {"name": path.name, "size": size, "header_bytes": len(hashed),
            "header_sha256": hashlib.sha256(hashed).hexdigest()}

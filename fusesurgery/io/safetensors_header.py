"""Strict reader of safetensors headers: every name, shape, dtype and byte range, no tensor data.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of UTF-8 JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``),
then the data region; offsets are relative to the start of the data region.

Why our own parser rather than ``huggingface_hub.parse_local_safetensors_file_metadata``: that
function checks the header length (against its own 25 MB cap) and that the header is JSON, and
nothing more. It accepts unknown dtypes, negative or non-integer shapes, offsets past the end
of the file, overlapping or gapped offsets and byte spans that disagree with the shape; it
decodes the JSON with ``errors="ignore"`` (silently renaming keys with invalid UTF-8), and a
header that is a JSON list or holds a non-object entry escapes as AttributeError / TypeError.
Since :mod:`fusesurgery.io.checkpoint` maps tensors straight out of the file at these
offsets, every one of those must be an error, so this module enforces what safetensors' own
(Rust) loader enforces, with messages that name the file and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusesurgery.errors import CheckpointError
from fusesurgery.io._files import (
    DuplicateKeyError,
    open_for_reading,
    read_exactly,
    reject_duplicate_keys,
)
from fusesurgery.io.tensor_info import SAFETENSORS_DTYPE_FACTS, TensorInfo

# The cap safetensors' own reader applies; a real header is a few hundred bytes per tensor.
MAX_HEADER_BYTES = 100_000_000
HEADER_LENGTH_BYTES = 8
METADATA_KEY = "__metadata__"
REQUIRED_FIELDS = ("dtype", "shape", "data_offsets")


@dataclass(frozen=True)
class SafetensorsEntry:
    """Where one tensor's bytes lie in its file.

    Args:
        info: name, shape, dtype and file of the tensor.
        begin: absolute byte offset of the first byte in the file.
        end: absolute byte offset one past the last byte.
    """

    info: TensorInfo
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, validated header of one safetensors file.

    Args:
        path: the file.
        file_size: its size in bytes (the data region ends exactly there).
        data_start: absolute offset of the data region (8 + header length).
        entries: every tensor, in the order its bytes are stored in the file.
        metadata: the ``__metadata__`` string map, or ``{}``.
    """

    path: Path
    file_size: int
    data_start: int
    entries: dict[str, SafetensorsEntry]
    metadata: dict[str, str]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file without touching its data region.

    Checks: header length within the file and below :data:`MAX_HEADER_BYTES`; header is UTF-8
    JSON holding an object with no duplicate keys; every entry has a known dtype, a shape of
    non-negative ints and two int ``data_offsets`` whose span equals ``numel * itemsize``;
    sorted by offset, the entries tile the data region exactly (no overlap, no gap, nothing
    past the end, nothing after the last tensor); ``__metadata__`` maps strings to strings.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        The validated header; entries in stored (byte offset) order.

    Raises:
        CheckpointError: the file is missing, unreadable, or fails any check above.
    """
    path = Path(path)
    with open_for_reading(path) as (handle, file_size):
        if file_size == 0:
            raise CheckpointError(f"{path}: empty file, not a safetensors checkpoint")
        if file_size < HEADER_LENGTH_BYTES:
            raise CheckpointError(
                f"{path}: {file_size}-byte file is too short to be safetensors "
                f"(an {HEADER_LENGTH_BYTES}-byte header length comes first)"
            )
        (header_length,) = struct.unpack("<Q", read_exactly(handle, path, HEADER_LENGTH_BYTES))
        check_header_length(path, header_length, file_size)
        header_bytes = read_exactly(handle, path, header_length)
    return parse_safetensors_header(path, file_size, header_bytes)


def check_header_length(path: str | Path, header_length: int, file_size: int) -> None:
    """Check the 8-byte header length read from the start of a safetensors file.

    Raises:
        CheckpointError: the length is absurd or larger than the file.
    """
    if header_length > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: header length {header_length} bytes is absurd (limit "
            f"{MAX_HEADER_BYTES}); the file is corrupted or not safetensors"
        )
    if HEADER_LENGTH_BYTES + header_length > file_size:
        raise CheckpointError(
            f"{path}: header length {header_length} bytes is larger than the file "
            f"({file_size} bytes); the file is truncated or not safetensors"
        )


def parse_safetensors_header(path: str | Path, file_size: int,
                             header_bytes: bytes) -> SafetensorsHeader:
    """Validate a safetensors header given as bytes, as :func:`read_safetensors_header` does
    for a local file (for a header fetched some other way, such as a range request).

    Args:
        path: the file the header belongs to (in messages, and where its data lies).
        file_size: the whole file's size in bytes.
        header_bytes: the ``n`` JSON bytes after the 8-byte length.

    Returns:
        The validated header; entries in stored (byte offset) order.

    Raises:
        CheckpointError: the header fails any check of :func:`read_safetensors_header`.
    """
    path = Path(path)
    header_length = len(header_bytes)
    check_header_length(path, header_length, file_size)
    header = _decode_header_json(path, header_bytes)
    data_start = HEADER_LENGTH_BYTES + header_length
    data_size = file_size - data_start
    metadata = _validate_metadata(path, header.pop(METADATA_KEY, None))
    located = [
        _validate_entry(path, name, entry, data_size) for name, entry in header.items()
    ]
    # Python's sort is stable: zero-byte tensors sharing an offset keep their header order.
    located.sort(key=lambda item: (item[1], item[2]))
    _check_tiling(path, located, data_size)
    entries = {
        info.name: SafetensorsEntry(info, data_start + begin, data_start + end)
        for info, begin, end in located
    }
    return SafetensorsHeader(path, file_size, data_start, entries, metadata)


def _decode_header_json(path: Path, header_bytes: bytes) -> dict[str, Any]:
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(
            f"{path}: header is not UTF-8 (bad byte at {error.start}); the file is corrupted"
        ) from None
    try:
        header = json.loads(text, object_pairs_hook=reject_duplicate_keys)
    except DuplicateKeyError as error:
        raise CheckpointError(f"{path}: header names {error.args[0]!r} twice") from None
    except RecursionError:
        raise CheckpointError(f"{path}: header JSON is nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, and ints too long to convert
        reason = str(error).splitlines()[0]
        raise CheckpointError(f"{path}: header is not valid JSON ({reason})") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: header JSON is a {type(header).__name__}, not an object of tensor entries"
        )
    return header


def _validate_metadata(path: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(value, str) for value in metadata.values()
    ):
        raise CheckpointError(f"{path}: {METADATA_KEY} must map strings to strings")
    return metadata


def _validate_entry(
    path: Path, name: str, entry: object, data_size: int
) -> tuple[TensorInfo, int, int]:
    if not isinstance(entry, dict):
        raise CheckpointError(
            f"{path}: entry {name!r} is a {type(entry).__name__}, not an object with "
            f"{', '.join(REQUIRED_FIELDS)}"
        )
    missing = [field for field in REQUIRED_FIELDS if field not in entry]
    if missing:
        raise CheckpointError(f"{path}: entry {name!r} has no {', '.join(missing)}")

    dtype_name = entry["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPE_FACTS:
        raise CheckpointError(
            f"{path}: tensor {name!r} has unknown dtype {dtype_name!r} "
            f"(supported: {', '.join(SAFETENSORS_DTYPE_FACTS)})"
        )

    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(dim) and dim >= 0 for dim in shape):
        raise CheckpointError(
            f"{path}: tensor {name!r} has shape {shape!r}; expected a list of non-negative ints"
        )

    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(offset) for offset in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(
            f"{path}: tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] "
            "with 0 <= begin <= end"
        )
    begin, end = offsets
    if end > data_size:
        raise CheckpointError(
            f"{path}: tensor {name!r} data_offsets [{begin}, {end}] run past the end of the "
            f"file (data region is {data_size} bytes); the file is truncated or corrupted"
        )
    expected_bytes = math.prod(shape) * SAFETENSORS_DTYPE_FACTS[dtype_name][1]
    if end - begin != expected_bytes:
        raise CheckpointError(
            f"{path}: tensor {name!r} of shape {shape} and dtype {dtype_name} needs "
            f"{expected_bytes} bytes but its data_offsets [{begin}, {end}] span {end - begin}"
        )
    return TensorInfo(name, tuple(shape), dtype_name, path), begin, end


def _check_tiling(path: Path, located: list[tuple[TensorInfo, int, int]], data_size: int) -> None:
    covered = 0
    previous = None
    for info, begin, end in located:
        if begin < covered:
            raise CheckpointError(
                f"{path}: tensor {info.name!r} at [{begin}, {end}] overlaps tensor "
                f"{previous!r}, which ends at {covered}"
            )
        if begin > covered:
            raise CheckpointError(
                f"{path}: gap of {begin - covered} unclaimed bytes before tensor {info.name!r} "
                f"at [{begin}, {end}]; tensors must be stored contiguously"
            )
        covered = end
        previous = info.name
    if covered != data_size:
        raise CheckpointError(
            f"{path}: {data_size - covered} bytes after the last tensor are claimed by no "
            "tensor; the file is corrupted"
        )

"""Shared helpers for the io tests: raw safetensors writers and process memory probes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from fusesurgery.errors import FuseSurgeryError


def write_raw_safetensors(
    path: Path,
    header: dict | bytes,
    data: bytes = b"",
    *,
    header_length: int | None = None,
) -> Path:
    """Write a safetensors-like file byte for byte, valid or not.

    Args:
        path: the file to write.
        header: a dict (dumped to JSON) or the raw header bytes.
        data: the bytes after the header.
        header_length: the length to claim in the 8-byte prefix; the true length when None.
    """
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    claimed = len(header_bytes) if header_length is None else header_length
    path.write_bytes(struct.pack("<Q", claimed) + header_bytes + data)
    return path


def f32_entry(begin: int, count: int) -> dict:
    """A header entry for ``count`` float32 values starting at byte ``begin``."""
    return {"dtype": "F32", "shape": [count], "data_offsets": [begin, begin + 4 * count]}


def file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of ``path`` (from /proc/self/maps)."""
    target = str(path.resolve())
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(value, 16) for value in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def rss_anon_bytes() -> int:
    """Anonymous resident memory of this process (heap copies count here, file maps do not)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("RssAnon missing from /proc/self/status")


def assert_one_line_naming(error: pytest.ExceptionInfo[FuseSurgeryError], path: Path) -> str:
    """The error's message, after checking it is one line and names ``path``'s file."""
    message = str(error.value)
    assert "\n" not in message, message
    assert path.name in message, message
    return message

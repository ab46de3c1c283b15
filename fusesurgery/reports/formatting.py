"""Small text renderings shared by the reports and the CLI."""

from __future__ import annotations

from collections.abc import Iterable

from fusesurgery._sizes import BYTE_UNITS, format_bytes

__all__ = ["BYTE_UNITS", "format_bytes", "format_index_set"]


def format_index_set(indices: Iterable[int], max_items: int | None = None) -> str:
    """Render a set of layer indices compactly: runs of three or more as ``a..b``.

    ``[0, 1, ..., 31]`` -> ``{0..31}``; ``[3, 7, 11]`` -> ``{3,7,11}``;
    ``[0, 1, 2, 4, ..., 9]`` -> ``{0..2,4..9}``; ``[4, 5]`` -> ``{4,5}``. With ``max_items``,
    longer renderings keep their first items and the last: ``{3,7,11,15,...,31}``.
    """
    values = sorted(set(indices))
    parts: list[str] = []
    start = 0
    for end in range(1, len(values) + 1):
        if end < len(values) and values[end] == values[end - 1] + 1:
            continue
        run = values[start:end]
        if len(run) >= 3:
            parts.append(f"{run[0]}..{run[-1]}")
        else:
            parts.extend(map(str, run))
        start = end
    if max_items is not None and len(parts) > max_items:
        parts = [*parts[: max_items - 2], "...", parts[-1]]
    return "{" + ",".join(parts) + "}"

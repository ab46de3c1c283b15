"""The one way fusesurgery writes a size in bytes, for every layer from io to the CLI.

It lives at the package root, beside ``_json``, so that the readers in ``io`` and the writers
in ``write`` can phrase their error messages ("not enough space ...") the way the reports
and the progress bars do without importing a later layer.
"""

from __future__ import annotations

# The one size convention of every message, report and progress bar: decimal SI units.
BYTE_UNITS: tuple[str, ...] = ("B", "kB", "MB", "GB", "TB", "PB")


def format_bytes(nbytes: int | float) -> str:
    """Render a byte count in decimal SI units to three significant digits.

    ``0`` -> ``0 B``; ``999`` -> ``999 B``; ``1000`` -> ``1.00 kB``; ``4_976_698_672`` ->
    ``4.98 GB``; ``16_060_522_496`` -> ``16.1 GB``; ``811_700_000_000`` -> ``812 GB``.

    Why decimal (1 GB = 10**9 bytes) rather than binary GiB: the sizes people check these
    numbers against are decimal. The Hugging Face Hub lists files in decimal units,
    ``max_shard_size="5GB"`` (transformers' and fusesurgery's default) means 5 * 10**9 bytes,
    a parameter count reads straight across (8.03B bf16 parameters are 16.1 GB, not
    14.96 GiB), and rich's transfer-speed column is decimal only, so a binary bar would mix
    units on one line. ``du -h`` and ``df -h`` use binary units; their figures are about 7 %
    smaller at the GB scale.

    Args:
        nbytes: a count of bytes, >= 0 (a float is accepted for rates such as bytes/s).

    Returns:
        The count with its unit, e.g. ``"1.52 kB"``; counts past 1000 PB stay in PB.

    Raises:
        ValueError: ``nbytes`` is negative or not finite.
    """
    if not 0 <= nbytes < float("inf"):
        raise ValueError(f"a byte count must be a finite number >= 0, got {nbytes!r}")
    if round(nbytes) < 1000:
        return f"{nbytes:.0f} B"
    value = float(nbytes)
    for unit in BYTE_UNITS[1:]:
        value /= 1000
        # Decide the digits after rounding, so 999_999 B reads 1.00 MB, not 1000 kB.
        if round(value, 2) < 10:
            return f"{value:.2f} {unit}"
        if round(value, 1) < 100:
            return f"{value:.1f} {unit}"
        if round(value) < 1000 or unit == BYTE_UNITS[-1]:
            return f"{value:.0f} {unit}"
    raise AssertionError("unreachable")

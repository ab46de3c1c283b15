"""format_bytes: the one size convention (decimal SI units, three significant digits)."""

from __future__ import annotations

import math

import pytest

from fusesurgery._sizes import format_bytes
from fusesurgery.reports.formatting import format_bytes as reports_format_bytes


@pytest.mark.parametrize(("nbytes", "text"), [
    (0, "0 B"),
    (1, "1 B"),
    (999, "999 B"),
    (1000, "1.00 kB"),  # the kB boundary is 1000, not 1024
    (1023, "1.02 kB"),
    (1024, "1.02 kB"),
    (1536, "1.54 kB"),
    (99_949, "99.9 kB"),
    (100_000, "100 kB"),
    (999_499, "999 kB"),
    (999_500, "1.00 MB"),  # rounds up into the next unit, never "1000 kB"
    (999_999, "1.00 MB"),
    (5 * 10**9, "5.00 GB"),  # max_shard_size="5GB" reads back as itself
    (4_976_698_672, "4.98 GB"),  # a 5 GB safetensors shard, as the Hub lists it
    (16_060_522_496, "16.1 GB"),  # Llama 3.1 8B in bf16
    (811_728_044_032, "812 GB"),  # Llama 3.1 405B in bf16
    (999_999_999_999, "1.00 TB"),
    (1_600_000_000_000, "1.60 TB"),
    (2**50, "1.13 PB"),
    (10**18, "1000 PB"),  # past the last unit the number grows
    (412_345_678.9, "412 MB"),  # rates are floats
    (999.6, "1.00 kB"),
])
def test_format_bytes(nbytes, text):
    assert format_bytes(nbytes) == text


@pytest.mark.parametrize("bad", [-1, -0.5, math.inf, math.nan])
def test_format_bytes_rejects_what_is_not_a_size(bad):
    with pytest.raises(ValueError, match="byte count"):
        format_bytes(bad)


def test_one_formatter():
    assert reports_format_bytes is format_bytes

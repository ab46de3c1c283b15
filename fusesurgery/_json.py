"""Standard JSON out: what ``--json`` prints and every JSON file fusesurgery writes.

Python's ``json`` writes ``NaN`` and ``Infinity`` for non-finite floats, which no standard
JSON parser (``jq``, JavaScript, Go, Rust's serde) accepts. Here they become the strings
``"nan"``, ``"inf"`` and ``"-inf"`` (a difference of NaN between two tensors is a fact worth
reporting, not an error), and ``allow_nan=False`` makes sure nothing else slips through.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """``json.dumps`` that always yields standard JSON (non-finite floats as strings)."""
    return json.dumps(_finite(value), allow_nan=False, **options)

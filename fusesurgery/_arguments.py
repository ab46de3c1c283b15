"""Checks of API arguments: a value of the wrong type or range is a ConfigError naming the
argument, never a TypeError or an overflow from deep inside."""

from __future__ import annotations

from collections.abc import Sized

from fusesurgery.errors import ConfigError

# The seeds torch.Generator.manual_seed takes without wrapping: [0, 2**63).
SEED_LIMIT = 2**63


def is_int(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def brief(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a 30 000-entry list stays one short
    line), with the full length and, for a sized value, its entry count when cut."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f", {len(value)} entries" if isinstance(value, Sized) else ""
    return f"{text[:limit]}... ({len(text)} characters{size})"


def argument_error(name: str, value: object, wanted: str) -> ConfigError:
    """``name must be <wanted>, not <value> (<type>)``."""
    return ConfigError(f"{name} must be {wanted}, not {brief(value)} ({type(value).__name__})")


def check_int(name: str, value: object, low: int, high: int, why: str = "") -> None:
    """Refuse anything but an int in ``[low, high)``.

    Raises:
        ConfigError: naming ``name``, the range and the value.
    """
    if not is_int(value) or not low <= value < high:
        raise argument_error(name, value, f"an integer from {low} to {high - 1}"
                             + (f" ({why})" if why else ""))


__all__ = ["SEED_LIMIT", "argument_error", "brief", "check_int", "is_int"]

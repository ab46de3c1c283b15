"""Model families, one file each: what the generic machinery needs to read, convert, build
and fuse a family, declared as data (see :mod:`fusesurgery.families._spec`).

Every module of this package not starting with ``_`` is a family file defining ``FAMILY``;
the registry below collects them, so adding a family is adding one file (copy the nearest
one: README, "Adding a family"). Families are data that ``config``, ``convert``, ``modules``
and ``surgery`` read; nothing here imports anything above ``errors``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping

from fusesurgery.errors import ConfigError
from fusesurgery.families._spec import DecoderFamily, Family, RopeStyle, VisionFamily

ADDING_A_FAMILY = "README, \"Adding a family\""


def _collect() -> tuple[dict[str, DecoderFamily], dict[str, VisionFamily]]:
    decoders: dict[str, DecoderFamily] = {}
    towers: dict[str, VisionFamily] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if info.name.startswith("_"):
            continue
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if not isinstance(family, (DecoderFamily, VisionFamily)):
            raise TypeError(f"{__name__}.{info.name} defines no FAMILY")
        table: dict = decoders if isinstance(family, DecoderFamily) else towers
        if family.name in decoders or family.name in towers:
            raise TypeError(f"two families are named {family.name!r}")
        table[family.name] = family
    return decoders, towers


DECODER_FAMILIES, VISION_FAMILIES = _collect()
FAMILIES: dict[str, Family] = {**DECODER_FAMILIES, **VISION_FAMILIES}


def _check_model_types(families: Iterable[Family]) -> None:
    claimed: dict[str, str] = {}
    for family in families:
        for model_type in family.model_types:
            if model_type in claimed:
                raise TypeError(f"model_type {model_type!r} is claimed by {claimed[model_type]} "
                                f"and {family.name}")
            claimed[model_type] = family.name


_check_model_types(FAMILIES.values())


def decoder_family(name: str) -> DecoderFamily:
    """The decoder family called ``name`` (``DecoderConfig.family``).

    Raises:
        ConfigError: no such decoder family; the message lists the valid names.
    """
    try:
        return DECODER_FAMILIES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown decoder family {name!r}; valid: "
                          f"{', '.join(DECODER_FAMILIES)}") from None


def vision_family(name: str) -> VisionFamily:
    """The vision tower family called ``name`` (``VisionEncoderConfig.family``).

    Raises:
        ConfigError: no such vision family; the message lists the valid names.
    """
    try:
        return VISION_FAMILIES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown vision family {name!r}; valid: "
                          f"{', '.join(VISION_FAMILIES)}") from None


def by_model_type(families: Mapping[str, Family]) -> dict[str, str]:
    """transformers ``model_type`` -> family name, over ``families``."""
    return {model_type: family.name for family in families.values()
            for model_type in family.model_types}


def native_rope_styles() -> dict[str, RopeStyle]:
    """Decoder family -> the RoPE pairing of its native layout."""
    return {name: family.native_rope_style for name, family in DECODER_FAMILIES.items()}


__all__ = [
    "ADDING_A_FAMILY",
    "DECODER_FAMILIES",
    "FAMILIES",
    "VISION_FAMILIES",
    "DecoderFamily",
    "Family",
    "VisionFamily",
    "by_model_type",
    "decoder_family",
    "native_rope_styles",
    "vision_family",
]

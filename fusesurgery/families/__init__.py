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
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Closest:
    """The supported family nearest to an architecture no family file describes.

    Args:
        family: the nearest family.
        why: what that family's file says differs (its ``relatives`` entry), or how the
            match was made (``"by key names: 12 of 12 of its keys"``).
    """

    family: Family
    why: str

    def advice(self) -> str:
        """One sentence: which family is closest and how to add one."""
        module = f"fusesurgery/families/{self.family.name}.py"
        return (f"the closest supported family is {self.family.name} ({self.why}); to add "
                f"one, copy {module} ({ADDING_A_FAMILY})")


_LAYER_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")


def _templates(keys: Iterable[str], prefixes: tuple[str, ...]) -> set[str]:
    out = set()
    for key in keys:
        template = _LAYER_NUMBER.sub("{i}", key)
        for prefix in prefixes:  # a bare model's keys lack its wrapper's prefix
            if template.startswith(prefix):
                template = template.removeprefix(prefix)
        out.add(template)
    return out


def closest_family(kind: str, model_type: str | None = None,
                   keys: Iterable[str] = ()) -> Closest | None:
    """The supported ``kind`` family nearest to an unsupported architecture.

    A family file that lists ``model_type`` among its ``relatives`` says so itself;
    otherwise the family whose transformers key names cover the most of the checkpoint's
    wins (the larger share of the family's own keys first, then more keys, then registry
    order).

    Args:
        kind: ``"decoder"`` or ``"vision"``.
        model_type: the checkpoint's transformers ``model_type``, if it has one.
        keys: the checkpoint's tensor names.

    Returns:
        The nearest family and why, or None when no family shares a key name with it.
    """
    families = DECODER_FAMILIES if kind == "decoder" else VISION_FAMILIES
    if model_type is not None:
        for family in families.values():
            if model_type in family.relatives:
                return Closest(family, f"{model_type}: {family.relatives[model_type]}")
    prefixes = ("model.", "vision_model.")
    have = _templates(keys, prefixes)
    best: tuple[float, int, int] | None = None
    chosen: tuple[Family, int, int] | None = None
    for order, family in enumerate(families.values()):
        own = _templates(family.hf_keys, prefixes)
        shared = len(own & have)
        if not shared:
            continue
        score = (shared / len(own), shared, -order)
        if best is None or score > best:
            best, chosen = score, (family, shared, len(own))
    if chosen is None:
        return None
    family, shared, total = chosen
    return Closest(family, f"by key names: {shared} of its {total} key rows")


def native_rope_styles() -> dict[str, RopeStyle]:
    """Decoder family -> the RoPE pairing of its native layout."""
    return {name: family.native_rope_style for name, family in DECODER_FAMILIES.items()}


__all__ = [
    "ADDING_A_FAMILY",
    "Closest",
    "DECODER_FAMILIES",
    "FAMILIES",
    "VISION_FAMILIES",
    "DecoderFamily",
    "Family",
    "VisionFamily",
    "by_model_type",
    "closest_family",
    "decoder_family",
    "native_rope_styles",
    "vision_family",
]

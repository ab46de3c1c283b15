"""Metadata of one tensor in a checkpoint, and the dtype names of the formats we read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported on first use only: reading headers, inspecting and key-level diffs never
# need it, and importing it costs more than a second. Header-level code works with safetensors'
# dtype names ("BF16") and the torch-free tables below; the torch-valued tables
# (SAFETENSORS_DTYPES and the others in _TORCH_TABLES) are built on first access.

# safetensors' dtype name -> (torch's attribute name, bytes per element, floating point)
SAFETENSORS_DTYPE_FACTS: dict[str, tuple[str, int, bool]] = {
    "F64": ("float64", 8, True),
    "F32": ("float32", 4, True),
    "F16": ("float16", 2, True),
    "BF16": ("bfloat16", 2, True),
    "F8_E4M3": ("float8_e4m3fn", 1, True),
    "F8_E5M2": ("float8_e5m2", 1, True),
    "I64": ("int64", 8, False),
    "I32": ("int32", 4, False),
    "I16": ("int16", 2, False),
    "I8": ("int8", 1, False),
    "U8": ("uint8", 1, False),
    "BOOL": ("bool", 1, False),
}
_SAFETENSORS_BY_TORCH_NAME = {facts[0]: name for name, facts in SAFETENSORS_DTYPE_FACTS.items()}
assert len(_SAFETENSORS_BY_TORCH_NAME) == len(SAFETENSORS_DTYPE_FACTS), "table not one-to-one"

# Names a user may give a floating-point dtype -> torch's attribute name: safetensors' short
# names and torch's / Hugging Face's long ones (``torch_dtype: "bfloat16"`` in config.json).
FLOAT_DTYPE_ALIASES: dict[str, str] = {
    **{name.lower(): torch_name for name, (torch_name, _, is_float)
       in SAFETENSORS_DTYPE_FACTS.items() if is_float},
    "bfloat16": "bfloat16",
    "float16": "float16",
    "half": "float16",
    "float32": "float32",
    "float": "float32",
    "float64": "float64",
    "double": "float64",
}

_TORCH_TABLES = ("SAFETENSORS_DTYPES", "TORCH_TO_SAFETENSORS", "DTYPE_SHORT_NAMES",
                 "FLOAT_DTYPE_NAMES")


def __getattr__(name: str) -> Any:
    """The torch-valued dtype tables, built (importing torch) on first access:

    ``SAFETENSORS_DTYPES`` (safetensors name -> torch dtype), its inverse
    ``TORCH_TO_SAFETENSORS``, ``DTYPE_SHORT_NAMES`` (torch dtype -> ``bf16``) and
    ``FLOAT_DTYPE_NAMES`` (user-facing name -> torch dtype).
    """
    if name not in _TORCH_TABLES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch  # noqa: PLC0415 - the first use of a torch-valued table

    safetensors = {code: getattr(torch, torch_name)
                   for code, (torch_name, _, _) in SAFETENSORS_DTYPE_FACTS.items()}
    tables = {
        "SAFETENSORS_DTYPES": safetensors,
        "TORCH_TO_SAFETENSORS": {dtype: code for code, dtype in safetensors.items()},
        "DTYPE_SHORT_NAMES": {dtype: code.lower() for code, dtype in safetensors.items()},
        "FLOAT_DTYPE_NAMES": {alias: getattr(torch, torch_name)
                              for alias, torch_name in FLOAT_DTYPE_ALIASES.items()},
    }
    globals().update(tables)
    return tables[name]


def _torch_dtype(torch_name: str) -> torch.dtype:
    import torch  # noqa: PLC0415 - first touch of a real dtype

    return getattr(torch, torch_name)


def dtype_from_name(name: str) -> torch.dtype:
    """The floating-point dtype a name means (``bf16``, ``bfloat16``, ``torch.bfloat16``...).

    Raises:
        ValueError: an unknown or non-floating-point name.
    """
    return _torch_dtype(float_dtype_torch_name(name))


def float_dtype_torch_name(name: str) -> str:
    """torch's name of the floating-point dtype a name means, without importing torch.

    Raises:
        ValueError: an unknown or non-floating-point name.
    """
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in FLOAT_DTYPE_ALIASES:
        valid = ", ".join(FLOAT_DTYPE_ALIASES)
        raise ValueError(f"unknown dtype {name!r}; valid: {valid}")
    return FLOAT_DTYPE_ALIASES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch's long name without the module, as config.json spells it (``bfloat16``)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, init=False)
class TensorInfo:
    """What a checkpoint says about one tensor, known without reading its data.

    The dtype is kept as a name (``dtype_code``), so that metadata-only work (headers,
    ``inspect``, key-level ``diff``, plans) never imports torch; :attr:`dtype` gives the torch
    dtype, importing torch on first use. Two infos of one dtype compare equal whichever way
    it was given.

    Args:
        name: the key as stored.
        shape: the tensor's shape.
        dtype: the tensor's dtype: a ``torch.dtype``, or a safetensors dtype name (``"BF16"``,
            a key of :data:`SAFETENSORS_DTYPE_FACTS`) as header readers give it.
        file: the file that holds its data, if it lives in a file.

    Raises:
        ValueError: ``dtype`` is a string that names no safetensors dtype.
    """

    name: str
    shape: tuple[int, ...]
    dtype_code: str  # safetensors' name when it has one ("BF16"), else torch's ("complex64")
    file: Path | None = None

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | str,
                 file: Path | None = None) -> None:
        if isinstance(dtype, str):
            if dtype not in SAFETENSORS_DTYPE_FACTS:
                raise ValueError(f"unknown safetensors dtype {dtype!r}; valid: "
                                 f"{', '.join(SAFETENSORS_DTYPE_FACTS)}")
            code = dtype
        else:
            torch_name = str(dtype).removeprefix("torch.")
            code = _SAFETENSORS_BY_TORCH_NAME.get(torch_name, torch_name)
            object.__setattr__(self, "_torch_dtype", dtype)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype_code", code)
        object.__setattr__(self, "file", file)

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (imports torch on first use)."""
        cached = self.__dict__.get("_torch_dtype")
        if cached is None:
            cached = _torch_dtype(SAFETENSORS_DTYPE_FACTS[self.dtype_code][0])
            object.__setattr__(self, "_torch_dtype", cached)
        return cached

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        facts = SAFETENSORS_DTYPE_FACTS.get(self.dtype_code)
        return facts[1] if facts is not None else self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_floating_point(self) -> bool:
        facts = SAFETENSORS_DTYPE_FACTS.get(self.dtype_code)
        return facts[2] if facts is not None else self.dtype.is_floating_point

    @property
    def dtype_name(self) -> str:
        """Short display name of the dtype, e.g. ``bf16``."""
        return self.dtype_code.lower()


@dataclass(frozen=True)
class FileRegion:
    """Where a tensor's raw bytes lie in a file, exactly as a safetensors writer would write
    them (little-endian, C order). Lets a writer copy a tensor that needs no transform with
    ``copy_file_range`` instead of touching its pages from user space.

    Args:
        path: the file.
        offset: the first byte, from the start of the file.
        nbytes: how many bytes.
    """

    path: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class PermutedRegion:
    """A tensor's raw bytes in a file, to be written with its rows (slices along dim 0) in
    another order: a pure row reordering such as the RoPE q/k permutation. Lets a writer
    gather the rows straight from the file's pages (``writev`` from a mapping) instead of
    reading, permuting and writing a copy.

    Args:
        region: where the source tensor's bytes lie, C order.
        row_order: for each output row, the source row it is taken from; a permutation of
            ``range(len(row_order))``, whose length divides ``region.nbytes``.
    """

    region: FileRegion
    row_order: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.region.nbytes

    @property
    def row_bytes(self) -> int:
        return self.region.nbytes // len(self.row_order) if self.row_order else 0

"""Metadata of one tensor in a checkpoint, and the dtype names of the formats we read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors' dtype names. The inverse is derived, and checked to be one-to-one at import.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
assert len(TORCH_TO_SAFETENSORS) == len(SAFETENSORS_DTYPES), "dtype table is not one-to-one"

# Short names for display (`bf16`, `f32`, ...).
DTYPE_SHORT_NAMES: dict[torch.dtype, str] = {
    dtype: name.lower() for name, dtype in SAFETENSORS_DTYPES.items()
}


# Names a user may give a floating-point dtype: safetensors' short names and torch's / Hugging
# Face's long ones (``torch_dtype: "bfloat16"`` in config.json).
FLOAT_DTYPE_NAMES: dict[str, torch.dtype] = {
    **{name.lower(): dtype for name, dtype in SAFETENSORS_DTYPES.items()
       if dtype.is_floating_point},
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
}


def dtype_from_name(name: str) -> torch.dtype:
    """The floating-point dtype a name means (``bf16``, ``bfloat16``, ``torch.bfloat16``...).

    Raises:
        ValueError: an unknown or non-floating-point name.
    """
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in FLOAT_DTYPE_NAMES:
        valid = ", ".join(FLOAT_DTYPE_NAMES)
        raise ValueError(f"unknown dtype {name!r}; valid: {valid}")
    return FLOAT_DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch's long name without the module, as config.json spells it (``bfloat16``)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint says about one tensor, known without reading its data.

    Args:
        name: the key as stored.
        shape: the tensor's shape.
        dtype: the tensor's dtype.
        file: the file that holds its data, if it lives in a file.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def dtype_name(self) -> str:
        """Short display name of the dtype, e.g. ``bf16``."""
        return DTYPE_SHORT_NAMES.get(self.dtype, str(self.dtype).removeprefix("torch."))


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

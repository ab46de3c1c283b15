"""Reading checkpoints lazily: safetensors headers, memory-mapped tensors, safe pickles."""

from fusesurgery.io.checkpoint import CheckpointSource, TensorNotFoundError, open_checkpoint
from fusesurgery.io.safetensors_header import (
    SafetensorsEntry,
    SafetensorsHeader,
    read_safetensors_header,
)
from fusesurgery.io.shard_index import ShardIndex, read_shard_index
from fusesurgery.io.tensor_info import FileRegion, PermutedRegion, TensorInfo
from fusesurgery.io.torch_pickle import load_torch_state_dict


def __getattr__(name: str) -> object:
    # the torch-valued dtype tables import torch: only when asked for (see io.tensor_info)
    if name in ("DTYPE_SHORT_NAMES", "SAFETENSORS_DTYPES", "TORCH_TO_SAFETENSORS"):
        from fusesurgery.io import tensor_info  # noqa: PLC0415

        return getattr(tensor_info, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DTYPE_SHORT_NAMES",
    "SAFETENSORS_DTYPES",
    "TORCH_TO_SAFETENSORS",
    "CheckpointSource",
    "FileRegion",
    "PermutedRegion",
    "SafetensorsEntry",
    "SafetensorsHeader",
    "ShardIndex",
    "TensorInfo",
    "TensorNotFoundError",
    "load_torch_state_dict",
    "open_checkpoint",
    "read_safetensors_header",
    "read_shard_index",
]

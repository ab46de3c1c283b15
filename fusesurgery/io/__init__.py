"""Reading checkpoints lazily: safetensors headers, memory-mapped tensors, safe pickles."""

from fusesurgery.io.checkpoint import CheckpointSource, TensorNotFoundError, open_checkpoint
from fusesurgery.io.safetensors_header import (
    SafetensorsEntry,
    SafetensorsHeader,
    read_safetensors_header,
)
from fusesurgery.io.shard_index import ShardIndex, read_shard_index
from fusesurgery.io.tensor_info import (
    DTYPE_SHORT_NAMES,
    SAFETENSORS_DTYPES,
    TORCH_TO_SAFETENSORS,
    FileRegion,
    PermutedRegion,
    TensorInfo,
)
from fusesurgery.io.torch_pickle import load_torch_state_dict

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

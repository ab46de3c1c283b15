"""Reading checkpoints lazily: safetensors headers, memory-mapped tensors, safe pickles."""

from fusesurgery._lazy import lazy_exports

# submodule -> the names this package re-exports from it, imported on first use (the
# torch-valued dtype tables import torch: only when asked for, see io.tensor_info)
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "checkpoint": ["CheckpointSource", "TensorNotFoundError", "open_local_checkpoint"],
    "opening": ["open_checkpoint"],
    "safetensors_header": ["SafetensorsEntry", "SafetensorsHeader", "read_safetensors_header"],
    "shard_index": ["ShardIndex", "read_shard_index"],
    "tensor_info": [
        "FileRegion", "PermutedRegion", "TensorInfo",
        "DTYPE_SHORT_NAMES", "SAFETENSORS_DTYPES", "TORCH_TO_SAFETENSORS",
    ],
    "torch_pickle": ["load_torch_state_dict"],
})

"""Write checkpoints: shard plans from sizes alone, and a streaming, atomic safetensors writer."""

from fusesurgery.write.convert_checkpoint import ConversionResult, convert_checkpoint
from fusesurgery.write.safetensors_writer import (
    WriteResult,
    safetensors_header,
    write_safetensors,
)
from fusesurgery.write.shard_plan import (
    DEFAULT_MAX_SHARD_SIZE,
    Shard,
    ShardPlan,
    parse_size,
    plan_shards,
    shard_filename,
)

__all__ = [
    "ConversionResult",
    "convert_checkpoint",
    "DEFAULT_MAX_SHARD_SIZE",
    "Shard",
    "ShardPlan",
    "WriteResult",
    "parse_size",
    "plan_shards",
    "safetensors_header",
    "shard_filename",
    "write_safetensors",
]

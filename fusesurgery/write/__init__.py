"""Write checkpoints: shard plans from sizes alone, and a streaming, atomic safetensors writer."""

from __future__ import annotations

import sys
import types
from typing import Any

from fusesurgery._lazy import lazy_exports

# Imported on first use: ``fuse`` starts copying files (from fusesurgery.write.copy_ahead)
# before torch, which the converter imports, has loaded.
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "convert_checkpoint": ["ConversionResult", "convert_checkpoint"],
    "safetensors_writer": ["WriteResult", "safetensors_header", "write_safetensors"],
    "shard_plan": ["DEFAULT_MAX_SHARD_SIZE", "Shard", "ShardPlan", "parse_size", "plan_shards",
                   "shard_filename"],
})


class _Package(types.ModuleType):
    """``fusesurgery.write.convert_checkpoint`` is the function although a submodule has that
    name too: importing the submodule makes Python set the attribute, which stays the
    function however lazily things are imported."""

    @property
    def convert_checkpoint(self) -> Any:
        return __getattr__("convert_checkpoint")

    @convert_checkpoint.setter
    def convert_checkpoint(self, submodule: types.ModuleType) -> None:
        pass  # the import system announcing the submodule: it stays in sys.modules


sys.modules[__name__].__class__ = _Package

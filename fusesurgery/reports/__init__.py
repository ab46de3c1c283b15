"""Reports about checkpoints, built from metadata: inspect (and, beside it, diff)."""

from fusesurgery.reports.diff import (
    CheckpointSide,
    DiffReport,
    DtypeChange,
    ShapeChange,
    TensorComparison,
    ValueChange,
    collapse_key_names,
    compare_tensors,
    diff_checkpoints,
)
from fusesurgery.reports.inspection import (
    FusionReport,
    InspectReport,
    KeyRow,
    TensorCount,
    collapse_keys,
    format_index_set,
    inspect_checkpoint,
)

__all__ = [
    "CheckpointSide",
    "DiffReport",
    "DtypeChange",
    "ShapeChange",
    "TensorComparison",
    "ValueChange",
    "collapse_key_names",
    "compare_tensors",
    "diff_checkpoints",
    "FusionReport",
    "InspectReport",
    "KeyRow",
    "TensorCount",
    "collapse_keys",
    "format_index_set",
    "inspect_checkpoint",
]

"""Reports about checkpoints, built from metadata: inspect (and, beside it, diff)."""

from fusesurgery._lazy import lazy_exports

# submodule -> the names this package re-exports from it, imported on first use
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "diff": [
        "CheckpointSide", "DiffReport", "DtypeChange", "ShapeChange", "TensorComparison",
        "ValueChange", "collapse_key_names", "compare_tensors", "diff_checkpoints",
    ],
    "inspection": [
        "FusionReport", "InspectReport", "KeyRow", "TensorCount", "collapse_keys",
        "format_index_set", "inspect_checkpoint",
    ],
})

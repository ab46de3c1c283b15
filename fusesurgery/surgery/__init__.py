"""Surgery: plans from metadata, then applied to tensors and modules."""

from fusesurgery._lazy import lazy_exports

# imported on first use: the plans (fuse_plan, fused_config) load without torch
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "load": ["detect_checkpoint", "load_decoder", "load_encoder"],
})

"""Surgery: plans from metadata, then applied to tensors and modules."""

from fusesurgery._lazy import lazy_exports

# imported on first use, so that reading a fusion_config.json (surgery.fused_config) does not
# pay for torch
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "load": ["detect_checkpoint", "load_decoder", "load_encoder"],
})

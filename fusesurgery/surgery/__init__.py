"""Surgery: plans from metadata, then applied to tensors and modules."""

from fusesurgery.surgery.load import detect_checkpoint, load_decoder, load_encoder

__all__ = ["detect_checkpoint", "load_decoder", "load_encoder"]

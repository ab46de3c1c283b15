"""fusesurgery: model surgery on pretrained checkpoints.

Fuse a pretrained encoder into a pretrained LLM decoder with zero-initialised gated
cross-attention, keep the original checkpoint keys, prove the fused model still computes what
the decoder computed, and write the result as sharded safetensors.
"""

from fusesurgery.config import DecoderConfig, FusionConfig, RopeScaling, VisionEncoderConfig
from fusesurgery.errors import FuseSurgeryError
from fusesurgery.surgery import detect_checkpoint, load_decoder, load_encoder
from fusesurgery.surgery.fuse_plan import FuseOptions
from fusesurgery.surgery.fused import load_fused, read_fused_config
from fusesurgery.validate import validate_fused as validate
from fusesurgery.write.fuse_checkpoint import fuse
from fusesurgery.write.save_fused import save_fused
from fusesurgery.write.unfuse_checkpoint import unfuse_checkpoint as unfuse

__version__ = "0.1.0"

__all__ = [
    "DecoderConfig",
    "FuseOptions",
    "FuseSurgeryError",
    "FusionConfig",
    "RopeScaling",
    "VisionEncoderConfig",
    "__version__",
    "detect_checkpoint",
    "fuse",
    "load_decoder",
    "load_encoder",
    "load_fused",
    "read_fused_config",
    "save_fused",
    "unfuse",
    "validate",
]

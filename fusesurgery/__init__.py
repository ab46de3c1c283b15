"""fusesurgery: model surgery on pretrained checkpoints.

Fuse a pretrained encoder into a pretrained LLM decoder with zero-initialised gated
cross-attention, keep the original checkpoint keys, prove the fused model still computes what
the decoder computed, and write the result as sharded safetensors.
"""

from fusesurgery.config import DecoderConfig, FusionConfig, RopeScaling, VisionEncoderConfig
from fusesurgery.errors import FuseSurgeryError
from fusesurgery.surgery import detect_checkpoint, load_decoder, load_encoder

__version__ = "0.1.0"

__all__ = [
    "DecoderConfig",
    "FuseSurgeryError",
    "FusionConfig",
    "RopeScaling",
    "VisionEncoderConfig",
    "__version__",
    "detect_checkpoint",
    "load_decoder",
    "load_encoder",
]

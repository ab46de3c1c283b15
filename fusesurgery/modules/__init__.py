"""nn.Modules: the fusion wrappers and the decoder / encoder zoo they live in."""

from fusesurgery.modules.attention import MultiHeadAttention
from fusesurgery.modules.builders import (
    build_decoder,
    build_decoder_layer,
    build_deep_fusion_model,
    build_fusion_layer,
    build_projection,
    build_vision_encoder,
    fuse_decoder,
    init_non_persistent_buffers,
)
from fusesurgery.modules.feed_forward import ACTIVATIONS, FeedForward
from fusesurgery.modules.fusion import (
    DeepFusionModel,
    FusionEmbedding,
    FusionLayer,
    get_fusion_params,
    register_fusion_module,
    set_trainable_params,
)
from fusesurgery.modules.kv_cache import KVCache
from fusesurgery.modules.norms import RMSNorm, TanhGate
from fusesurgery.modules.projection import LinearProjection, MLPProjection
from fusesurgery.modules.rope import (
    RotaryPositionalEmbeddings,
    rope_attention_factor,
    rope_frequencies,
)
from fusesurgery.modules.summary import FusionSummary, fusion_summary
from fusesurgery.modules.transformer import (
    TransformerCrossAttentionLayer,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)
from fusesurgery.modules.vision import (
    ClassTokenEmbedding,
    ProjectedEncoder,
    TokenPositionalEmbedding,
    VisionTransformer,
)

__all__ = [
    "ACTIVATIONS",
    "ClassTokenEmbedding",
    "DeepFusionModel",
    "FeedForward",
    "FusionEmbedding",
    "FusionLayer",
    "FusionSummary",
    "KVCache",
    "LinearProjection",
    "MLPProjection",
    "MultiHeadAttention",
    "ProjectedEncoder",
    "RMSNorm",
    "RotaryPositionalEmbeddings",
    "TanhGate",
    "TokenPositionalEmbedding",
    "TransformerCrossAttentionLayer",
    "TransformerDecoder",
    "TransformerSelfAttentionLayer",
    "VisionTransformer",
    "build_decoder",
    "build_decoder_layer",
    "build_deep_fusion_model",
    "build_fusion_layer",
    "build_projection",
    "build_vision_encoder",
    "fuse_decoder",
    "fusion_summary",
    "get_fusion_params",
    "init_non_persistent_buffers",
    "register_fusion_module",
    "rope_attention_factor",
    "rope_frequencies",
    "set_trainable_params",
]

"""SigLIP's vision tower (SigLIP2 at a fixed resolution too: transformers stores it as
``siglip``): no class token, a biased patch convolution, tanh-GELU, its final LayerNorm on
every output token, and an attention-pooling head that fusion does not use.

transformers: ``SiglipVisionModel`` or the vision half of ``SiglipModel``; native: the CLIP
names (torchtune has no SigLIP); ``convert`` keeps the pooling head in a file beside the
native weights. Not SigLIP2 NaFlex (``siglip2``).
"""

from __future__ import annotations

from fusesurgery.families import clip, gemma3
from fusesurgery.families._spec import VisionFamily, frozen

FAMILY = VisionFamily(
    name="siglip",
    display_name="SigLIP",
    model_types=("siglip", "siglip_vision_model"),
    hf_model_type="siglip_vision_model",
    architectures=("SiglipVisionModel",),
    hf_config_keys=clip.HF_CONFIG_KEYS,
    # SiglipVisionConfig's defaults for what shapes cannot tell
    hf_defaults=frozen({"norm_eps": 1e-6, "activation": "gelu_tanh", "image_size": 224}),
    post_norm_hidden=True,
    hf_keys=frozen({
        **clip.HF_LAYER_KEYS,
        "vision_model.embeddings.patch_embedding.bias": "conv.bias",
    }),
    hf_dropped=frozen({
        **clip.HF_OTHER_TOWER,
        "vision_model.head.*": "SigLIP attention-pooling head, not used for fusion",
        "logit_bias": "contrastive logit bias",
    }),
    shape_markers=frozen({"cls_token_embedding.weight": False, "conv.weight": 4,
                          "layers.0.sa_scale.gamma": False}),
    # the final, post-normed hidden states, as PaliGemma
    encoder_layer_default=None,
    pooling_head=True,
    relatives=frozen({
        "aimv2": "RMSNorms, SwiGLU MLPs, no biases",
        "aimv2_vision_model": "RMSNorms, SwiGLU MLPs, no biases",
    }),
    # a full Gemma 3 checkpoint's tower, where a vision tower is asked for (fuse's ENCODER)
    hf_wrapped=(gemma3.VISION_PART,),
)

"""SigLIP2 NaFlex (transformers ``siglip2``): SigLIP's layers and names, but a linear patch
embedding over pre-cut patches (``[b, n_patches, c*p*p]``) and a position table resized per
image's patch grid, so an image keeps its aspect ratio and a variable number of tokens.

transformers: ``Siglip2VisionModel`` or the vision half of ``Siglip2Model``; native: the CLIP
names, the patch embedding a ``[d_e, c*p*p]`` linear weight; the pooling head is carried by
``convert`` as SigLIP's. (SigLIP2 at a fixed resolution is stored as ``siglip``.)
"""

from __future__ import annotations

from fusesurgery.families import siglip
from fusesurgery.families._spec import VisionFamily, frozen

FAMILY = VisionFamily(
    name="siglip2",
    display_name="SigLIP2 NaFlex",
    model_types=("siglip2", "siglip2_vision_model"),
    hf_model_type="siglip2_vision_model",
    architectures=("Siglip2VisionModel",),
    hf_config_keys=siglip.FAMILY.hf_config_keys,
    # Siglip2VisionConfig: 256 positions of 16-px patches, a 16 x 16 grid
    hf_defaults=frozen({"norm_eps": 1e-6, "activation": "gelu_tanh", "image_size": 256}),
    post_norm_hidden=True,
    hf_keys=siglip.FAMILY.hf_keys,
    hf_dropped=siglip.FAMILY.hf_dropped,
    # a linear patch embedding: a 2-d weight where the others have a 4-d convolution
    shape_markers=frozen({"conv.weight": 2}),
    encoder_layer_default=None,
    pooling_head=True,
    naflex=True,
)

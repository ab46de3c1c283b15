"""CLIP's vision tower: a class token, a LayerNorm before the layers, quick-GELU, its final
LayerNorm on the pooled class token only (so the hidden states that feed a fusion are un-normed).

transformers: ``CLIPVisionModel`` or the vision half of ``CLIPModel`` (transformers 4's
``vision_model.*`` and 5's bare names both read); native: torchtune's ``clip`` names.
"""

from __future__ import annotations

from fusesurgery.families._spec import VisionFamily, frozen

# config.json key -> VisionEncoderConfig field (the transformers spelling CLIP-shaped vision
# configs share; a two-tower config's ``vision_config`` section is read).
HF_CONFIG_KEYS = frozen({
    "image_size": "image_size",
    "patch_size": "patch_size",
    "hidden_size": "embed_dim",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_dim",
    "num_channels": "num_channels",
    "layer_norm_eps": "norm_eps",
})

# transformers key -> native key for one encoder layer and the final norm: what every
# CLIP-shaped tower shares.
HF_LAYER_KEYS = frozen({
    "vision_model.embeddings.patch_embedding.weight": "conv.weight",
    "vision_model.embeddings.position_embedding.weight":
        "token_pos_embedding.positional_embedding",
    "vision_model.encoder.layers.{i}.layer_norm1.weight": "layers.{i}.sa_norm.weight",
    "vision_model.encoder.layers.{i}.layer_norm1.bias": "layers.{i}.sa_norm.bias",
    "vision_model.encoder.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.q_proj.weight",
    "vision_model.encoder.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.q_proj.bias",
    "vision_model.encoder.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.k_proj.weight",
    "vision_model.encoder.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.k_proj.bias",
    "vision_model.encoder.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.v_proj.weight",
    "vision_model.encoder.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.v_proj.bias",
    "vision_model.encoder.layers.{i}.self_attn.out_proj.weight":
        "layers.{i}.attn.output_proj.weight",
    "vision_model.encoder.layers.{i}.self_attn.out_proj.bias": "layers.{i}.attn.output_proj.bias",
    "vision_model.encoder.layers.{i}.layer_norm2.weight": "layers.{i}.mlp_norm.weight",
    "vision_model.encoder.layers.{i}.layer_norm2.bias": "layers.{i}.mlp_norm.bias",
    "vision_model.encoder.layers.{i}.mlp.fc1.weight": "layers.{i}.mlp.w1.weight",
    "vision_model.encoder.layers.{i}.mlp.fc1.bias": "layers.{i}.mlp.w1.bias",
    "vision_model.encoder.layers.{i}.mlp.fc2.weight": "layers.{i}.mlp.w2.weight",
    "vision_model.encoder.layers.{i}.mlp.fc2.bias": "layers.{i}.mlp.w2.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight",
    "vision_model.post_layernorm.bias": "ln_post.bias",
})

# Keys of a whole two-tower checkpoint that are not the vision tower.
HF_OTHER_TOWER = frozen({
    "vision_model.embeddings.position_ids": "position index buffer, recomputed",
    "text_model.*": "text tower of a CLIP/SigLIP checkpoint",
    "logit_scale": "contrastive logit scale",
})

FAMILY = VisionFamily(
    name="clip",
    display_name="CLIP",
    model_types=("clip", "clip_vision_model"),
    hf_model_type="clip_vision_model",
    architectures=("CLIPVisionModel",),
    hf_config_keys=HF_CONFIG_KEYS,
    # CLIPVisionConfig's defaults for what shapes cannot tell
    hf_defaults=frozen({"norm_eps": 1e-5, "activation": "quick_gelu", "image_size": 224}),
    post_norm_hidden=False,
    hf_keys=frozen({
        **HF_LAYER_KEYS,
        "vision_model.embeddings.class_embedding": "cls_token_embedding.weight",
        "vision_model.pre_layrnorm.weight": "ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    }),
    hf_dropped=frozen({
        **HF_OTHER_TOWER,
        "text_projection.weight": "text projection of a CLIP checkpoint",
        "visual_projection.weight": "image-text projection of a CLIP checkpoint",
    }),
    shape_markers=frozen({"cls_token_embedding.weight": True, "conv.weight": 4,
                          "layers.0.sa_scale.gamma": False}),
    # the penultimate layer, as LLaVA
    encoder_layer_default=-2,
    torchtune_model="torchtune.models.clip",
    relatives=frozen({
    }),
)

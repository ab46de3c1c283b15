"""Configuration of a vision tower fused into a causal language model by gated cross-attention
(written by fusesurgery's ``convert --to transformers``; needs only transformers).

``text_config`` and ``vision_config`` are the sources' own transformers configs; the other
fields are what fusion added: where the gated cross-attention layers go, their norms'
epsilons, the projection head and the new tokens.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

try:  # transformers >= 5.x: sub-configs declared with a default model type
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # pragma: no cover - older transformers
    SubConfigSpec = None

MODEL_TYPE = "fusesurgery_fused"


class FusedVisionTextConfig(PretrainedConfig):
    """A fused vision-language model's config.

    Args:
        text_config: the decoder's own config (``LlamaConfig``, ``Qwen2Config``, ...).
        vision_config: the vision tower's own config (``CLIPVisionConfig``, ...).
        fusion_layers: decoder layers that carry a gated cross-attention layer.
        fusion_first: the cross-attention layer runs before its decoder layer (else after).
        ca_norm_eps: epsilon of the cross-attention layers' RMSNorms over ``d``.
        qk_norm_eps: epsilon of the per-head q/k RMSNorms.
        fusion_norm_unit_offset: every RMSNorm of the cross-attention layers scales by
            ``1 + w`` (a Gemma decoder's kind, ``w`` starting at zero), not by ``w``.
        fusion_num_heads: query heads of the cross-attention.
        fusion_num_kv_heads: key/value heads of the cross-attention.
        fusion_head_dim: head width of the cross-attention.
        fusion_intermediate_size: hidden width of the cross-attention layers' SwiGLU.
        hidden_size: the decoder width ``d``.
        vision_hidden_size: the tower's width ``d_e``.
        text_vocab_size: rows of the decoder's own embedding table; token ids from here on
            read the fusion embedding.
        fusion_vocab_size: the new tokens (``text_vocab_size + i``).
        image_token_id: the token whose position and later text attend to the image.
        projection: ``mlp`` (two layers, GELU) or ``linear``.
        vision_feature_layer: ``hidden_states`` index of the tower that feeds the projection,
            or None for its ``last_hidden_state``.
        encoder_tokens: which of the tower's output tokens (class tokens, registers, patches,
            in that order) feed the projection: ``all``, ``cls_and_patches`` (registers left
            out) or ``patches``.
        vision_num_cls_tokens: class tokens at the start of the tower's output.
        vision_num_register_tokens: register tokens after them (DINOv2 with registers,
            DINOv3).
        vision_naflex: the tower takes NaFlex inputs (SigLIP2): ``pixel_values``
            ``[b, n_patches, c*p*p]`` with ``pixel_attention_mask`` and ``spatial_shapes``;
            padding patches are masked out of the cross-attention.
        decoder_trainable: the text model's parameters train (torchtune's default: frozen).
        encoder_trainable: the tower's parameters train (default: frozen).
        fusion_trainable: what fusion added trains (default: it does).
    """

    model_type = MODEL_TYPE
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
            "vision_config": SubConfigSpec(config_class=AutoConfig,
                                           model_type="clip_vision_model"),
        }
    else:  # pragma: no cover
        sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    text_config: dict | PretrainedConfig | None = None
    vision_config: dict | PretrainedConfig | None = None
    fusion_layers: list[int] | None = None
    fusion_first: bool = True
    ca_norm_eps: float = 1e-5
    qk_norm_eps: float = 1e-5
    fusion_norm_unit_offset: bool = False
    fusion_num_heads: int = 1
    fusion_num_kv_heads: int = 1
    fusion_head_dim: int = 1
    fusion_intermediate_size: int = 1
    hidden_size: int = 1
    vision_hidden_size: int = 1
    text_vocab_size: int = 1
    fusion_vocab_size: int = 1
    image_token_id: int | None = None
    projection: str = "mlp"
    vision_feature_layer: int | None = None
    encoder_tokens: str = "all"
    vision_num_cls_tokens: int = 0
    vision_num_register_tokens: int = 0
    vision_naflex: bool = False
    tie_word_embeddings: bool = False
    decoder_trainable: bool = False
    encoder_trainable: bool = False
    fusion_trainable: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.fusion_layers = list(self.fusion_layers or [])
        if self.projection not in ("mlp", "linear"):
            raise ValueError(f"projection must be 'mlp' or 'linear', not {self.projection!r}")
        if self.encoder_tokens not in ("all", "cls_and_patches", "patches"):
            raise ValueError("encoder_tokens must be 'all', 'cls_and_patches' or 'patches', "
                             f"not {self.encoder_tokens!r}")
        if self.text_config is not None:
            self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings",
                                                    False))


# save_pretrained writes these files beside the weights (and auto_map), so a saved model
# loads with transformers alone as the export did
FusedVisionTextConfig.register_for_auto_class()

__all__ = ["MODEL_TYPE", "FusedVisionTextConfig"]

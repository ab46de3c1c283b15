"""Builders: models from the frozen configs in ``fusesurgery.config``."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from fusesurgery.config import DecoderConfig, FusionConfig, VisionEncoderConfig
from fusesurgery.modules._init import embedding
from fusesurgery.modules.attention import MultiHeadAttention
from fusesurgery.modules.feed_forward import FeedForward
from fusesurgery.modules.fusion import DeepFusionModel, FusionEmbedding, FusionLayer
from fusesurgery.modules.norms import NestedRMSNorm, RMSNorm, TanhGate
from fusesurgery.modules.projection import LinearProjection, MLPProjection
from fusesurgery.modules.rope import RotaryPositionalEmbeddings
from fusesurgery.modules.transformer import (
    TransformerCrossAttentionLayer,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)
from fusesurgery.modules.vision import (
    ClassTokenEmbedding,
    LayerScale,
    MaskToken,
    NaFlexVisionTransformer,
    PatchRotaryEmbedding,
    ProjectedEncoder,
    RegisterTokens,
    TokenPositionalEmbedding,
    VisionTransformer,
)

ProjectionKind = Literal["linear", "mlp"]


def _swiglu(dim: int, hidden_dim: int, activation: str = "silu") -> FeedForward:
    """The gated MLP: SwiGLU (``silu``) or GeGLU (``gelu_tanh``)."""
    return FeedForward(
        w1=nn.Linear(dim, hidden_dim, bias=False),
        w2=nn.Linear(hidden_dim, dim, bias=False),
        w3=nn.Linear(dim, hidden_dim, bias=False),
        activation=activation,
    )


def build_rope(cfg: DecoderConfig, local: bool = False) -> RotaryPositionalEmbeddings:
    """The decoder's RoPE, in the pairing of the family's native layout (``cfg.rope_style``),
    its output in the half order (attention's sums then run as transformers' do); ``local``:
    the sliding layers' own (``cfg.local_rope_base``, no scaling)."""
    if local and cfg.local_rope_base is not None:
        return RotaryPositionalEmbeddings(cfg.head_dim, cfg.max_seq_len, cfg.local_rope_base,
                                          None, style=cfg.rope_style, rotary_dim=cfg.rotary_dim,
                                          half_order_output=True)
    return RotaryPositionalEmbeddings(cfg.head_dim, cfg.max_seq_len, cfg.rope_base,
                                      cfg.rope_scaling, style=cfg.rope_style,
                                      rotary_dim=cfg.rotary_dim, half_order_output=True)


def _norm(cfg: DecoderConfig, dim: int) -> RMSNorm:
    return RMSNorm(dim, cfg.norm_eps, unit_offset=cfg.norm_unit_offset)


def _final_norm(cfg: DecoderConfig) -> RMSNorm | NestedRMSNorm:
    """The final norm, under the family's native key (``norm.scale`` or torchtune's Gemma 2
    ``norm.rms_norm.scale``)."""
    norm = _norm(cfg, cfg.embed_dim)
    if cfg.final_norm_key == "norm.scale":
        return norm
    if cfg.final_norm_key == "norm.rms_norm.scale":
        return NestedRMSNorm(norm)
    raise ValueError(f"final norm key {cfg.final_norm_key!r} has no module")


def build_decoder_layer(
    cfg: DecoderConfig, rope: RotaryPositionalEmbeddings | None = None,
    layer_index: int | None = None, local_rope: RotaryPositionalEmbeddings | None = None,
) -> TransformerSelfAttentionLayer:
    """One self-attention decoder layer of ``cfg``'s shape.

    Args:
        cfg: the decoder config.
        rope: a RoPE module to share (``build_decoder`` gives every layer the same one, as
            torchtune does: one ``[max_seq_len, h_d/2, 2]`` table rather than one per layer,
            which at Llama 3.1's 131072 positions is 33 MB a layer); None builds one.
        layer_index: the layer's index: one of ``cfg.no_rope_layers`` gets no RoPE (its
            queries and keys are not rotated), one of ``cfg.sliding_layers`` its window and
            the local RoPE; None builds a layer with RoPE and no window.
        local_rope: the sliding layers' RoPE to share when ``cfg.local_rope_base`` is set;
            None builds one.
    """
    d, n_h, n_kv, h_d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    window = None if layer_index is None else cfg.layer_window(layer_index)
    if layer_index is not None and layer_index in cfg.no_rope_layers:
        rope = None
    elif window is not None and cfg.local_rope_base is not None:
        rope = local_rope if local_rope is not None else build_rope(cfg, local=True)
    else:
        rope = rope if rope is not None else build_rope(cfg)
    attn = MultiHeadAttention(
        embed_dim=d,
        num_heads=n_h,
        num_kv_heads=n_kv,
        head_dim=h_d,
        q_proj=nn.Linear(d, n_h * h_d, bias=cfg.attn_bias),
        k_proj=nn.Linear(d, n_kv * h_d, bias=cfg.attn_bias),
        v_proj=nn.Linear(d, n_kv * h_d, bias=cfg.attn_bias),
        output_proj=nn.Linear(n_h * h_d, d, bias=False),
        pos_embeddings=rope,
        q_norm=_norm(cfg, h_d) if cfg.qk_norm else None,
        k_norm=_norm(cfg, h_d) if cfg.qk_norm else None,
        is_causal=True,
        scale=None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5,
        sliding_window=window,
        softcap=cfg.attn_softcap,
    )
    return TransformerSelfAttentionLayer(
        attn=attn,
        mlp=_swiglu(d, cfg.intermediate_dim, cfg.mlp_activation),
        sa_norm=_norm(cfg, d),
        mlp_norm=_norm(cfg, d),
        # Gemma's post-attention and post-feedforward norms sit where torchtune's Gemma 2
        # puts them: on each branch before its residual add
        sa_scale=_norm(cfg, d) if cfg.post_norms else None,
        mlp_scale=_norm(cfg, d) if cfg.post_norms else None,
    )


def build_decoder(cfg: DecoderConfig) -> TransformerDecoder:
    """A plain (unfused) decoder; keys follow SPEC.md section 4's native column."""
    rope = build_rope(cfg)
    local_rope = build_rope(cfg, local=True) if (
        cfg.sliding_layers and cfg.local_rope_base is not None) else None
    return TransformerDecoder(
        tok_embeddings=embedding(cfg.vocab_size, cfg.embed_dim),
        layers=[build_decoder_layer(cfg, rope, i, local_rope) for i in range(cfg.num_layers)],
        norm=_final_norm(cfg),
        output=None if cfg.tie_word_embeddings else nn.Linear(cfg.embed_dim, cfg.vocab_size,
                                                              bias=False),
        max_seq_len=cfg.max_seq_len,
        embed_scale=cfg.embed_dim**0.5 if cfg.embed_scale else None,
        final_softcap=cfg.final_softcap,
    )


def build_fusion_layer(cfg: DecoderConfig, fusion: FusionConfig) -> TransformerCrossAttentionLayer:
    """A gated cross-attention layer sized from the decoder: same heads, head width and MLP
    width (a SwiGLU MLP, whatever the decoder's), keys and values projected from
    ``fusion.encoder_dim``, q/k RMSNorms, gates at 0; every norm of the kind
    ``fusion.norm_unit_offset`` says (a Gemma decoder's own ``(1 + w)`` kind). Its attention
    computes in float32 on the CPU (``MultiHeadAttention``'s ``cpu_float32``), as the
    transformers export's does."""
    d, n_h, n_kv, h_d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = MultiHeadAttention(
        embed_dim=d,
        num_heads=n_h,
        num_kv_heads=n_kv,
        head_dim=h_d,
        q_proj=nn.Linear(d, n_h * h_d, bias=False),
        k_proj=nn.Linear(fusion.encoder_dim, n_kv * h_d, bias=False),
        v_proj=nn.Linear(fusion.encoder_dim, n_kv * h_d, bias=False),
        output_proj=nn.Linear(n_h * h_d, d, bias=False),
        q_norm=RMSNorm(h_d, fusion.qk_norm_eps, unit_offset=fusion.norm_unit_offset),
        k_norm=RMSNorm(h_d, fusion.qk_norm_eps, unit_offset=fusion.norm_unit_offset),
        is_causal=False,
        cpu_float32=True,  # a bf16 decoding step's image attention, ~6-9x cheaper on CPU
    )
    return TransformerCrossAttentionLayer(
        attn=attn,
        mlp=_swiglu(d, cfg.intermediate_dim),
        ca_norm=RMSNorm(d, fusion.ca_norm_eps, unit_offset=fusion.norm_unit_offset),
        mlp_norm=RMSNorm(d, fusion.ca_norm_eps, unit_offset=fusion.norm_unit_offset),
        ca_scale=TanhGate(),
        mlp_scale=TanhGate(),
    )


def fuse_decoder(
    decoder: TransformerDecoder, cfg: DecoderConfig, fusion: FusionConfig
) -> TransformerDecoder:
    """Wrap ``decoder`` in place: fusion layers at ``fusion.fusion_layers`` and, if
    ``fusion.fusion_vocab_size`` > 0, a ``FusionEmbedding`` that keeps the original table.

    New parameters are created on the device of the original embedding table; the original
    modules (and their tensors) are reused, not copied.

    Raises:
        ValueError: a fusion layer index is out of range, or the decoder is already fused there.
    """
    bad = [i for i in fusion.fusion_layers if i >= len(decoder.layers)]
    if bad:
        raise ValueError(f"fusion layers {bad} out of range for {len(decoder.layers)} layers")
    device = decoder.tok_embeddings.weight.device
    with torch.device(device):
        for i in fusion.fusion_layers:
            if isinstance(decoder.layers[i], FusionLayer):
                raise ValueError(f"decoder layer {i} already carries a fusion layer")
            decoder.layers[i] = FusionLayer(
                decoder.layers[i], build_fusion_layer(cfg, fusion), fusion.fusion_first
            )
        if fusion.fusion_vocab_size > 0:
            original = decoder.tok_embeddings
            embedding = FusionEmbedding(
                original.num_embeddings, fusion.fusion_vocab_size, original.embedding_dim
            )
            embedding.embedding = original
            embedding.fusion_embedding.to(original.weight.dtype)
            decoder.tok_embeddings = embedding
    return decoder


def build_vision_encoder(cfg: VisionEncoderConfig) -> VisionTransformer:
    """A ViT matching a CLIP, SigLIP, SigLIP2 NaFlex, DINOv2 or DINOv3 vision tower described
    by ``cfg``."""
    d = cfg.embed_dim
    h_d = d // cfg.num_heads
    rope = None if cfg.patch_rope_base is None else PatchRotaryEmbedding(h_d, cfg.patch_rope_base)

    def layer() -> TransformerSelfAttentionLayer:
        attn = MultiHeadAttention(
            embed_dim=d,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_heads,
            head_dim=h_d,
            q_proj=nn.Linear(d, d),
            k_proj=nn.Linear(d, d, bias=cfg.key_bias),
            v_proj=nn.Linear(d, d),
            output_proj=nn.Linear(d, d),
            pos_embeddings=rope,
            is_causal=False,
        )
        mlp = FeedForward(
            w1=nn.Linear(d, cfg.intermediate_dim),
            w2=nn.Linear(cfg.intermediate_dim, d),
            activation=cfg.activation,
        )
        return TransformerSelfAttentionLayer(
            attn=attn,
            mlp=mlp,
            sa_norm=nn.LayerNorm(d, eps=cfg.norm_eps),
            mlp_norm=nn.LayerNorm(d, eps=cfg.norm_eps),
            sa_scale=LayerScale(d) if cfg.layer_scale else None,
            mlp_scale=LayerScale(d) if cfg.layer_scale else None,
        )

    batch_dim = cfg.batch_dim_tables
    patch_width = cfg.num_channels * cfg.patch_size**2
    return (NaFlexVisionTransformer if cfg.naflex else VisionTransformer)(
        conv=nn.Linear(patch_width, d, bias=cfg.patch_bias) if cfg.naflex else nn.Conv2d(
            cfg.num_channels, d, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias),
        layers=[layer() for _ in range(cfg.num_layers)],
        token_pos_embedding=None if rope is not None else TokenPositionalEmbedding(
            cfg.num_positions, d, batch_dim=batch_dim, antialias=cfg.position_antialias),
        ln_post=nn.LayerNorm(d, eps=cfg.norm_eps),
        cls_token_embedding=ClassTokenEmbedding(d, batch_dim=batch_dim)
        if cfg.class_token else None,
        ln_pre=nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.pre_norm else None,
        post_norm_hidden=cfg.post_norm_hidden,
        output_layer=cfg.output_layer,
        register_tokens=RegisterTokens(cfg.num_register_tokens, d)
        if cfg.num_register_tokens else None,
        mask_token=MaskToken(d, batch_dim=cfg.family == "dinov3") if cfg.mask_token else None,
        feature_tokens=cfg.feature_tokens,
        patch_rope=rope,
    )


def build_projection(kind: ProjectionKind, in_dim: int, out_dim: int) -> nn.Module:
    """A projection head (a fusion module): ``linear`` or ``mlp`` (2 layers, GELU).

    Raises:
        ValueError: unknown kind.
    """
    if kind == "linear":
        return LinearProjection(in_dim, out_dim)
    if kind == "mlp":
        return MLPProjection(in_dim, out_dim)
    raise ValueError(f"unknown projection kind {kind!r}; valid: linear, mlp")


def build_deep_fusion_model(
    decoder_cfg: DecoderConfig,
    vision_cfg: VisionEncoderConfig,
    fusion: FusionConfig,
    *,
    projection: ProjectionKind = "linear",
    **trainable: bool,
) -> DeepFusionModel:
    """A fresh fused model: ViT + projection head into a decoder with fusion layers.

    ``fusion.encoder_dim`` must equal the decoder width (the projection head's output).

    Raises:
        ValueError: ``fusion.encoder_dim`` differs from ``decoder_cfg.embed_dim``.
    """
    if fusion.encoder_dim != decoder_cfg.embed_dim:
        raise ValueError(
            f"fusion.encoder_dim {fusion.encoder_dim} must equal the decoder width "
            f"{decoder_cfg.embed_dim}: the projection head maps into it"
        )
    decoder = fuse_decoder(build_decoder(decoder_cfg), decoder_cfg, fusion)
    encoder = ProjectedEncoder(
        build_vision_encoder(vision_cfg),
        build_projection(projection, vision_cfg.embed_dim, decoder_cfg.embed_dim),
    )
    return DeepFusionModel(decoder, encoder, **trainable)


def init_non_persistent_buffers(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Compute buffers that no checkpoint holds (RoPE tables) on ``device``; call after
    building on the meta device and loading with ``assign=True``."""
    for module in model.modules():
        if isinstance(module, RotaryPositionalEmbeddings):
            module.reset_parameters(device)

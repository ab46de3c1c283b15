"""Model configurations: frozen dataclasses plus exact-name presets.

Every layer of fusesurgery speaks these types: ``convert`` reads them out of config.json /
params.json, ``modules`` builds models from them, ``surgery`` plans with them. Derived fields
(``num_kv_heads``, ``head_dim``) are filled in ``__post_init__`` so a config is always whole.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, get_args

from fusesurgery.errors import ConfigError
from fusesurgery.families import DECODER_FAMILIES, VISION_FAMILIES, native_rope_styles
from fusesurgery.families._spec import RopeStyle

# The families are the files of fusesurgery.families; these admit exactly their names.
DecoderFamily = Literal[tuple(DECODER_FAMILIES)]  # type: ignore[valid-type]
VisionFamily = Literal[tuple(VISION_FAMILIES)]  # type: ignore[valid-type]
# Which of a tower's output tokens feed the fusion: every token, the class token and the
# patches (registers left out, as the papers that fuse DINOv2 do), or the patches alone.
FeatureTokens = Literal["all", "cls_and_patches", "patches"]
Activation = Literal["quick_gelu", "gelu", "gelu_tanh"]
# A decoder MLP's gate activation: SwiGLU (Llama) or GeGLU with tanh-approximate GELU (Gemma).
MlpActivation = Literal["silu", "gelu_tanh"]


RopeType = Literal["linear", "dynamic", "yarn", "longrope", "llama3"]

# The fields each RoPE scaling reads (transformers' ROPE_INIT_FUNCTIONS take the same ones from
# a config's rope_scaling / rope_parameters); any other field of a RopeScaling stays None.
ROPE_TYPE_FIELDS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    "longrope": ("factor", "original_max_position_embeddings", "attention_factor",
                 "short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}
assert set(ROPE_TYPE_FIELDS) == set(get_args(RopeType)), "a RoPE type lacks its fields"
# Fields a type needs; Llama 3.1's own values fill those a bare RopeScaling(factor=...) omits.
_ROPE_REQUIRED: dict[str, tuple[str, ...]] = {
    "linear": (), "dynamic": ("original_max_position_embeddings",),
    "yarn": ("original_max_position_embeddings",),
    "longrope": ("original_max_position_embeddings", "short_factor", "long_factor"),
    "llama3": (),
}
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE frequency scaling, one of transformers' ``rope_type``s (the fields each type
    reads are :data:`ROPE_TYPE_FIELDS`; the others stay None).

    - ``linear``: every frequency divided by ``factor``.
    - ``dynamic`` (NTK): past ``original_max_position_embeddings`` positions (transformers:
      the config's ``max_position_embeddings``) the base grows with the sequence length.
    - ``yarn``: frequencies blended between interpolated and extrapolated by wavelength
      (``beta_fast``, ``beta_slow``, ``truncate``); cos/sin scaled by ``attention_factor``
      (derived from ``factor``, ``mscale``, ``mscale_all_dim`` when not given).
    - ``longrope``: per-frequency ``short_factor`` up to ``original_max_position_embeddings``
      positions, ``long_factor`` past them; cos/sin scaled by ``attention_factor``.
    - ``llama3`` (Llama 3.1): long wavelengths divided by ``factor``, short ones kept, a
      smooth blend between ``low_freq_factor`` and ``high_freq_factor``.

    Raises:
        ConfigError: an unknown type, a field the type does not read, a missing one, or a
            value out of its domain (factors and betas positive, ``factor`` at least 1,
            ``beta_fast`` not below ``beta_slow``, ``high_freq_factor`` above
            ``low_freq_factor``, ``short_factor`` and ``long_factor`` of one length).
    """

    factor: float = 8.0
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    rope_type: RopeType = "llama3"
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPE_FIELDS:
            raise ConfigError(f"rope_type {self.rope_type!r} is not a supported RoPE scaling; "
                              f"supported: {', '.join(ROPE_TYPE_FIELDS)} (plain RoPE: no "
                              "scaling, null)")
        if self.rope_type == "llama3":
            for name, value in _LLAMA3_DEFAULTS.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        uses = ROPE_TYPE_FIELDS[self.rope_type]
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if spec.name in uses or spec.name == "rope_type":
                if value is None and spec.name in _ROPE_REQUIRED[self.rope_type]:
                    raise _field_error(self, spec.name, value, f"set for {self.rope_type} "
                                       "scaling")
            elif value is not None:
                raise _field_error(self, spec.name, value,
                                   f"null for {self.rope_type} scaling (it does not read it)")
        check_field_values(self)
        # transformers 5.25's rope validation warns on these and builds the model anyway; a
        # factor below 1 shrinks the context it claims to extend, beta_fast under beta_slow
        # inverts YaRN's ramp: refused here, whichever file or option gave them.
        if self.factor < 1:
            raise _field_error(self, "factor", self.factor,
                               "at least 1 (a RoPE scaling extends the context)")
        if self.rope_type == "yarn" and (self.beta_fast or 32.0) < (self.beta_slow or 1.0):
            raise ConfigError(f"RopeScaling.beta_fast {self.beta_fast or 32.0:g} is below "
                              f"beta_slow {self.beta_slow or 1.0:g} (unset: 32 and 1): YaRN "
                              "needs beta_fast >= beta_slow")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise _field_error(self, "high_freq_factor", self.high_freq_factor,
                               f"above low_freq_factor {self.low_freq_factor}")
        if self.rope_type == "longrope" and len(self.short_factor) != len(self.long_factor):
            raise ConfigError(f"RopeScaling.long_factor has {len(self.long_factor)} values "
                              f"and short_factor {len(self.short_factor)}: longrope needs one "
                              "of each per rotated pair")

    def summary(self) -> str:
        """One line: ``yarn x4 (orig 32768)``, ``llama3 x8 (low 1, high 4, orig 8192)``."""
        short = {"low_freq_factor": "low", "high_freq_factor": "high",
                 "original_max_position_embeddings": "orig"}
        parts = []
        for name, value in self.parameters().items():
            if name in ("rope_type", "factor"):
                continue
            if isinstance(value, list):
                value = f"[{len(value)} values]"
            elif isinstance(value, float):
                value = f"{value:g}"
            parts.append(f"{short.get(name, name)} {value}")
        return f"{self.rope_type} x{self.factor:g} ({', '.join(parts)})" if parts else (
            f"{self.rope_type} x{self.factor:g}")

    def parameters(self) -> dict[str, object]:
        """The fields this type reads that are set, ``rope_type`` first (as config.json
        states them, lists for the per-frequency factors)."""
        out: dict[str, object] = {"rope_type": self.rope_type}
        for name in ROPE_TYPE_FIELDS[self.rope_type]:
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out


# The RoPE pairing of each decoder family's native layout (each family file's
# ``native_rope_style``): what torchtune's own model and checkpoint converter for the family
# use, so a native checkpoint is torchtune's, values included. "interleaved" rotates
# (x[2j], x[2j+1]) (Meta's reference code; torchtune's Llama and Mistral converters permute
# Hugging Face's q/k rows into this order); "half" rotates (x[j], x[j + h_d/2]) as
# transformers does (torchtune's Qwen2 and Qwen3 keep Hugging Face's rows).
NATIVE_ROPE_STYLE: dict[str, RopeStyle] = native_rope_styles()


@dataclass(frozen=True)
class DecoderConfig:
    """A Llama-shaped decoder (Llama 2/3/3.x, Mistral, Qwen2, Qwen3, SmolLM3, Gemma 2 and 3).

    Args:
        vocab_size: rows of the token embedding table.
        embed_dim: model width ``d``.
        num_layers: number of self-attention layers.
        num_heads: query heads ``n_h``.
        intermediate_dim: hidden width of the SwiGLU MLP.
        num_kv_heads: key/value heads ``n_kv`` (GQA); defaults to ``num_heads``.
        head_dim: per-head width ``h_d``; defaults to ``embed_dim // num_heads``.
        max_seq_len: longest sequence the RoPE cache and KV caches are built for.
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE theta.
        rope_scaling: a RoPE scaling (:class:`RopeScaling`), or None for plain RoPE.
        attn_bias: q/k/v projections carry a bias (Qwen2).
        qk_norm: each query and key head is RMSNormed over ``h_d`` (epsilon ``norm_eps``, one
            ``[h_d]`` scale per layer for q and one for k) before RoPE (Qwen3).
        tie_word_embeddings: the output projection reuses the embedding table.
        family: the architecture family, for display and key maps.
        no_rope_layers: indices of the layers whose self-attention applies no RoPE
            (SmolLM3: every 4th layer); empty for every other family.
        norm_unit_offset: every RMSNorm scales by ``1 + w`` (its weight stored as the
            offset from one) and multiplies in float32 before the cast back (Gemma).
        post_norms: each layer norms its attention and MLP outputs before the residual add
            (Gemma's post-attention and post-feedforward norms: four norms a layer).
        embed_scale: the embeddings are multiplied by ``sqrt(embed_dim)``, that factor first
            rounded to the embedding dtype as transformers' Gemma does.
        mlp_activation: the gate activation of the MLP: ``silu`` (SwiGLU) or ``gelu_tanh``
            (GeGLU with tanh-approximate GELU).
        query_pre_attn_scalar: attention scores are scaled by ``query_pre_attn_scalar**-0.5``
            rather than ``head_dim**-0.5`` (Gemma); None for the latter.
        attn_softcap: attention scores pass ``cap * tanh(score / cap)`` before the mask
            (Gemma 2); None for none.
        final_softcap: the logits pass ``cap * tanh(logit / cap)`` (Gemma 2, Gemma 3 where
            configured); None for none.
        sliding_window: the window ``w`` of the layers in ``sliding_layers``: a query at
            position ``p`` sees the keys at ``p - w + 1 .. p``. None: no window.
        sliding_layers: indices of the layers that attend through ``sliding_window`` (Gemma
            3: five of every six); the others attend to every earlier token.
        local_rope_base: RoPE theta of the ``sliding_layers``, which then apply no RoPE
            scaling (Gemma 3's ``rope_local_base_freq``); None: every layer uses
            ``rope_base`` and ``rope_scaling``.
        partial_rotary_factor: the fraction of each head RoPE turns (Phi-4-mini: 0.75): the
            first ``rotary_dim = int(head_dim * factor)`` dims (even), the rest pass as they
            are, as transformers' Phi-3 does; 1 for every other family.
    """

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    intermediate_dim: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    rope_base: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    attn_bias: bool = False
    tie_word_embeddings: bool = False
    family: DecoderFamily = "llama"
    qk_norm: bool = False
    no_rope_layers: tuple[int, ...] = ()
    norm_unit_offset: bool = False
    post_norms: bool = False
    embed_scale: bool = False
    mlp_activation: MlpActivation = "silu"
    query_pre_attn_scalar: int | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    local_rope_base: float | None = None
    partial_rotary_factor: float = 1.0

    def __post_init__(self) -> None:
        check_field_values(self)
        for name in ("no_rope_layers", "sliding_layers"):
            layers = getattr(self, name)
            if not isinstance(layers, (tuple, list)) or not all(_is_int(i) for i in layers) or (
                    sorted(set(layers)) != list(layers)) or any(
                        not 0 <= i < self.num_layers for i in layers):
                raise _field_error(self, name, layers,
                                   f"ascending distinct layer indices below {self.num_layers}")
            object.__setattr__(self, name, tuple(layers))
        if self.sliding_layers and self.sliding_window is None:
            raise _field_error(self, "sliding_window", None,
                               f"set for the sliding layers {list(self.sliding_layers)}")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.embed_dim % self.num_heads:
                raise _field_error(self, "num_heads", self.num_heads,
                                   f"a divisor of embed_dim {self.embed_dim} (or give head_dim)")
            object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise _field_error(self, "num_kv_heads", self.num_kv_heads,
                               f"a divisor of num_heads {self.num_heads}")
        rotary = self.rotary_dim
        if self.partial_rotary_factor > 1 or rotary < 2 or rotary % 2:
            raise _field_error(self, "partial_rotary_factor", self.partial_rotary_factor,
                               f"at most 1, turning an even number of dims (at least 2) of "
                               f"head_dim {self.head_dim}, not {rotary}")
        scaling = self.rope_scaling
        if scaling is not None and scaling.rope_type == "longrope" and (
                len(scaling.short_factor) != rotary // 2):
            dims = (f"head_dim {self.head_dim}" if rotary == self.head_dim
                    else f"{rotary} rotated dims of head_dim {self.head_dim}")
            error = ConfigError(f"longrope scaling has {len(scaling.short_factor)} factors per "
                                f"list, {dims} needs {rotary // 2} (one per rotated pair)")
            error.field = "rope_scaling"
            raise error
        if scaling is not None and scaling.rope_type == "dynamic" and self.head_dim <= 2:
            raise _field_error(self, "head_dim", self.head_dim,
                               "above 2 for dynamic RoPE scaling")

    @property
    def rope_style(self) -> RopeStyle:
        """The RoPE pairing of this family's native layout (see ``NATIVE_ROPE_STYLE``)."""
        return NATIVE_ROPE_STYLE[self.family]

    @property
    def final_norm_key(self) -> str:
        """The native key of the final norm's weight (the family's ``native_final_norm``)."""
        return DECODER_FAMILIES[self.family].native_final_norm

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of decoder layer ``layer``, or None when it sees every earlier
        token."""
        return self.sliding_window if layer in self.sliding_layers else None

    @property
    def rotary_dim(self) -> int:
        """The dims of each head RoPE turns: ``int(head_dim * partial_rotary_factor)``, as
        transformers derives them."""
        return int(self.head_dim * self.partial_rotary_factor)

    def replace(self, **changes) -> DecoderConfig:
        """Return a copy with ``changes`` applied (derived fields recomputed if not given)."""
        return dataclasses.replace(self, **changes)


# Towers whose class token and position table keep a leading batch dim (DINOv2, DINOv3), and
# towers that take pre-cut patches (SigLIP2 NaFlex: a linear patch embedding over
# ``[b, n_patches, c*p*p]``, the position table resized per image's patch grid): from the
# family files' ``batch_dim_tables`` and ``naflex``.
BATCH_DIM_VISION_FAMILIES: tuple[str, ...] = tuple(
    name for name, family in VISION_FAMILIES.items() if family.batch_dim_tables)
NAFLEX_VISION_FAMILIES: tuple[str, ...] = tuple(
    name for name, family in VISION_FAMILIES.items() if family.naflex)


@dataclass(frozen=True)
class VisionEncoderConfig:
    """A ViT vision tower that reproduces CLIP's and SigLIP's.

    Args:
        image_size: input side in pixels.
        patch_size: patch side in pixels.
        embed_dim: width ``d_e``.
        num_layers: transformer layers.
        num_heads: attention heads.
        intermediate_dim: MLP hidden width.
        num_channels: image channels.
        norm_eps: LayerNorm epsilon (CLIP 1e-5, SigLIP 1e-6).
        activation: MLP activation (CLIP ``quick_gelu``, SigLIP ``gelu_tanh``).
        class_token: prepend a learned class token (CLIP yes, SigLIP no).
        patch_bias: the patch convolution has a bias (SigLIP yes, CLIP no).
        pre_norm: LayerNorm after the embeddings (CLIP's ``pre_layrnorm``).
        post_norm_hidden: apply the final LayerNorm to the returned hidden states (SigLIP does;
            CLIP applies it only to the pooled class token, so its hidden states are un-normed).
        output_layer: return the hidden states after this many layers (``hidden_states[k]`` in
            transformers' numbering, 0 = embeddings; negative counts from the end, -1 = last
            layer). None returns the final hidden states.
        family: the architecture family, for display and key maps.
        layer_scale: each layer scales its attention and MLP outputs by a learned per-channel
            vector before the residual add (DINOv2's LayerScale).
        num_register_tokens: learned register tokens inserted after the class token, after
            the position embedding (DINOv2 with registers); 0 for none.
        mask_token: the checkpoint holds a mask token (DINOv2's masked-image pre-training).
            The model keeps it so that conversions give it back, and never uses it.
        position_antialias: resize the position table for another patch grid with an
            antialiased bicubic filter (DINOv2 with registers) rather than a plain one.
        feature_tokens: which output tokens the tower returns: ``all``, ``cls_and_patches``
            (registers left out) or ``patches``.
        patch_rope_base: DINOv3: no position table; the patch tokens' queries and keys are
            rotated by a 2-D RoPE of this base over the patch centres' coordinates in
            ``[-1, 1]`` (the class token and registers are not). None: a learned table.
        key_bias: the key projection has a bias (DINOv3 has none).
    """

    image_size: int
    patch_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    intermediate_dim: int
    num_channels: int = 3
    norm_eps: float = 1e-5
    activation: Activation = "quick_gelu"
    class_token: bool = True
    patch_bias: bool = False
    pre_norm: bool = True
    post_norm_hidden: bool = False
    output_layer: int | None = None
    family: VisionFamily = "clip"
    layer_scale: bool = False
    num_register_tokens: int = 0
    mask_token: bool = False
    position_antialias: bool = False
    feature_tokens: FeatureTokens = "all"
    patch_rope_base: float | None = None
    key_bias: bool = True

    def __post_init__(self) -> None:
        check_field_values(self)
        # image_size need not be a multiple of patch_size: the stride-p convolution floors
        # (SigLIP so400m: 384 px, 14 px patches -> 27 x 27).
        if self.embed_dim % self.num_heads:
            raise _field_error(self, "num_heads", self.num_heads,
                               f"a divisor of embed_dim {self.embed_dim}")
        if self.output_layer is not None and not (
            -self.num_layers - 1 <= self.output_layer <= self.num_layers
        ):
            raise ConfigError(
                f"output_layer {self.output_layer} is outside [-{self.num_layers + 1}, "
                f"{self.num_layers}] for a {self.num_layers}-layer encoder"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def batch_dim_tables(self) -> bool:
        """The class token and position table keep a leading batch dim, ``[1, 1, d_e]`` and
        ``[1, n, d_e]``, as DINOv2's checkpoints store them (a conversion then renames)."""
        return self.family in BATCH_DIM_VISION_FAMILIES

    @property
    def naflex(self) -> bool:
        """The tower takes NaFlex inputs (``pixel_values [b, n_patches, c*p*p]``,
        ``pixel_attention_mask``, ``spatial_shapes``), a variable number of patches per image.
        ``image_size`` is then the side of the square grid its position table was trained
        on, in pixels."""
        return self.family in NAFLEX_VISION_FAMILIES

    @property
    def num_positions(self) -> int:
        """Rows of the position table: patches plus the class token if any."""
        return self.num_patches + int(self.class_token)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in the tower's hidden states: class token, registers."""
        return int(self.class_token) + self.num_register_tokens

    @property
    def num_feature_prefix_tokens(self) -> int:
        """Tokens before the patches in what the tower returns (``feature_tokens``)."""
        if self.feature_tokens == "patches":
            return 0
        if self.feature_tokens == "cls_and_patches":
            return int(self.class_token)
        return self.num_prefix_tokens

    @property
    def seq_len(self) -> int:
        """Tokens per image ``s_e`` the tower returns at its own image size."""
        return self.num_patches + self.num_feature_prefix_tokens

    def tokens_for(self, height: int, width: int) -> int:
        """Tokens the tower returns for an image of ``height x width`` pixels."""
        return ((height // self.patch_size) * (width // self.patch_size)
                + self.num_feature_prefix_tokens)

    def replace(self, **changes) -> VisionEncoderConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class FusionConfig:
    """Where and how cross-attention fusion layers go into a decoder.

    Args:
        fusion_layers: decoder layer indices that get a fusion layer.
        encoder_dim: width ``d_e`` of the encoder output the fusion layers attend to, after the
            projection head (usually the decoder's ``embed_dim``).
        fusion_vocab_size: number of new embedding tokens (``<|image|>`` and friends).
        fusion_first: run the fusion layer before the original layer (Flamingo, Llama 3.2).
        ca_norm_eps: epsilon of the fusion layer's RMSNorms (1e-6 in Llama 3.2 Vision).
        qk_norm_eps: epsilon of the cross-attention q/k RMSNorms.
        norm_unit_offset: the fusion layer's RMSNorms (its two layer norms and its q/k
            norms) are of the ``(1 + w)`` kind, their weights starting at zero (a Gemma
            decoder's own kind); False: Llama's ``w`` kind, starting at one.
    """

    fusion_layers: tuple[int, ...]
    encoder_dim: int
    fusion_vocab_size: int = 8
    fusion_first: bool = True
    ca_norm_eps: float = 1e-6
    qk_norm_eps: float = 1e-5
    norm_unit_offset: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.fusion_layers, (tuple, list)) or not all(
            _is_int(i) for i in self.fusion_layers
        ):
            raise _field_error(self, "fusion_layers", self.fusion_layers,
                               "a sequence of layer indices")
        check_field_values(self)
        layers = tuple(sorted(set(self.fusion_layers)))
        if len(layers) != len(self.fusion_layers) or any(i < 0 for i in layers):
            raise ConfigError(
                f"fusion_layers must be distinct non-negative indices, got {self.fusion_layers}"
            )
        object.__setattr__(self, "fusion_layers", layers)
        if self.fusion_vocab_size < 0 or self.encoder_dim <= 0:
            raise ConfigError(
                f"bad fusion sizes: encoder_dim {self.encoder_dim}, "
                f"fusion_vocab_size {self.fusion_vocab_size}"
            )

    @classmethod
    def every(cls, interval: int, num_layers: int, **kwargs) -> FusionConfig:
        """Fusion layers at ``interval - 1, 2 * interval - 1, ...`` (Llama 3.2 Vision: 4)."""
        if interval <= 0:
            raise ConfigError(f"fusion interval must be positive, got {interval}")
        if interval > num_layers:
            raise ConfigError(f"fusion interval {interval} is larger than the decoder's "
                              f"{num_layers} layers: no layer would get a fusion layer")
        return cls(fusion_layers=tuple(range(interval - 1, num_layers, interval)), **kwargs)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_error(cfg: object, name: str, value: object, expected: str) -> ConfigError:
    error = ConfigError(f"{type(cfg).__name__}.{name} must be {expected}, got {value!r}")
    error.field = name  # lets the config reader say which file (or option) gave the value
    return error


# What each annotation of the config dataclasses admits. Sizes are positive ints; epsilons,
# RoPE bases and factors positive finite numbers (an int is taken as a float); switches JSON
# booleans; names one of their Literal's values. Fields not listed (tuples, nested configs)
# are checked by their own class.
_LITERALS = {"DecoderFamily": DecoderFamily, "VisionFamily": VisionFamily,
             "Activation": Activation, "RopeType": RopeType, "MlpActivation": MlpActivation,
             "FeatureTokens": FeatureTokens}
_BOUNDED_INTS = ("output_layer",)  # may be negative (counts from the end) or None
_COUNTS = ("num_register_tokens",)  # may be 0


def _check_float(cfg: object, name: str, value: object) -> None:
    if _is_int(value):
        value = float(value)
        object.__setattr__(cfg, name, value)
    if not isinstance(value, float) or not math.isfinite(value) or value <= 0:
        raise _field_error(cfg, name, value, "a positive finite number")


def _check_factors(cfg: object, name: str, value: object) -> None:
    if not isinstance(value, tuple) or not value:
        raise _field_error(cfg, name, value, "a non-empty list of positive finite numbers")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not (
                math.isfinite(item) and item > 0):
            error = ConfigError(f"{type(cfg).__name__}.{name} must hold positive finite "
                                f"numbers only, got {item!r}")
            error.field = name
            raise error
    object.__setattr__(cfg, name, tuple(float(item) for item in value))


def check_field_values(cfg: object) -> None:
    """Check the type and domain of every field of a config dataclass, by its annotation:
    the one place every config passes, whether read from a file, given as an option or
    built in Python.

    Raises:
        ConfigError: naming the field and the value (``error.field`` is the field's name).
    """
    for spec in dataclasses.fields(cfg):
        value, kind = getattr(cfg, spec.name), spec.type
        if spec.name in _COUNTS:
            if not _is_int(value) or value < 0:
                raise _field_error(cfg, spec.name, value, "a non-negative integer")
        elif kind == "int" or (kind == "int | None" and spec.name not in _BOUNDED_INTS):
            if value is None and kind == "int | None":
                continue
            if not _is_int(value) or value <= 0:
                raise _field_error(cfg, spec.name, value, "a positive integer")
        elif kind == "int | None":
            if value is not None and not _is_int(value):
                raise _field_error(cfg, spec.name, value, "an integer or null")
        elif kind == "float":
            _check_float(cfg, spec.name, value)
        elif kind == "float | None":
            if value is not None:
                _check_float(cfg, spec.name, value)
        elif kind == "bool":
            if not isinstance(value, bool):
                raise _field_error(cfg, spec.name, value, "true or false")
        elif kind in _LITERALS:
            allowed = get_args(_LITERALS[kind])
            if not isinstance(value, str) or value not in allowed:
                raise _field_error(cfg, spec.name, value, "one of " + ", ".join(allowed))
        elif kind == "float | None":
            if value is not None:
                _check_float(cfg, spec.name, value)
        elif kind == "bool | None":
            if value is not None and not isinstance(value, bool):
                raise _field_error(cfg, spec.name, value, "true, false or null")
        elif kind == "tuple[float, ...] | None":
            if value is not None:
                _check_factors(cfg, spec.name, value)
        elif kind == "RopeScaling | None":
            if value is not None and not isinstance(value, RopeScaling):
                raise _field_error(cfg, spec.name, value, "a RopeScaling or null")


# Presets: exact names only. Shapes of real checkpoints (for planning and meta-device tests)
# and tiny ones (for tests and the demo).
DECODER_PRESETS: dict[str, DecoderConfig] = {
    "llama3_2_1b": DecoderConfig(
        vocab_size=128_256, embed_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8,
        intermediate_dim=8192, max_seq_len=131_072, rope_base=500_000.0,
        rope_scaling=RopeScaling(factor=32.0), tie_word_embeddings=True,
    ),
    "llama3_1_8b": DecoderConfig(
        vocab_size=128_256, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        intermediate_dim=14_336, max_seq_len=131_072, rope_base=500_000.0,
        rope_scaling=RopeScaling(factor=8.0),
    ),
    "llama3_1_405b": DecoderConfig(
        vocab_size=128_256, embed_dim=16_384, num_layers=126, num_heads=128, num_kv_heads=8,
        intermediate_dim=53_248, max_seq_len=131_072, rope_base=500_000.0,
        rope_scaling=RopeScaling(factor=8.0),
    ),
    "llama3_2_vision_11b_text": DecoderConfig(
        vocab_size=128_256, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        intermediate_dim=14_336, max_seq_len=131_072, rope_base=500_000.0,
        rope_scaling=RopeScaling(factor=8.0),
    ),
    "mistral_7b": DecoderConfig(
        vocab_size=32_000, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        intermediate_dim=14_336, max_seq_len=32_768, rope_base=1_000_000.0, family="mistral",
    ),
    "qwen2_0_5b": DecoderConfig(
        vocab_size=151_936, embed_dim=896, num_layers=24, num_heads=14, num_kv_heads=2,
        intermediate_dim=4864, max_seq_len=32_768, norm_eps=1e-6, rope_base=1_000_000.0,
        attn_bias=True, tie_word_embeddings=True, family="qwen2",
    ),
    # head_dim 128 is not embed_dim / num_heads (1024 / 16 = 64)
    "qwen3_0_6b": DecoderConfig(
        vocab_size=151_936, embed_dim=1024, num_layers=28, num_heads=16, num_kv_heads=8,
        head_dim=128, intermediate_dim=3072, max_seq_len=40_960, norm_eps=1e-6,
        rope_base=1_000_000.0, tie_word_embeddings=True, family="qwen3", qk_norm=True,
    ),
    # Mistral NeMo 12B: head_dim 128, not 5120 / 32 = 160
    "mistral_nemo_12b": DecoderConfig(
        vocab_size=131_072, embed_dim=5120, num_layers=40, num_heads=32, num_kv_heads=8,
        head_dim=128, intermediate_dim=14_336, max_seq_len=1_024_000, rope_base=1_000_000.0,
        family="mistral",
    ),
    # Phi-4-mini (3.8B): stacked qkv_proj / gate_up_proj in transformers' layout, 3/4 of each
    # 128-wide head rotated, tied; shapes only (its LongRoPE factors are the checkpoint's own)
    "phi4_mini": DecoderConfig(
        vocab_size=200_064, embed_dim=3072, num_layers=32, num_heads=24, num_kv_heads=8,
        intermediate_dim=8192, max_seq_len=131_072, tie_word_embeddings=True, family="phi3",
        partial_rotary_factor=0.75,
    ),
    "tiny": DecoderConfig(
        vocab_size=256, embed_dim=64, num_layers=4, num_heads=4, num_kv_heads=2,
        intermediate_dim=128, max_seq_len=128, rope_base=500_000.0,
    ),
}

VISION_PRESETS: dict[str, VisionEncoderConfig] = {
    "clip_vit_l_14_336": VisionEncoderConfig(
        image_size=336, patch_size=14, embed_dim=1024, num_layers=24, num_heads=16,
        intermediate_dim=4096,
    ),
    "siglip_so400m_384": VisionEncoderConfig(
        image_size=384, patch_size=14, embed_dim=1152, num_layers=27, num_heads=16,
        intermediate_dim=4304, norm_eps=1e-6, activation="gelu_tanh", class_token=False,
        patch_bias=True, pre_norm=False, post_norm_hidden=True, family="siglip",
    ),
    "tiny_clip": VisionEncoderConfig(
        image_size=32, patch_size=8, embed_dim=48, num_layers=2, num_heads=4,
        intermediate_dim=96,
    ),
}


def preset(name: str) -> DecoderConfig | VisionEncoderConfig:
    """Look up a preset by its exact name.

    Raises:
        ConfigError: the name is unknown; the message lists the valid names.
    """
    table: dict = {**DECODER_PRESETS, **VISION_PRESETS}
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(sorted(table))}") from None


__all__ = [
    "DECODER_PRESETS",
    "NATIVE_ROPE_STYLE",
    "VISION_PRESETS",
    "DecoderConfig",
    "FeatureTokens",
    "FusionConfig",
    "ROPE_TYPE_FIELDS",
    "RopeScaling",
    "RopeStyle",
    "RopeType",
    "VisionEncoderConfig",
    "preset",
]

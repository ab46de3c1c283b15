"""DINOv2 and DINOv2 with registers (transformers ``dinov2``, ``dinov2_with_registers``): the
family's key map, config reading and config writing, as data where it can be.

The native tower is the ViT of :mod:`fusesurgery.modules.vision` with DINOv2's options
(LayerScale, registers, an unused mask token, ``[1, n, d_e]`` tables). transformers saves a
``Dinov2Model`` without a prefix (``embeddings.*``, ``encoder.layer.*``, ``layernorm.*``); those
are the names read and written. The two model types differ in one computation besides the
registers: ``dinov2_with_registers`` resizes its position table with an antialiased bicubic
filter (``position_antialias``), ``dinov2`` with a plain one.

Not supported, refused with the reason: the SwiGLU MLP of ViT-g (``use_swiglu_ffn``),
q/k/v without biases (``qkv_bias: false``), non-square images or patches in config.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fusesurgery.errors import ConfigError
from fusesurgery.families._spec import VisionFamily, frozen

NAME = "dinov2"
MODEL_TYPES: tuple[str, ...] = ("dinov2", "dinov2_with_registers")
REGISTERS_MODEL_TYPE = "dinov2_with_registers"
ARCHITECTURES: dict[str, str] = {"dinov2": "Dinov2Model",
                                 "dinov2_with_registers": "Dinov2WithRegistersModel"}

# transformers' key -> native key (bare Dinov2Model / Dinov2WithRegistersModel names).
HF_TO_NATIVE: dict[str, str] = {
    "embeddings.cls_token": "cls_token_embedding.weight",
    "embeddings.mask_token": "mask_token.weight",
    "embeddings.register_tokens": "register_tokens.weight",
    "embeddings.position_embeddings": "token_pos_embedding.positional_embedding",
    "embeddings.patch_embeddings.projection.weight": "conv.weight",
    "embeddings.patch_embeddings.projection.bias": "conv.bias",
    "encoder.layer.{i}.norm1.weight": "layers.{i}.sa_norm.weight",
    "encoder.layer.{i}.norm1.bias": "layers.{i}.sa_norm.bias",
    "encoder.layer.{i}.attention.attention.query.weight": "layers.{i}.attn.q_proj.weight",
    "encoder.layer.{i}.attention.attention.query.bias": "layers.{i}.attn.q_proj.bias",
    "encoder.layer.{i}.attention.attention.key.weight": "layers.{i}.attn.k_proj.weight",
    "encoder.layer.{i}.attention.attention.key.bias": "layers.{i}.attn.k_proj.bias",
    "encoder.layer.{i}.attention.attention.value.weight": "layers.{i}.attn.v_proj.weight",
    "encoder.layer.{i}.attention.attention.value.bias": "layers.{i}.attn.v_proj.bias",
    "encoder.layer.{i}.attention.output.dense.weight": "layers.{i}.attn.output_proj.weight",
    "encoder.layer.{i}.attention.output.dense.bias": "layers.{i}.attn.output_proj.bias",
    "encoder.layer.{i}.layer_scale1.lambda1": "layers.{i}.sa_scale.gamma",
    "encoder.layer.{i}.norm2.weight": "layers.{i}.mlp_norm.weight",
    "encoder.layer.{i}.norm2.bias": "layers.{i}.mlp_norm.bias",
    "encoder.layer.{i}.mlp.fc1.weight": "layers.{i}.mlp.w1.weight",
    "encoder.layer.{i}.mlp.fc1.bias": "layers.{i}.mlp.w1.bias",
    "encoder.layer.{i}.mlp.fc2.weight": "layers.{i}.mlp.w2.weight",
    "encoder.layer.{i}.mlp.fc2.bias": "layers.{i}.mlp.w2.bias",
    "encoder.layer.{i}.layer_scale2.lambda1": "layers.{i}.mlp_scale.gamma",
    "layernorm.weight": "ln_post.weight",
    "layernorm.bias": "ln_post.bias",
}
# The native keys DINOv2 adds to the CLIP/SigLIP ViT's.
NATIVE_KEYS: tuple[str, ...] = (
    "mask_token.weight",
    "register_tokens.weight",
    "layers.{i}.sa_scale.gamma",
    "layers.{i}.mlp_scale.gamma",
)
# A key only a DINOv2 checkpoint has (transformers' spelling): tells the layout apart.
HF_MARKER_PREFIXES: tuple[str, ...] = ("embeddings.patch_embeddings.projection.",)

# config.json field -> native field, for the fields that carry over as they are.
HF_KEYS: dict[str, str] = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    "hidden_size": "embed_dim",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_channels": "num_channels",
    "layer_norm_eps": "norm_eps",
}
HF_ACTIVATIONS: dict[str, str] = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                                  "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}
# transformers' Dinov2Config defaults, for what a config.json leaves out.
HF_DEFAULTS: dict[str, Any] = {
    "embed_dim": 768, "num_layers": 12, "num_heads": 12, "image_size": 224, "patch_size": 14,
    "num_channels": 3, "norm_eps": 1e-6, "activation": "gelu", "mlp_ratio": 4,
}
# What the architecture fixes, whatever config.json says: no pre-norm, a patch bias, a class
# token, LayerScale, and the final LayerNorm applied to the returned hidden states.
FIXED: dict[str, Any] = {"class_token": True, "patch_bias": True, "pre_norm": False,
                         "layer_scale": True, "post_norm_hidden": True}
# Settings with no effect on the forward pass of the pretrained tower (training-time or
# initialisation only, or the Backbone head's), read and not modelled.
IGNORED: tuple[str, ...] = (
    "layerscale_value", "drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "initializer_range", "apply_layernorm", "reshape_hidden_states", "out_features",
    "out_indices", "stage_names",
)


def _int(config: Mapping[str, Any], key: str, origin: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, list | tuple):
        if len(value) == 2 and value[0] == value[1]:
            value = value[0]
        else:
            raise ConfigError(f"{origin}: {key} {list(value)} is not square; fusesurgery's "
                              "DINOv2 takes square images and patches")
    return value


def read_hf_config(config: Mapping[str, Any], origin: str) -> tuple[dict[str, Any],
                                                                     dict[str, Any]]:
    """Read a ``dinov2`` / ``dinov2_with_registers`` config.json.

    Returns:
        ``(read, defaults)``: native field -> value stated by the file, and the values
        transformers assumes for what it leaves out.

    Raises:
        ConfigError: a model type of another family, the SwiGLU MLP, q/k/v without biases,
            an unknown activation, non-square sizes, or an ``mlp_ratio`` that gives no whole
            MLP width.
    """
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{origin}: model_type {model_type!r} is not DINOv2's; expected one "
                          f"of {', '.join(MODEL_TYPES)}")
    if config.get("use_swiglu_ffn", False) is not False:
        raise ConfigError(f"{origin}: use_swiglu_ffn is set (DINOv2 ViT-g's SwiGLU MLP); "
                          "fusesurgery's DINOv2 has the GELU MLP of ViT-S/B/L only")
    if config.get("qkv_bias", True) is not True:
        raise ConfigError(f"{origin}: qkv_bias is not true; fusesurgery's DINOv2 has q/k/v "
                          "biases, as every released DINOv2 does")
    read: dict[str, Any] = {"family": NAME, **FIXED}
    for key, name in HF_KEYS.items():
        value = _int(config, key, origin) if key in ("image_size", "patch_size") else (
            config.get(key))
        if value is not None:
            read[name] = value
    act = config.get("hidden_act")
    if act is not None:
        if act not in HF_ACTIVATIONS:
            raise ConfigError(f"{origin}: hidden_act {act!r} is not supported; supported: "
                              f"{', '.join(HF_ACTIVATIONS)}")
        read["activation"] = HF_ACTIVATIONS[act]
    registers = model_type == REGISTERS_MODEL_TYPE
    read["position_antialias"] = registers
    if registers:
        read["num_register_tokens"] = config.get("num_register_tokens", 4)
        read["mask_token"] = True  # the registers model always has one
    else:
        read["num_register_tokens"] = 0
        read["mask_token"] = config.get("use_mask_token", True)
    width = read.get("embed_dim", HF_DEFAULTS["embed_dim"])
    ratio = config.get("mlp_ratio", HF_DEFAULTS["mlp_ratio"])
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not isinstance(
            width, int) or ratio <= 0:
        raise ConfigError(f"{origin}: mlp_ratio must be a positive number, got {ratio!r}")
    read["intermediate_dim"] = int(width * ratio)  # as Dinov2MLP computes it
    defaults = {name: value for name, value in HF_DEFAULTS.items() if name != "mlp_ratio"}
    return read, defaults


def hf_config(config: Any) -> dict[str, Any]:
    """A transformers config.json for a native DINOv2 ``VisionEncoderConfig``.

    Raises:
        ConfigError: what transformers' DINOv2 cannot express: no class token, a pre-norm,
            no LayerScale or patch bias, registers with a plain position resize, an MLP width
            no ``mlp_ratio`` gives.
    """
    wrong = [name for name, value in FIXED.items() if getattr(config, name) != value]
    if wrong:
        raise ConfigError(f"a DINOv2 config.json cannot express {', '.join(wrong)} other "
                          "than DINOv2's")
    registers = config.position_antialias
    if config.num_register_tokens and not registers:
        raise ConfigError("a DINOv2 config.json cannot express registers with a plain "
                          "(not antialiased) position resize")
    ratio = config.intermediate_dim / config.embed_dim
    if ratio.is_integer():
        ratio = int(ratio)
    if int(config.embed_dim * ratio) != config.intermediate_dim:
        raise ConfigError(f"a DINOv2 config.json cannot express intermediate_dim "
                          f"{config.intermediate_dim} for width {config.embed_dim}")
    model_type = REGISTERS_MODEL_TYPE if registers else "dinov2"
    out: dict[str, Any] = {"architectures": [ARCHITECTURES[model_type]],
                           "model_type": model_type}
    out.update({key: getattr(config, name) for key, name in HF_KEYS.items()})
    out["hidden_act"] = {v: k for k, v in reversed(HF_ACTIVATIONS.items())}[config.activation]
    out["mlp_ratio"] = ratio
    out["qkv_bias"] = True
    out["use_swiglu_ffn"] = False
    if registers:
        out["num_register_tokens"] = config.num_register_tokens
        if not config.mask_token:
            raise ConfigError("a DINOv2-with-registers config.json cannot express a tower "
                              "without a mask token")
    else:
        out["use_mask_token"] = config.mask_token
    return out


FAMILY = VisionFamily(
    name=NAME,
    display_name="DINOv2",
    model_types=MODEL_TYPES,
    hf_model_type="dinov2",
    architectures=tuple(ARCHITECTURES.values()),
    hf_config_keys=frozen(HF_KEYS),
    hf_defaults=frozen({name: HF_DEFAULTS[name]
                        for name in ("norm_eps", "activation", "image_size")}),
    post_norm_hidden=True,
    hf_keys=frozen(HF_TO_NATIVE),
    hf_dropped=frozen({}),
    # LayerScale and a position table (DINOv3 has LayerScale and a 2-D RoPE instead)
    shape_markers=frozen({"layers.0.sa_scale.gamma": True, "conv.weight": 4,
                          "token_pos_embedding.positional_embedding": True}),
    # its final, post-normed hidden states, as Cambrian and Molmo take them; the class token
    # and patches, registers left out, as the papers that fuse DINOv2 do
    encoder_layer_default=None,
    encoder_tokens_default="cls_and_patches",
    own_hf_names=True,
    hf_layout_markers=HF_MARKER_PREFIXES,
    hf_config_reader=read_hf_config,
    hf_config_writer=hf_config,
    batch_dim_tables=True,
)

__all__ = [
    "ARCHITECTURES",
    "FAMILY",
    "NAME",
    "HF_MARKER_PREFIXES",
    "HF_TO_NATIVE",
    "MODEL_TYPES",
    "NATIVE_KEYS",
    "hf_config",
    "read_hf_config",
]

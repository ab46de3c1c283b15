"""DINOv3 ViT (transformers ``dinov3_vit``): the family's key map, config reading and config
writing, as data where it can be.

The native tower is the ViT of :mod:`fusesurgery.modules.vision` with DINOv3's options: no
position table but a 2-D RoPE over the patch centres (``patch_rope_base``, the class token and
registers not rotated), registers placed straight after the class token, LayerScale, no key
bias, an unused ``[1, 1, d_e]`` mask token. transformers saves a ``DINOv3ViTModel`` without a
prefix (``embeddings.*``, ``layer.*``, ``norm.*``); those are the names read and written.

Not supported, refused with the reason: the gated MLP of the large DINOv3 models
(``use_gated_mlp``), and bias settings other than DINOv3's (q, v, output and MLP biases, no
key bias).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fusesurgery.errors import ConfigError
from fusesurgery.families._spec import VisionFamily, frozen

NAME = "dinov3"
MODEL_TYPE = "dinov3_vit"
ARCHITECTURE = "DINOv3ViTModel"

# transformers' key -> native key (bare DINOv3ViTModel names).
HF_TO_NATIVE: dict[str, str] = {
    "embeddings.cls_token": "cls_token_embedding.weight",
    "embeddings.mask_token": "mask_token.weight",
    "embeddings.register_tokens": "register_tokens.weight",
    "embeddings.patch_embeddings.weight": "conv.weight",
    "embeddings.patch_embeddings.bias": "conv.bias",
    "layer.{i}.norm1.weight": "layers.{i}.sa_norm.weight",
    "layer.{i}.norm1.bias": "layers.{i}.sa_norm.bias",
    "layer.{i}.attention.q_proj.weight": "layers.{i}.attn.q_proj.weight",
    "layer.{i}.attention.q_proj.bias": "layers.{i}.attn.q_proj.bias",
    "layer.{i}.attention.k_proj.weight": "layers.{i}.attn.k_proj.weight",
    "layer.{i}.attention.v_proj.weight": "layers.{i}.attn.v_proj.weight",
    "layer.{i}.attention.v_proj.bias": "layers.{i}.attn.v_proj.bias",
    "layer.{i}.attention.o_proj.weight": "layers.{i}.attn.output_proj.weight",
    "layer.{i}.attention.o_proj.bias": "layers.{i}.attn.output_proj.bias",
    "layer.{i}.layer_scale1.lambda1": "layers.{i}.sa_scale.gamma",
    "layer.{i}.norm2.weight": "layers.{i}.mlp_norm.weight",
    "layer.{i}.norm2.bias": "layers.{i}.mlp_norm.bias",
    "layer.{i}.mlp.up_proj.weight": "layers.{i}.mlp.w1.weight",
    "layer.{i}.mlp.up_proj.bias": "layers.{i}.mlp.w1.bias",
    "layer.{i}.mlp.down_proj.weight": "layers.{i}.mlp.w2.weight",
    "layer.{i}.mlp.down_proj.bias": "layers.{i}.mlp.w2.bias",
    "layer.{i}.layer_scale2.lambda1": "layers.{i}.mlp_scale.gamma",
    "norm.weight": "ln_post.weight",
    "norm.bias": "ln_post.bias",
}
# A key only a DINOv3 checkpoint has (transformers' spelling): tells the layout apart.
HF_MARKER_PREFIXES: tuple[str, ...] = ("embeddings.patch_embeddings.weight",)

# config.json field -> native field, for the fields that carry over as they are.
HF_KEYS: dict[str, str] = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    "hidden_size": "embed_dim",
    "intermediate_size": "intermediate_dim",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_channels": "num_channels",
    "layer_norm_eps": "norm_eps",
    "rope_theta": "patch_rope_base",
    "num_register_tokens": "num_register_tokens",
}
HF_ACTIVATIONS: dict[str, str] = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                                  "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}
# transformers' DINOv3ViTConfig defaults, for what a config.json leaves out.
HF_DEFAULTS: dict[str, Any] = {
    "embed_dim": 384, "intermediate_dim": 1536, "num_layers": 12, "num_heads": 6,
    "image_size": 224, "patch_size": 16, "num_channels": 3, "norm_eps": 1e-5,
    "activation": "gelu", "patch_rope_base": 100.0, "num_register_tokens": 0,
}
# What the architecture fixes: a class token, a patch bias, no pre-norm, LayerScale, the
# final LayerNorm on the returned hidden states, an (unused) mask token, no key bias.
FIXED: dict[str, Any] = {"class_token": True, "patch_bias": True, "pre_norm": False,
                         "layer_scale": True, "post_norm_hidden": True, "mask_token": True,
                         "key_bias": False}
# The biases DINOv3's config.json can switch, and the values the native tower has.
BIASES: dict[str, bool] = {"query_bias": True, "key_bias": False, "value_bias": True,
                           "proj_bias": True, "mlp_bias": True}
IGNORED: tuple[str, ...] = (
    "layerscale_value", "drop_path_rate", "attention_dropout", "initializer_range",
    "pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale", "apply_layernorm",
    "reshape_hidden_states", "out_features", "out_indices", "stage_names",
)


def _square(config: Mapping[str, Any], key: str, origin: str) -> Any:
    value = config.get(key)
    if isinstance(value, list | tuple):
        if len(value) == 2 and value[0] == value[1]:
            return value[0]
        raise ConfigError(f"{origin}: {key} {list(value)} is not square; fusesurgery's "
                          "DINOv3 takes square images and patches")
    return value


def read_hf_config(config: Mapping[str, Any], origin: str) -> tuple[dict[str, Any],
                                                                     dict[str, Any]]:
    """Read a ``dinov3_vit`` config.json.

    Returns:
        ``(read, defaults)``: native field -> value stated by the file, and the values
        transformers assumes for what it leaves out.

    Raises:
        ConfigError: another model type, the gated MLP, biases other than DINOv3's, an
            unknown activation or non-square sizes.
    """
    if config.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"{origin}: model_type {config.get('model_type')!r} is not "
                          f"{MODEL_TYPE!r}")
    if config.get("use_gated_mlp", False) is not False:
        raise ConfigError(f"{origin}: use_gated_mlp is set (the large DINOv3 models' gated "
                          "MLP); fusesurgery's DINOv3 has the plain GELU MLP")
    wrong = [name for name, value in BIASES.items() if config.get(name, value) is not value]
    if wrong:
        raise ConfigError(f"{origin}: {', '.join(wrong)} differ from DINOv3's biases (q, v, "
                          "output and MLP biases, no key bias), which fusesurgery's tower has")
    read: dict[str, Any] = {"family": NAME, **FIXED}
    for key, name in HF_KEYS.items():
        value = _square(config, key, origin)
        if value is not None:
            read[name] = value
    act = config.get("hidden_act")
    if act is not None:
        if act not in HF_ACTIVATIONS:
            raise ConfigError(f"{origin}: hidden_act {act!r} is not supported; supported: "
                              f"{', '.join(HF_ACTIVATIONS)}")
        read["activation"] = HF_ACTIVATIONS[act]
    return read, dict(HF_DEFAULTS)


def hf_config(config: Any) -> dict[str, Any]:
    """A transformers config.json for a native DINOv3 ``VisionEncoderConfig``.

    Raises:
        ConfigError: what transformers' DINOv3 cannot express (no 2-D RoPE, a key bias, ...).
    """
    wrong = [name for name, value in FIXED.items() if getattr(config, name) != value]
    if config.patch_rope_base is None:
        wrong.append("a position table")
    if wrong:
        raise ConfigError(f"a DINOv3 config.json cannot express {', '.join(wrong)} other "
                          "than DINOv3's")
    out: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
    out.update({key: getattr(config, name) for key, name in HF_KEYS.items()})
    out["hidden_act"] = {v: k for k, v in reversed(HF_ACTIVATIONS.items())}[config.activation]
    out.update(BIASES)
    out["use_gated_mlp"] = False
    return out


FAMILY = VisionFamily(
    name=NAME,
    display_name="DINOv3",
    model_types=(MODEL_TYPE,),
    hf_model_type=MODEL_TYPE,
    architectures=(ARCHITECTURE,),
    hf_config_keys=frozen(HF_KEYS),
    hf_defaults=frozen({name: HF_DEFAULTS[name]
                        for name in ("norm_eps", "activation", "image_size", "patch_rope_base")}),
    post_norm_hidden=True,
    hf_keys=frozen(HF_TO_NATIVE),
    hf_dropped=frozen({}),
    # LayerScale without a position table (a 2-D RoPE over the patch centres instead)
    shape_markers=frozen({"layers.0.sa_scale.gamma": True, "conv.weight": 4,
                          "token_pos_embedding.positional_embedding": False}),
    encoder_layer_default=None,
    # the class token and patches; registers left out, as for DINOv2
    encoder_tokens_default="cls_and_patches",
    own_hf_names=True,
    hf_layout_markers=HF_MARKER_PREFIXES,
    hf_config_reader=read_hf_config,
    hf_config_writer=hf_config,
    batch_dim_tables=True,
)

__all__ = [
    "ARCHITECTURE",
    "FAMILY",
    "NAME",
    "HF_MARKER_PREFIXES",
    "HF_TO_NATIVE",
    "MODEL_TYPE",
    "hf_config",
    "read_hf_config",
]

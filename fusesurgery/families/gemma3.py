"""Gemma 3 text: Qwen3-like attention (per-head q/k norms, a ``head_dim`` of its own) inside
Gemma's layer: ``(1 + w)`` RMSNorms in float32, a norm before and after both attention and
MLP (four a layer), a GeGLU MLP (tanh-approximate GELU), embeddings scaled by
``sqrt(hidden_size)``, attention scaled by ``query_pre_attn_scalar**-0.5``, sliding-window
layers (five of every six by default) with their own RoPE base and no scaling, global layers
with ``rope_theta`` and ``rope_scaling``, optional final logit soft-capping, tied embeddings.

transformers: ``Gemma3ForCausalLM`` (model_type ``gemma3_text``). Native: torchtune has no
Gemma 3, so its Gemma 2 names are taken for what the two share (``sa_scale`` / ``mlp_scale``
for the post-attention / post-feedforward norms, which sit where a scale on each branch
sits) plus Qwen3's q/k norm names; q/k rows stay in transformers' rotate-half order (renamed
only, as for Qwen3). Gemma's ``post_attention_layernorm`` is not Llama's (which norms the MLP
input), so its transformers names are read and written with its own table
(``own_hf_names``). No Meta layout, no Mllama export.

A full Gemma 3 checkpoint (``Gemma3ForConditionalGeneration``, model_type ``gemma3``) is read
as its text half (``TEXT_PART``) or, where a vision tower is asked for, as its SigLIP tower
(``VISION_PART``, which ``siglip.py`` declares), the other parts dropped and listed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fusesurgery.errors import ConfigError
from fusesurgery.families import llama
from fusesurgery.families._spec import ConfigField, DecoderFamily, WrappedCheckpoint, frozen

# Gemma3TextConfig's class defaults the readers below fall back to
SLIDING_WINDOW_PATTERN_DEFAULT = 6  # every 6th layer global
LOCAL_ROPE_BASE_DEFAULT = 10_000.0  # rope_local_base_freq
GELU_TANH = "gelu_pytorch_tanh"  # hidden_activation (transformers' tanh-approximate GELU)
SLIDING, FULL = "sliding_attention", "full_attention"


def sliding_layers_reader(pattern_default: int):
    """The reader of a Gemma config.json's sliding-window layers, for a family whose config
    class slides all but each ``pattern_default``-th layer when neither ``layer_types`` nor
    ``sliding_window_pattern`` says (Gemma 3: 6, Gemma 2: 2)."""

    def read_sliding_layers(config: Mapping[str, Any], origin: str) -> tuple[int, ...]:
        """The sliding-window layers: ``layer_types``, else every layer but each
        ``sliding_window_pattern``-th, as transformers derives them.

        Raises:
            ConfigError: a malformed ``layer_types`` or pattern, a layer count they
                contradict, or ``use_bidirectional_attention`` (which the native causal model
                does not compute).
        """
        if config.get("use_bidirectional_attention"):
            raise ConfigError(f"{origin}: use_bidirectional_attention true is not supported "
                              "(the native decoder attends causally)")
        layers = config.get("num_hidden_layers")
        types = config.get("layer_types")
        if types is None:
            pattern = config.get("sliding_window_pattern",
                                 config.get("_sliding_window_pattern", pattern_default))
            if type(pattern) is not int or pattern < 1:
                raise ConfigError(f"{origin}: sliding_window_pattern must be a positive "
                                  f"integer, got {pattern!r}")
            if type(layers) is not int:
                raise ConfigError(f"{origin}: states neither layer_types nor "
                                  "num_hidden_layers, so which layers slide cannot be told")
            types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
        if not isinstance(types, list) or any(kind not in (SLIDING, FULL) for kind in types):
            raise ConfigError(f"{origin}: layer_types must list {SLIDING!r} or {FULL!r} for "
                              f"each layer, got {types!r}")
        if type(layers) is int and len(types) != layers:
            raise ConfigError(f"{origin}: layer_types has {len(types)} entries for {layers} "
                              "layers")
        return tuple(i for i, kind in enumerate(types) if kind == SLIDING)

    return read_sliding_layers


def write_sliding_layers(sliding: tuple[int, ...], num_layers: int) -> dict[str, Any]:
    """``layer_types`` as Gemma 3's config.json spells it."""
    return {"layer_types": [SLIDING if i in sliding else FULL for i in range(num_layers)]}


def read_local_rope_base(config: Mapping[str, Any], origin: str) -> float:
    """The sliding layers' RoPE theta: transformers 5's ``rope_parameters`` entry for
    ``sliding_attention``, else transformers 4's ``rope_local_base_freq``, else 10000.

    Raises:
        ConfigError: the sliding layers' entry asks for a RoPE scaling (not modelled: the
            native sliding layers rotate by plain RoPE) or is malformed.
    """
    parameters = config.get("rope_parameters")
    local = parameters.get(SLIDING) if isinstance(parameters, Mapping) else None
    if local is not None:
        if not isinstance(local, Mapping):
            raise ConfigError(f"{origin}: rope_parameters.{SLIDING} must be an object, got "
                              f"{local!r}")
        kind = local.get("rope_type", local.get("type", "default"))
        if kind != "default":
            raise ConfigError(f"{origin}: rope_parameters.{SLIDING} has rope_type {kind!r}; "
                              "a RoPE scaling on the sliding layers is not supported")
        if "rope_theta" in local:
            return local["rope_theta"]  # typed and range-checked by DecoderConfig
    return config.get("rope_local_base_freq", LOCAL_ROPE_BASE_DEFAULT)


def write_local_rope_base(base: float, num_layers: int) -> dict[str, Any]:
    return {"rope_local_base_freq": base}


def read_activation(config: Mapping[str, Any], origin: str) -> str:
    """``hidden_activation``: transformers' tanh-approximate GELU is the one modelled.

    Raises:
        ConfigError: any other activation.
    """
    name = config.get("hidden_activation", GELU_TANH)
    if name != GELU_TANH:
        raise ConfigError(f"{origin}: hidden_activation {name!r} is not supported (Gemma "
                          f"uses {GELU_TANH!r})")
    return "gelu_tanh"


def write_activation(activation: str, num_layers: int) -> dict[str, Any]:
    return {"hidden_activation": GELU_TANH}


def read_attn_softcap(config: Mapping[str, Any], origin: str) -> None:
    """``attn_logit_softcapping``: transformers' Gemma 3 attention never applies it, so a
    value would describe a model transformers does not compute; refused.

    Raises:
        ConfigError: a value other than null.
    """
    cap = config.get("attn_logit_softcapping")
    if cap is not None:
        raise ConfigError(f"{origin}: attn_logit_softcapping {cap!r} is not supported: "
                          "transformers' Gemma 3 does not apply it (Gemma 2 does)")
    return None


def write_attn_softcap(cap: None, num_layers: int) -> dict[str, Any]:
    return {"attn_logit_softcapping": cap}


HF_CONFIG_KEYS = frozen({
    **llama.HF_CONFIG_KEYS,
    "query_pre_attn_scalar": "query_pre_attn_scalar",
    "final_logit_softcapping": "final_softcap",
    "sliding_window": "sliding_window",
})

# transformers key -> native key. post_attention_layernorm is the norm on the attention's
# output here (Llama: the MLP's input norm), pre_feedforward_layernorm the MLP's input norm.
HF_KEYS = frozen({
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.sa_norm.scale",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.output_proj.weight",
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.attn.q_norm.scale",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.attn.k_norm.scale",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.sa_scale.scale",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "layers.{i}.mlp_norm.scale",
    "model.layers.{i}.post_feedforward_layernorm.weight": "layers.{i}.mlp_scale.scale",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.w3.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
})

# A full Gemma 3 checkpoint (Gemma3ForConditionalGeneration, 4B and up): a gemma3_text decoder,
# a SigLIP tower (read by siglip.py as its own) and a projector, in transformers 4's names
# (which transformers 5's save_pretrained writes too) or 5's module names.
FULL_MODEL_TYPES = ("gemma3",)
FULL_ARCHITECTURES = ("Gemma3ForConditionalGeneration",)
PROJECTOR = "image projector of a Gemma3ForConditionalGeneration"
TEXT_PART = WrappedCheckpoint(
    model_types=FULL_MODEL_TYPES,
    architectures=FULL_ARCHITECTURES,
    config_section="text_config",
    key_prefixes=frozen({
        "language_model.model.": "model.",
        "language_model.lm_head.": "lm_head.",
        "model.language_model.": "model.",
    }),
    dropped=frozen({
        "vision_tower.*": "SigLIP vision tower of a Gemma3ForConditionalGeneration",
        "model.vision_tower.*": "SigLIP vision tower of a Gemma3ForConditionalGeneration",
        "multi_modal_projector.*": PROJECTOR,
        "model.multi_modal_projector.*": PROJECTOR,
    }),
)
VISION_PART = WrappedCheckpoint(
    model_types=FULL_MODEL_TYPES,
    architectures=FULL_ARCHITECTURES,
    config_section="vision_config",
    key_prefixes=frozen({  # the longer first: transformers 4 kept vision_model. inside
        "vision_tower.vision_model.": "vision_model.",
        "model.vision_tower.vision_model.": "vision_model.",
        "model.vision_tower.": "vision_model.",
        "vision_tower.": "vision_model.",
    }),
    dropped=frozen({
        "language_model.*": "text model of a Gemma3ForConditionalGeneration",
        "model.language_model.*": "text model of a Gemma3ForConditionalGeneration",
        "lm_head.*": "text model of a Gemma3ForConditionalGeneration",
        "multi_modal_projector.*": PROJECTOR,
        "model.multi_modal_projector.*": PROJECTOR,
    }),
)

FAMILY = DecoderFamily(
    name="gemma3",
    display_name="Gemma 3",
    model_types=("gemma3_text",),
    architectures=("Gemma3ForCausalLM",),
    hf_config_keys=HF_CONFIG_KEYS,
    # Gemma3TextConfig's class defaults
    hf_defaults=frozen({"max_seq_len": 131_072, "norm_eps": 1e-6, "rope_base": 1_000_000.0,
                        "rope_scaling": None, "attn_bias": False,
                        "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
                        "final_softcap": None, "sliding_window": 4096}),
    fixed=frozen({"qk_norm": True, "no_rope_layers": (), "norm_unit_offset": True,
                  "post_norms": True, "embed_scale": True}),
    # Gemma3TextConfig's head_dim and num_key_value_heads (gemma-3-1b's)
    unstated_heads=frozen({"head_dim": 256, "num_kv_heads": 4}),
    hf_config_fields=frozen({
        "sliding_layers": ConfigField(read=sliding_layers_reader(SLIDING_WINDOW_PATTERN_DEFAULT),
                                      write=write_sliding_layers),
        "local_rope_base": ConfigField(read=read_local_rope_base, write=write_local_rope_base),
        "mlp_activation": ConfigField(read=read_activation, write=write_activation),
        "attn_softcap": ConfigField(read=read_attn_softcap, write=write_attn_softcap),
    }),
    hf_sliding_window="modelled",
    hf_keys=HF_KEYS,
    own_hf_names=True,
    hf_layout_markers=("model.layers.{i}.pre_feedforward_layernorm.weight",),
    native_rope_style="half",
    shape_markers=frozen({"layers.0.sa_scale.scale": True, "layers.0.attn.q_norm.scale": True}),
    # a full Gemma 3 checkpoint (4B and up): its text half is read as this decoder
    hf_wrapped=(TEXT_PART,),
)

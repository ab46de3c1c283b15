"""SmolLM3: Llama's layers and key names, with no RoPE in every 4th layer (NoPE).

transformers: ``SmolLM3ForCausalLM``; its config.json states ``no_rope_layers``, one flag a
layer (1: RoPE, 0: none), or ``no_rope_layer_interval`` (every k-th layer, counting from 1,
has none; 4 when unstated). Native: the layer indices without RoPE in
``DecoderConfig.no_rope_layers``, q/k rows kept in transformers' rotate-half order (torchtune
has no SmolLM3, so its checkpoints convert by renaming alone). No Meta layout, no Mllama
export (neither skips RoPE on some layers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fusesurgery.errors import ConfigError
from fusesurgery.families import llama
from fusesurgery.families._spec import ConfigField, DecoderFamily, frozen

NO_ROPE_INTERVAL_DEFAULT = 4  # SmolLM3Config's no_rope_layer_interval


def read_no_rope_layers(config: Mapping[str, Any], origin: str) -> tuple[int, ...]:
    """The layers without RoPE a SmolLM3 config.json describes, as transformers' config class
    derives them.

    Raises:
        ConfigError: ``no_rope_layers`` is not a list of 0/1 flags, one a layer, or neither it
            nor ``num_hidden_layers`` is stated (the interval needs the layer count).
    """
    flags = config.get("no_rope_layers")
    layers = config.get("num_hidden_layers")
    if flags is None:
        interval = config.get("no_rope_layer_interval", NO_ROPE_INTERVAL_DEFAULT)
        if type(interval) is not int or interval < 1:
            raise ConfigError(f"{origin}: no_rope_layer_interval must be a positive integer, "
                              f"got {interval!r}")
        if type(layers) is not int:
            raise ConfigError(f"{origin}: states neither no_rope_layers nor num_hidden_layers, "
                              "so which layers apply RoPE cannot be told")
        flags = [int((i + 1) % interval != 0) for i in range(layers)]
    if not isinstance(flags, list) or any(flag not in (0, 1) or isinstance(flag, float)
                                          for flag in flags):
        raise ConfigError(f"{origin}: no_rope_layers must be a list of 0/1 flags, one a layer, "
                          f"got {flags!r}")
    if type(layers) is int and len(flags) != layers:
        raise ConfigError(f"{origin}: no_rope_layers has {len(flags)} flags for "
                          f"{layers} layers")
    return tuple(i for i, flag in enumerate(flags) if not flag)


def write_no_rope_layers(no_rope: tuple[int, ...], num_layers: int) -> dict[str, Any]:
    """``no_rope_layers`` as SmolLM3's config.json spells it (a flag a layer)."""
    return {"no_rope_layers": [int(i not in no_rope) for i in range(num_layers)]}


FAMILY = DecoderFamily(
    name="smollm3",
    display_name="SmolLM3",
    model_types=("smollm3",),
    architectures=("SmolLM3ForCausalLM",),
    hf_config_keys=llama.HF_CONFIG_KEYS,
    # SmolLM3Config's class defaults
    hf_defaults=frozen({"max_seq_len": 32_768, "norm_eps": 1e-6, "rope_base": 2_000_000.0,
                        "rope_scaling": None, "attn_bias": False,
                        "tie_word_embeddings": True,
                        "sliding_window": None}),
    fixed=frozen({"qk_norm": False, **llama.LLAMA_LAYERS}),  # its window: by its rule
    unstated_heads=frozen({"head_dim": None, "num_kv_heads": 4}),
    hf_config_fields=frozen({
        "no_rope_layers": ConfigField(read=read_no_rope_layers, write=write_no_rope_layers),
    }),
    hf_attention_bias_switch=True,
    hf_sliding_window="use_sliding_window",
    hf_window_layers="no_rope_layers",
    hf_keys=llama.HF_KEYS,
    native_rope_style="half",
)

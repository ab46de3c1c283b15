"""Ministral: Mistral's layers and key names, sliding and full attention layers in the order
``layer_types`` gives, a ``head_dim`` that is not width / heads (8B: 4096 wide, 32 heads of 128).

transformers: ``MinistralForCausalLM``; native: torchtune's ``mistral`` names and interleaved
q/k rows (torchtune has no Ministral of its own; its layers are Mistral's). A config.json
without ``layer_types`` slides every layer when it states a window (4096 when silent, as
MinistralConfig), none when the window is null. No Meta layout (Mistral's ``params.json``
marker belongs to the mistral family).
"""

from __future__ import annotations

from fusesurgery.families import llama, mistral
from fusesurgery.families._spec import DecoderFamily, frozen

FAMILY = DecoderFamily(
    name="ministral",
    display_name="Ministral",
    model_types=("ministral",),
    architectures=("MinistralForCausalLM",),
    hf_config_keys=llama.HF_CONFIG_KEYS,
    # MinistralConfig's class defaults
    hf_defaults=mistral.FAMILY.hf_defaults,
    fixed=frozen({"qk_norm": False, "no_rope_layers": (), **llama.LLAMA_LAYERS}),
    unstated_heads=frozen({"head_dim": None, "num_kv_heads": 8}),
    hf_sliding_window="layer_types",
    hf_keys=llama.HF_KEYS,
    native_rope_style="interleaved",
    torchtune_model="torchtune.models.mistral",
    mllama_text_model=True,
)

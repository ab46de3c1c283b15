"""Mistral and Mistral NeMo: Llama's layers and key names, a sliding window.

transformers: ``MistralForCausalLM``; Meta-style: Mistral's own ``params.json`` (which states
``hidden_dim`` and ``head_dim``); native: torchtune's ``mistral`` names, q/k rows interleaved.
``head_dim`` is read where it is not width / heads (NeMo: 128, not 5120 / 32 = 160). The
sliding window (4096 when config.json is silent, as MistralConfig) is modelled on every layer.
"""

from __future__ import annotations

from fusesurgery.families import llama
from fusesurgery.families._spec import DecoderFamily, frozen

FAMILY = DecoderFamily(
    name="mistral",
    display_name="Mistral",
    model_types=("mistral",),
    architectures=("MistralForCausalLM",),
    hf_config_keys=llama.HF_CONFIG_KEYS,
    # MistralConfig's class defaults
    hf_defaults=frozen({"max_seq_len": 131_072, "norm_eps": 1e-6, "rope_base": 10_000.0,
                        "rope_scaling": None, "attn_bias": False,
                        "tie_word_embeddings": False,
                        "sliding_window": 4096}),
    fixed=frozen({"qk_norm": False, "no_rope_layers": (), **llama.LLAMA_LAYERS}),
    unstated_heads=frozen({"head_dim": None, "num_kv_heads": 8}),
    hf_sliding_window="always",
    hf_keys=llama.HF_KEYS,
    meta_layout=True,
    meta_params_marker="hidden_dim",
    meta_keys=llama.META_KEYS,
    native_rope_style="interleaved",
    torchtune_model="torchtune.models.mistral",
    mllama_text_model=True,
    relatives=frozen({
        "mixtral": "a mixture of experts in place of the MLP",
    }),
)

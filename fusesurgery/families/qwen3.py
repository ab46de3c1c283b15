"""Qwen3 dense: Llama's layers plus per-head q/k RMSNorms before RoPE, no biases, a
``head_dim`` independent of the width (0.6B: 1024 wide, 16 heads of 128), RoPE rotating halves.

transformers: ``Qwen3ForCausalLM``; native: torchtune's ``qwen3`` names
(``layers.N.attn.q_norm.scale``), transformers' q/k rows kept. No Meta layout, no Mllama
export (neither has q/k norms).
"""

from __future__ import annotations

from fusesurgery.families import llama
from fusesurgery.families._spec import DecoderFamily, frozen

# transformers key -> native key: Llama's rows plus the per-head q/k norms.
HF_KEYS = frozen({
    **llama.HF_KEYS,
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.attn.q_norm.scale",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.attn.k_norm.scale",
})

FAMILY = DecoderFamily(
    name="qwen3",
    display_name="Qwen3",
    model_types=("qwen3",),
    architectures=("Qwen3ForCausalLM",),
    hf_config_keys=llama.HF_CONFIG_KEYS,
    # Qwen3Config's class defaults
    hf_defaults=frozen({"max_seq_len": 32_768, "norm_eps": 1e-6, "rope_base": 10_000.0,
                        "rope_scaling": None, "attn_bias": False,
                        "tie_word_embeddings": False,
                        "sliding_window": 4096}),
    fixed=frozen({"qk_norm": True, "no_rope_layers": (), **llama.LLAMA_LAYERS}),
    # Qwen3Config's head_dim is 128 whatever the width
    unstated_heads=frozen({"head_dim": 128, "num_kv_heads": 32}),
    hf_sliding_window="use_sliding_window",
    hf_keys=HF_KEYS,
    native_rope_style="half",
    shape_markers=frozen({"layers.0.attn.q_norm.scale": True,
                          "layers.0.sa_scale.scale": False}),
    torchtune_model="torchtune.models.qwen3",
    relatives=frozen({
        "qwen3_moe": "a mixture of experts in place of the MLP",
    }),
)

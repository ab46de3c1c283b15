"""Qwen2 and Qwen2.5: Llama's layers plus q/k/v biases, RoPE rotating halves.

transformers: ``Qwen2ForCausalLM`` (or a bare ``Qwen2Model``); native: torchtune's ``qwen2``
names, which keep transformers' q/k rows (torchtune's Qwen2 rotates halves too), so a
conversion renames only. No Meta layout (params.json has no biases); no Mllama export (its
text model has none).
"""

from __future__ import annotations

from fusesurgery.families import llama
from fusesurgery.families._spec import DecoderFamily, frozen

# transformers key -> native key: Llama's rows plus the q/k/v biases.
HF_KEYS = frozen({
    **llama.HF_KEYS,
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.q_proj.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.k_proj.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.v_proj.bias",
})

FAMILY = DecoderFamily(
    name="qwen2",
    display_name="Qwen2",
    model_types=("qwen2",),
    architectures=("Qwen2ForCausalLM",),
    hf_config_keys=llama.HF_CONFIG_KEYS,
    # Qwen2Config's class defaults; its q/k/v projections always carry a bias: the
    # architecture has no switch for it.
    hf_defaults=frozen({"max_seq_len": 32_768, "norm_eps": 1e-6, "rope_base": 10_000.0,
                        "rope_scaling": None, "attn_bias": True,
                        "tie_word_embeddings": False,
                        "sliding_window": 4096}),
    fixed=frozen({"qk_norm": False, "no_rope_layers": (), **llama.LLAMA_LAYERS}),
    unstated_heads=frozen({"head_dim": None, "num_kv_heads": 32}),
    hf_sliding_window="use_sliding_window",
    hf_keys=HF_KEYS,
    native_rope_style="half",
    shape_markers=frozen({"layers.0.attn.q_proj.bias": True,
                          "layers.0.attn.q_norm.scale": False}),
    torchtune_model="torchtune.models.qwen2",
    relatives=frozen({
        "qwen2_moe": "a mixture of experts with a shared expert in place of the MLP",
    }),
)

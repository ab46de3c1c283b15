"""Phi-3, Phi-3.5 and Phi-4-mini: Llama's layers with fused q/k/v and gate/up projections,
partial rotary embeddings and LongRoPE.

transformers: ``Phi3ForCausalLM``, which stores ``self_attn.qkv_proj`` (the q rows, then the
k rows, then the v rows; with GQA k and v are ``num_key_value_heads`` heads wide) and
``mlp.gate_up_proj`` (the gate rows, then the up rows). Native: torchtune's ``phi3`` names,
q/k/v and w1/w3 apart (``hf_fused_keys``: reading takes each part as a byte range of the
fused tensor, writing concatenates them back, bitwise), q/k rows in transformers' rotate-half
order as torchtune's Phi-3 keeps them. RoPE turns the first ``partial_rotary_factor`` of each
head (Phi-4-mini: 0.75), with ``longrope`` short/long factors past
``original_max_position_embeddings``. Dropouts (``resid_pdrop``, ``embd_pdrop``,
``attention_dropout``) act in training only. No Meta layout, no Mllama export (its text
model rotates whole heads).
"""

from __future__ import annotations

from typing import Any

from fusesurgery.families import llama
from fusesurgery.families._spec import DecoderFamily, frozen

_SEPARATE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")

# transformers key -> native key, for tensors kept whole: Llama's rows without the five
# projections Phi-3 fuses.
HF_KEYS = frozen({hf: native for hf, native in llama.HF_KEYS.items()
                  if not any(f".{name}." in hf for name in _SEPARATE)})

# transformers key -> the native keys whose rows it stacks, in order (torchtune's
# phi3_hf_to_tune splits these two).
HF_FUSED_KEYS = frozen({
    "model.layers.{i}.self_attn.qkv_proj.weight": ("layers.{i}.attn.q_proj.weight",
                                                   "layers.{i}.attn.k_proj.weight",
                                                   "layers.{i}.attn.v_proj.weight"),
    "model.layers.{i}.mlp.gate_up_proj.weight": ("layers.{i}.mlp.w1.weight",
                                                 "layers.{i}.mlp.w3.weight"),
})

def original_context(config: Any) -> int:
    """Phi-3's top-level ``original_max_position_embeddings``: Phi3Config reads it over the
    one inside the RoPE scaling (its class default is 4096), so it is written as the scaling
    states it (without LongRoPE, the model's own length, which then changes nothing)."""
    scaling = config.rope_scaling
    if scaling is not None and scaling.original_max_position_embeddings is not None:
        return scaling.original_max_position_embeddings
    return config.max_seq_len


FAMILY = DecoderFamily(
    name="phi3",
    display_name="Phi-3",
    model_types=("phi3",),
    architectures=("Phi3ForCausalLM",),
    hf_config_keys=llama.HF_CONFIG_KEYS,
    # Phi3Config's class defaults
    hf_defaults=frozen({"max_seq_len": 4096, "norm_eps": 1e-5, "rope_base": 10_000.0,
                        "rope_scaling": None, "attn_bias": False,
                        "tie_word_embeddings": False, "partial_rotary_factor": 1.0,
                        "sliding_window": None}),
    fixed=frozen({"qk_norm": False, "no_rope_layers": (), **llama.LLAMA_LAYERS}),
    unstated_heads=frozen({"head_dim": None, "num_kv_heads": None}),
    hf_keys=HF_KEYS,
    hf_fused_keys=HF_FUSED_KEYS,
    # Phi3Config's token ids are Phi-3-mini's (pad and eos 32000, bos 1); Phi-4-mini's are
    # others, and a tiny vocabulary has no 32000
    hf_written_defaults=frozen({"bos_token_id": None, "eos_token_id": None,
                                "pad_token_id": None,
                                "original_max_position_embeddings": original_context}),
    partial_rotary=True,
    hf_sliding_window="always",
    native_rope_style="half",
    shape_markers=frozen({}),
    torchtune_model="torchtune.models.phi3",
    relatives=frozen({
        "phimoe": "a mixture of experts in place of the MLP",
        "phi": "LayerNorm, a parallel attention and MLP block, a GELU MLP, biases",
        # Phi-3's stacked gate_up_proj and partial rotary are GLM-4's too
        "glm4": "separate q/k/v projections with biases (Phi-3 stacks them in qkv_proj), "
                "RMSNorms after attention and after the MLP too (Gemma's post-norms), the "
                "partial rotary over interleaved pairs (Phi-3's over halves)",
    }),
)

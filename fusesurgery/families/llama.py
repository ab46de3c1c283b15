"""Llama (2, 3, 3.1 with ``llama3`` RoPE scaling, 3.2): the family the others start from.

transformers: ``LlamaForCausalLM`` (or a bare ``LlamaModel`` saved with tied embeddings);
Meta: ``consolidated.00.pth`` + ``params.json``; native: torchtune's ``llama3`` names, q/k
rows in Meta's interleaved RoPE order (permuted from transformers' rotate-half order).
"""

from __future__ import annotations

from fusesurgery.families._spec import DecoderFamily, frozen

# config.json key -> DecoderConfig field (the transformers spelling every Llama-shaped
# decoder config shares).
HF_CONFIG_KEYS = frozen({
    "vocab_size": "vocab_size",
    "hidden_size": "embed_dim",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_dim",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "norm_eps",
    "attention_bias": "attn_bias",
    "tie_word_embeddings": "tie_word_embeddings",
})

# What a Llama-shaped decoder is in the native options Gemma's config.json states: RMSNorms of
# the w kind before attention and MLP only, a SwiGLU MLP, plain embeddings, scores scaled by
# head_dim**-0.5 and not capped, every layer attending to all earlier tokens with one RoPE.
# The families whose config.json cannot state them have these.
LLAMA_LAYERS = frozen({"norm_unit_offset": False, "post_norms": False, "embed_scale": False,
                       "mlp_activation": "silu", "query_pre_attn_scalar": None,
                       "attn_softcap": None, "final_softcap": None, "local_rope_base": None})
# ... and no sliding window, for a family whose config.json states none (Mistral, Qwen2, Qwen3
# and SmolLM3 state theirs, read by their hf_sliding_window rule)
NO_WINDOW = frozen({"sliding_window": None, "sliding_layers": ()})

# transformers key -> native key (SPEC.md section 4).
HF_KEYS = frozen({
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.sa_norm.scale",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.output_proj.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.scale",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.w3.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
})

# Meta key -> native key.
META_KEYS = frozen({
    "tok_embeddings.weight": "tok_embeddings.weight",
    "layers.{i}.attention_norm.weight": "layers.{i}.sa_norm.scale",
    "layers.{i}.attention.wq.weight": "layers.{i}.attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "layers.{i}.attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "layers.{i}.attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "layers.{i}.attn.output_proj.weight",
    "layers.{i}.ffn_norm.weight": "layers.{i}.mlp_norm.scale",
    "layers.{i}.feed_forward.w1.weight": "layers.{i}.mlp.w1.weight",
    "layers.{i}.feed_forward.w2.weight": "layers.{i}.mlp.w2.weight",
    "layers.{i}.feed_forward.w3.weight": "layers.{i}.mlp.w3.weight",
    "norm.weight": "norm.scale",
    "output.weight": "output.weight",
})

FAMILY = DecoderFamily(
    name="llama",
    display_name="Llama",
    model_types=("llama",),
    architectures=("LlamaForCausalLM",),
    hf_config_keys=HF_CONFIG_KEYS,
    # LlamaConfig's class defaults
    hf_defaults=frozen({"max_seq_len": 2048, "norm_eps": 1e-6, "rope_base": 10_000.0,
                        "rope_scaling": None, "attn_bias": False,
                        "tie_word_embeddings": False}),
    fixed=frozen({"qk_norm": False, "no_rope_layers": (), **LLAMA_LAYERS, **NO_WINDOW}),
    unstated_heads=frozen({"head_dim": None, "num_kv_heads": None}),
    hf_attention_bias_switch=True,
    hf_keys=HF_KEYS,
    meta_layout=True,
    meta_keys=META_KEYS,
    native_rope_style="interleaved",
    shape_fallback=True,
    torchtune_model="torchtune.models.llama3",
    mllama_text_model=True,
    relatives=frozen({
        "olmo2": "RMSNorms after attention and MLP instead of before, q/k norms over the "
                 "whole width",
        "olmo": "LayerNorms without weights, q/k/v clipping",
        "granite": "embedding, residual, attention and logit multipliers",
        "internlm2": "fused wqkv tensor",
        "cohere": "LayerNorm, parallel attention and MLP, logit scale",
    }),
)

"""Gemma 2: Gemma 3's layer without the q/k norms, its attention scores soft-capped
(``attn_logit_softcapping``, 50 by default) and computed as transformers' eager attention
does, its logits capped (``final_logit_softcapping``, 30), sliding and global layers
alternating (``layer_types``), one RoPE for every layer.

transformers: ``Gemma2ForCausalLM``; native: torchtune 0.6.1's ``gemma2`` model's names
(``sa_scale`` for the post-attention norm, the final norm as ``norm.rms_norm.scale``, inside
the module with which torchtune also caps the hidden state; here that module only norms, the
cap is on the logits, as in transformers) and its converter's values (q/k rows permuted into
interleaved RoPE pairs), but for one deviation: torchtune's ``gemma2_hf_to_tune`` files
``pre_feedforward_layernorm`` under ``mlp_scale`` and ``post_feedforward_layernorm`` under
``mlp_norm``, where its own layer applies them the other way round (``mlp_norm`` on the MLP's
input), so its model loaded from its own conversion is not transformers'. Here each norm is
filed where torchtune's layer applies it (``mlp_norm``: pre-, ``mlp_scale``: post-feedforward,
as for Gemma 3), and torchtune's model loaded from a native checkpoint computes transformers'
logits (tests/reference/test_torchtune.py). Native checkpoints written before the final norm
took torchtune's name (``norm.scale``) are still read. Its transformers names are Gemma 3's
(``own_hf_names``). No Meta layout, no Mllama export.
"""

from __future__ import annotations

from fusesurgery.families import gemma3
from fusesurgery.families._spec import ConfigField, DecoderFamily, frozen

SLIDING_WINDOW_PATTERN_DEFAULT = 2  # Gemma2Config: sliding and global layers alternate

HF_CONFIG_KEYS = frozen({
    **gemma3.HF_CONFIG_KEYS,
    "attn_logit_softcapping": "attn_softcap",
})

FINAL_NORM = "norm.rms_norm.scale"  # torchtune's Gemma2FinalNorm holds the RMSNorm

# Gemma 3's rows without the q/k norms, the final norm under torchtune's Gemma 2 name
HF_KEYS = frozen({key: FINAL_NORM if native == "norm.scale" else native
                  for key, native in gemma3.HF_KEYS.items()
                  if ".q_norm." not in key and ".k_norm." not in key})

FAMILY = DecoderFamily(
    name="gemma2",
    display_name="Gemma 2",
    model_types=("gemma2",),
    architectures=("Gemma2ForCausalLM",),
    hf_config_keys=HF_CONFIG_KEYS,
    # Gemma2Config's class defaults
    hf_defaults=frozen({"max_seq_len": 8192, "norm_eps": 1e-6, "rope_base": 10_000.0,
                        "rope_scaling": None, "attn_bias": False,
                        "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
                        "final_softcap": 30.0, "attn_softcap": 50.0, "sliding_window": 4096}),
    fixed=frozen({"qk_norm": False, "no_rope_layers": (), "norm_unit_offset": True,
                  "post_norms": True, "embed_scale": True, "local_rope_base": None}),
    # Gemma2Config's head_dim and num_key_value_heads
    unstated_heads=frozen({"head_dim": 256, "num_kv_heads": 4}),
    hf_config_fields=frozen({
        "sliding_layers": ConfigField(
            read=gemma3.sliding_layers_reader(SLIDING_WINDOW_PATTERN_DEFAULT),
            write=gemma3.write_sliding_layers),
        "mlp_activation": ConfigField(read=gemma3.read_activation,
                                      write=gemma3.write_activation),
    }),
    hf_sliding_window="modelled",
    hf_keys=HF_KEYS,
    own_hf_names=True,
    hf_layout_markers=gemma3.FAMILY.hf_layout_markers,
    native_rope_style="interleaved",
    shape_markers=frozen({"layers.0.sa_scale.scale": True, "layers.0.attn.q_norm.scale": False,
                          "layers.0.attn.q_proj.bias": False}),
    torchtune_model="torchtune.models.gemma2",
    relatives=frozen({
        "gemma": "no norms after attention and MLP, no attention or logit soft-capping, no "
                 "sliding window (Gemma 1)",
    }),
    native_final_norm=FINAL_NORM,
    native_legacy_keys=frozen({"norm.scale": FINAL_NORM}),
)

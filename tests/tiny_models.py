"""Sizes of the tiny transformers models the tests build (one copy, shared by every test
package), and the Llama 3.1 RoPE scaling block as Hugging Face configs carry it."""

from pathlib import Path

import torch

TINY_DECODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=64,
)
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    image_size=16, patch_size=8,
)
# The text tower of a CLIPModel / SiglipModel, which a vision conversion drops.
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    vocab_size=50, max_position_embeddings=16,
)
LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def save_tiny_hf_decoder(family: str, directory: Path, sizes: dict = TINY_DECODER,
                         **overrides) -> Path:
    """A tiny Llama / Mistral / Ministral / Qwen2 / Qwen3 / Phi-3 ``*ForCausalLM`` saved with
    ``save_pretrained``
    (weights seeded, so every call gives the same checkpoint)."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "ministral": (transformers.MinistralConfig, transformers.MinistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }
    config_cls, model_cls = classes[family]
    torch.manual_seed(0)
    model_cls(config_cls(**{**sizes, **overrides})).save_pretrained(directory)
    return directory


# torchtune's Hugging Face -> torchtune checkpoint convention, written out here so that most
# tests need not import torchtune (seconds, and warnings): every family renames with this
# table; Llama and Mistral also permute each q/k head's rows into interleaved RoPE order, Qwen2
# and Qwen3 do not (their models rotate halves, as transformers does). For the families
# torchtune 0.6.1 has (Ministral through its Mistral converter), tests/reference/
# test_torchtune.py asserts that torchtune_state_dict equals its own converter's output; the
# rows of Qwen3 (torchtune's later qwen3_hf_to_tune: renamed only, q/k norms included), Gemma 3
# and SmolLM3, which 0.6.1 lacks, are this emulation alone.
TORCHTUNE_FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v_proj.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.scale",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.scale",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w3.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
}
TORCHTUNE_PERMUTES_QK = {"llama": True, "mistral": True, "ministral": True, "qwen2": False,
                         "qwen3": False, "gemma2": True, "gemma3": False, "phi3": False}
# torchtune has no Gemma 3. Its Gemma 2 converter (torchtune/models/gemma2/_convert_weights.py)
# names the four norms of a Gemma layer so: the post-attention norm sa_scale, the MLP's input
# norm mlp_norm, the post-feedforward norm mlp_scale. Gemma 3's native layout takes those names,
# Qwen3's for the q/k norms, and keeps transformers' q/k rows (it rotates halves).
GEMMA3_FROM_HF = {
    **TORCHTUNE_FROM_HF,
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.sa_scale.scale",
    "model.layers.{}.pre_feedforward_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.mlp_scale.scale",
}
# torchtune's Gemma 2: Gemma 3's rows (no q/k norms), its final norm inside the module that
# also caps the hidden state; q/k rows permuted as Llama's. Its gemma2_hf_to_tune (0.6.1)
# swaps the two feed-forward norms' names (mlp_norm gets post_feedforward_layernorm), which
# its own layer then applies in the wrong places; the native layout does not follow that, and
# neither does this table.
GEMMA2_FROM_HF = {**GEMMA3_FROM_HF, "model.norm.weight": "norm.rms_norm.scale"}
FROM_HF = {"gemma2": GEMMA2_FROM_HF, "gemma3": GEMMA3_FROM_HF}
# torchtune's phi3_hf_to_tune: Phi-3's stacked tensors, each cut into the parts above (q, k, v
# by rows: q as wide as the heads, k and v as the kv heads; gate and up in two halves).
TORCHTUNE_PHI3_STACKED = {
    "model.layers.{}.self_attn.qkv_proj.weight": ("layers.{}.attn.q_proj.weight",
                                                  "layers.{}.attn.k_proj.weight",
                                                  "layers.{}.attn.v_proj.weight"),
    "model.layers.{}.mlp.gate_up_proj.weight": ("layers.{}.mlp.w1.weight",
                                                "layers.{}.mlp.w3.weight"),
}


def torchtune_state_dict(hf_state: dict[str, torch.Tensor], family: str,
                         config) -> dict[str, torch.Tensor]:
    """What torchtune's converter makes of a Hugging Face ``*ForCausalLM`` state dict: equal to
    torchtune 0.6.1's own for ``llama``, ``mistral``, ``ministral``, ``qwen2``, ``phi3`` and
    ``gemma2`` (but for its swapped feed-forward norms; tests/reference/test_torchtune.py checks
    it), an emulation of torchtune's conventions for the families 0.6.1 lacks.

    Args:
        hf_state: the Hugging Face tensors (a tied model's ``lm_head.weight`` is left out).
        family: ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma2``, ``gemma3``
            (torchtune's Gemma 2 names, see ``GEMMA3_FROM_HF``) or ``phi3``.
        config: the transformers config (head counts, tying).
    """
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads

    def permute(tensor: torch.Tensor, heads: int) -> torch.Tensor:
        rest = tensor.shape[1:]
        return (tensor.view(heads, 2, head_dim // 2, *rest).transpose(1, 2)
                .reshape(heads * head_dim, *rest))

    out = {}
    for key, tensor in hf_state.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        layer = key.split(".")[2] if key.startswith("model.layers.") else None
        template = key if layer is None else key.replace(f".{layer}.", ".{}.", 1)
        if template in TORCHTUNE_PHI3_STACKED:
            q_rows, kv_rows = n_heads * head_dim, n_kv * head_dim
            sizes = ([q_rows, kv_rows, kv_rows] if ".qkv_proj." in key
                     else [tensor.shape[0] // 2] * 2)
            for name, part in zip(TORCHTUNE_PHI3_STACKED[template],
                                  torch.split(tensor, sizes, dim=0), strict=True):
                out[name.format(layer)] = part.contiguous()
            continue
        if TORCHTUNE_PERMUTES_QK[family] and ".q_proj." in key:
            tensor = permute(tensor, n_heads)
        elif TORCHTUNE_PERMUTES_QK[family] and ".k_proj." in key:
            tensor = permute(tensor, n_kv)
        table = FROM_HF.get(family, TORCHTUNE_FROM_HF)
        out[table[template].format(layer)] = tensor.contiguous()
    return out

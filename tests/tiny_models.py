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
    """A tiny Llama / Mistral / Qwen2 ``*ForCausalLM`` saved with ``save_pretrained``
    (weights seeded, so every call gives the same checkpoint)."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[family]
    torch.manual_seed(0)
    model_cls(config_cls(**{**sizes, **overrides})).save_pretrained(directory)
    return directory

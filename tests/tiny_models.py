"""Sizes of the tiny transformers models the tests build (one copy, shared by every test
package), and the Llama 3.1 RoPE scaling block as Hugging Face configs carry it."""

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

"""Regenerate the tiny example checkpoints in this folder (needs the dev extra: transformers).

    python examples/make_examples.py

They are random, small (a few hundred KB), and real: written by transformers'
``save_pretrained`` exactly as Hub checkpoints are.
"""

from pathlib import Path

import torch
import transformers as tf

HERE = Path(__file__).parent


def main() -> None:
    torch.manual_seed(0)
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=500_000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ))
    llama.to(torch.bfloat16).save_pretrained(HERE / "tiny-llama")
    clip = tf.CLIPVisionModel(tf.CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8,
    ))
    clip.save_pretrained(HERE / "tiny-clip-vision")


if __name__ == "__main__":
    main()

"""Regenerate the tiny example checkpoints in this folder (needs the dev extra: transformers).

    python examples/make_examples.py

They are random, small (a few hundred KB), and real: written by transformers'
``save_pretrained`` exactly as Hub checkpoints are.
"""

import json
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
    save_tokenizer_and_processor()


def save_tokenizer_and_processor() -> None:
    """A word-level tokenizer of the tiny Llama's 512 ids, and the tower's image processor:
    what fuse carries over (the tokenizer with ``<|image|>`` added at id 512)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|begin_of_text|>", "<|end_of_text|>", "<unk>",
             *(f"word{i}" for i in range(509))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tf.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        unk_token="<unk>",
    ).save_pretrained(HERE / "tiny-llama")
    # what CLIPImageProcessor.save_pretrained writes (written out: it needs Pillow)
    processor = {
        "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 32},
    }
    (HERE / "tiny-clip-vision" / "preprocessor_config.json").write_text(
        json.dumps(processor, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

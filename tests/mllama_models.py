"""Tiny transformers Mllama models (text model and the whole vision-language model), saved with
``save_pretrained``, gates set nonzero so the fusion layers matter."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 64
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def text_config(**overrides):
    import transformers as t

    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                  num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 3],
                  rope_scaling=LLAMA3_SCALING, rope_theta=500_000.0,
                  max_position_embeddings=128, pad_token_id=VOCAB - 1, bos_token_id=1,
                  eos_token_id=2)
    values.update(overrides)
    return t.MllamaTextConfig(**values)


def _open_gates(model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(0.7 if "attn_gate" in name else -0.4)


def save_mllama_causal(directory: Path, seed: int = 0) -> Path:
    import transformers as t

    torch.manual_seed(seed)
    model = t.MllamaForCausalLM(text_config())
    _open_gates(model)
    model.save_pretrained(directory)
    return directory


def save_mllama_conditional(directory: Path, seed: int = 0) -> Path:
    import transformers as t

    torch.manual_seed(seed)
    vision = t.MllamaVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
        num_attention_heads=4, image_size=28, patch_size=14, max_num_tiles=2,
        vision_output_dim=64, intermediate_layers_indices=[0, 1],
        supported_aspect_ratios=[[1, 1], [1, 2]])
    model = t.MllamaForConditionalGeneration(t.MllamaConfig(vision_config=vision,
                                                            text_config=text_config()))
    _open_gates(model)
    model.save_pretrained(directory)
    return directory

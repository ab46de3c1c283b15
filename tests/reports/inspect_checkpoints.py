"""Tiny real checkpoints of every form ``inspect`` reads, for the report and CLI tests.

Hugging Face checkpoints come from transformers' own classes and ``save_pretrained`` (the
independent source of truth for their key names and config.json); the rest are written with
``torch.save`` / safetensors from fusesurgery's modules or from hand-written Meta key names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fusesurgery.config import DECODER_PRESETS, VISION_PRESETS, FusionConfig, preset
from fusesurgery.convert import layout_tensor_infos
from fusesurgery.modules import build_decoder, build_deep_fusion_model
from fusesurgery.testing import write_sparse_sharded_safetensors
from tests.tiny_models import (
    LLAMA3_SCALING,
    TINY_DECODER,
    TINY_TEXT,
    TINY_VISION,
    save_tiny_hf_decoder,
)

# three layers here, so that layer ranges collapse visibly in the key tree
HF_DECODER = {**TINY_DECODER, "num_hidden_layers": 3}
HF_VISION = TINY_VISION
HF_TEXT = TINY_TEXT

# The fused model: the tiny decoder (4 layers, width 64) with fusion layers at 1 and 3, eight
# new tokens, and the tiny CLIP-style encoder (2 layers, width 48) behind a linear head.
FUSED_DECODER = DECODER_PRESETS["tiny"]
FUSED_VISION = VISION_PRESETS["tiny_clip"]
FUSED_FUSION = FusionConfig.every(2, FUSED_DECODER.num_layers,
                                  encoder_dim=FUSED_DECODER.embed_dim, fusion_vocab_size=8)


def stored_numels(path: Path) -> dict[str, int]:
    """Every tensor's element count, read back with safetensors' own reader."""
    with safe_open(path, framework="pt") as f:
        return {key: math.prod(f.get_slice(key).get_shape()) for key in f.keys()}


def save_hf_decoder(family: str, directory: Path, **overrides) -> Path:
    """A Llama / Mistral / Qwen2 ``*ForCausalLM`` saved with ``save_pretrained``."""
    return save_tiny_hf_decoder(family, directory, HF_DECODER, **overrides)


def save_hf_llama(directory: Path) -> Path:
    """Llama 3.1 style: GQA, llama3 RoPE scaling, theta 500000, untied output."""
    return save_hf_decoder("llama", directory, rope_theta=500_000.0,
                           rope_scaling=LLAMA3_SCALING, max_position_embeddings=16_384,
                           rms_norm_eps=1e-5)


def save_hf_vision(kind: str, directory: Path) -> Path:
    """``CLIPVisionModel`` (``kind="clip_vision"``) or the two-tower ``CLIPModel``."""
    import transformers as t

    torch.manual_seed(0)
    if kind == "clip_vision":
        model = t.CLIPVisionModel(t.CLIPVisionConfig(**HF_VISION))
    else:
        model = t.CLIPModel(t.CLIPConfig(vision_config=HF_VISION, text_config=HF_TEXT,
                                         projection_dim=24))
    model.save_pretrained(directory)
    return directory


# Meta's consolidated.pth names, written out here as the test's own source of truth.
META_LAYER_SHAPES = {
    "attention_norm.weight": (32,), "attention.wq.weight": (32, 32),
    "attention.wk.weight": (16, 32), "attention.wv.weight": (16, 32),
    "attention.wo.weight": (32, 32), "ffn_norm.weight": (32,),
    "feed_forward.w1.weight": (96, 32), "feed_forward.w2.weight": (32, 96),
    "feed_forward.w3.weight": (96, 32),
}
META_PARAMS = {"dim": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64,
               "multiple_of": 32, "ffn_dim_multiplier": None, "norm_eps": 1e-5,
               "rope_theta": 500000.0, "use_scaled_rope": True}


def save_meta_dir(directory: Path) -> Path:
    """``consolidated.00.pth`` (bf16) + ``params.json`` of a 3-layer Llama."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1)
    tensors = {"tok_embeddings.weight": torch.randn(64, 32, generator=generator)}
    for layer in range(3):
        for name, shape in META_LAYER_SHAPES.items():
            tensors[f"layers.{layer}.{name}"] = torch.randn(shape, generator=generator)
    tensors["norm.weight"] = torch.randn(32, generator=generator)
    tensors["output.weight"] = torch.randn(64, 32, generator=generator)
    torch.save({k: v.to(torch.bfloat16) for k, v in tensors.items()},
               directory / "consolidated.00.pth")
    (directory / "params.json").write_text(json.dumps(META_PARAMS))
    return directory


def save_native_pt(path: Path) -> Path:
    """A torchtune-native state dict of the tiny decoder (no config beside it)."""
    torch.manual_seed(0)
    torch.save(build_decoder(DECODER_PRESETS["tiny"]).state_dict(), path)
    return path


def fused_state_dict(gates: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """A fresh fused model's state dict, with the given gate parameters set."""
    torch.manual_seed(0)
    model = build_deep_fusion_model(FUSED_DECODER, FUSED_VISION, FUSED_FUSION)
    state = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    for key, value in (gates or {}).items():
        state[key].fill_(value)
    return state


def save_fused(path: Path, gates: dict[str, float] | None = None) -> Path:
    """A fused checkpoint as one safetensors file (``decoder.*``, ``encoder.vision.*``,
    ``encoder.projection.*``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(fused_state_dict(gates), path)
    return path


def save_fused_with_config(directory: Path) -> Path:
    """A fused checkpoint beside fusesurgery's own config.json (decoder + encoder sections)."""
    save_fused(directory / "model.safetensors")
    decoder = {"num_heads": FUSED_DECODER.num_heads, "rope_base": FUSED_DECODER.rope_base}
    encoder = {"num_heads": FUSED_VISION.num_heads, "image_size": FUSED_VISION.image_size}
    (directory / "config.json").write_text(json.dumps({"decoder": decoder, "encoder": encoder}))
    return directory


def write_405b(directory: Path) -> Path:
    """A sparse, sharded, HF-named Llama-3.1-405B checkpoint (valid headers, no data)."""
    write_sparse_sharded_safetensors(directory, layout_tensor_infos(preset("llama3_1_405b"), "hf"))
    return directory

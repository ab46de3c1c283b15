"""Tiny real checkpoints for the convert tests, built with transformers and torch.save.

transformers is the independent source of truth for Hugging Face key names and config.json
styles: the models are built from its classes and saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fusesurgery.io.tensor_info import SAFETENSORS_DTYPES, TensorInfo
from tests.tiny_models import (
    LLAMA3_SCALING,
    TINY_DECODER,
    TINY_TEXT,
    TINY_VISION,
    save_tiny_hf_decoder,
)

__all__ = ["LLAMA3_SCALING", "TINY_DECODER", "TINY_TEXT", "TINY_VISION"]


def safetensors_infos(path: Path) -> dict[str, TensorInfo]:
    """Metadata of every tensor in one safetensors file, as the io readers will give it."""
    infos = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            tensor_slice = f.get_slice(key)
            infos[key] = TensorInfo(
                key, tuple(tensor_slice.get_shape()), SAFETENSORS_DTYPES[tensor_slice.get_dtype()],
                path,
            )
    return infos


def tensors_infos(tensors: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(k, tuple(v.shape), v.dtype) for k, v in tensors.items()}


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


class SavedModel:
    """A model saved with save_pretrained: its directory, config dict and tensor metadata."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.config = json.loads((directory / "config.json").read_text())
        self.weights = directory / "model.safetensors"
        self.infos = safetensors_infos(self.weights)

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_safetensors(self.weights)


def _save(model, directory: Path) -> SavedModel:
    model.save_pretrained(directory)
    return SavedModel(directory)


def build_hf_decoder(family: str, directory: Path, **overrides) -> SavedModel:
    return SavedModel(save_tiny_hf_decoder(family, directory, **overrides))


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory) -> SavedModel:
    """Llama 3.1 style: GQA, llama3 RoPE scaling, theta 500000, untied output."""
    return build_hf_decoder(
        "llama", tmp_path_factory.mktemp("llama"), rope_theta=500_000.0,
        rope_scaling=LLAMA3_SCALING, max_position_embeddings=16_384, rms_norm_eps=1e-5,
    )


@pytest.fixture(scope="session")
def hf_mistral(tmp_path_factory) -> SavedModel:
    return build_hf_decoder("mistral", tmp_path_factory.mktemp("mistral"), sliding_window=4096)


@pytest.fixture(scope="session")
def hf_qwen2(tmp_path_factory) -> SavedModel:
    """Qwen2 style: q/k/v biases and tied embeddings (lm_head.weight is not saved)."""
    return build_hf_decoder("qwen2", tmp_path_factory.mktemp("qwen2"), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def hf_vision_models(tmp_path_factory) -> dict[str, SavedModel]:
    """CLIPVisionModel, SiglipVisionModel, CLIPModel and SiglipModel, saved."""
    import transformers as t

    torch.manual_seed(0)
    models = {
        "clip_vision": t.CLIPVisionModel(t.CLIPVisionConfig(**TINY_VISION)),
        "siglip_vision": t.SiglipVisionModel(t.SiglipVisionConfig(**TINY_VISION)),
        "clip": t.CLIPModel(
            t.CLIPConfig(vision_config=TINY_VISION, text_config=TINY_TEXT, projection_dim=24)
        ),
        "siglip": t.SiglipModel(t.SiglipConfig(vision_config=TINY_VISION, text_config=TINY_TEXT)),
    }
    return {name: _save(model, tmp_path_factory.mktemp(name)) for name, model in models.items()}


# Meta's consolidated.pth names, written out here as the test's own source of truth.
META_LAYER_KEYS = (
    "attention_norm.weight", "attention.wq.weight", "attention.wk.weight",
    "attention.wv.weight", "attention.wo.weight", "ffn_norm.weight",
    "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
)


def meta_state_dict(
    dim: int = 32, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2, vocab: int = 64,
    hidden: int = 96, dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """A random Meta-layout Llama state dict."""
    head_dim = dim // n_heads
    shapes = {
        "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,),
        "attention.wq.weight": (n_heads * head_dim, dim),
        "attention.wk.weight": (n_kv_heads * head_dim, dim),
        "attention.wv.weight": (n_kv_heads * head_dim, dim),
        "attention.wo.weight": (dim, n_heads * head_dim),
        "feed_forward.w1.weight": (hidden, dim), "feed_forward.w2.weight": (dim, hidden),
        "feed_forward.w3.weight": (hidden, dim),
    }
    generator = torch.Generator().manual_seed(1)
    tensors = {"tok_embeddings.weight": torch.randn(vocab, dim, generator=generator)}
    for layer in range(n_layers):
        for name in META_LAYER_KEYS:
            tensors[f"layers.{layer}.{name}"] = torch.randn(shapes[name], generator=generator)
    tensors["norm.weight"] = torch.randn(dim, generator=generator)
    tensors["output.weight"] = torch.randn(vocab, dim, generator=generator)
    return {key: value.to(dtype) for key, value in tensors.items()}

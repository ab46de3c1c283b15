"""Tiny real inputs for the fuse tests: decoders and vision towers saved by transformers, and
the same Llama weights as a lone .safetensors file, a native .pt and a Meta directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tests.reports.diff_checkpoints import (
    HF_DECODER,
    HF_VISION,
    save_hf_clip_vision,
    save_hf_llama,
    save_meta,
    save_native_pt,
)
from tests.tiny_models import TINY_TEXT

# What a checkpoint without a config cannot say about itself (SPEC.md section 4).
HEAD_OVERRIDES = ["--num-heads", "4", "--num-kv-heads", "2"]


def save_decoder(kind: str, root: Path) -> tuple[Path, list[str]]:
    """``(path to give fuse, extra CLI options)`` for one decoder input form."""
    import transformers as t

    if kind == "llama":
        return save_hf_llama(root / "llama"), []
    if kind in ("mistral", "qwen2-tied"):
        torch.manual_seed(0)
        if kind == "mistral":
            model = t.MistralForCausalLM(t.MistralConfig(**HF_DECODER))
        else:
            model = t.Qwen2ForCausalLM(t.Qwen2Config(**HF_DECODER, tie_word_embeddings=True))
        model.save_pretrained(root / kind)
        return root / kind, []
    hf = save_hf_llama(root / "llama-hf")
    if kind == "safetensors":  # the weights file alone, no config beside it
        (root / "lone").mkdir()
        return Path(shutil.copy(hf / "model.safetensors", root / "lone" / "llama.safetensors")), \
            HEAD_OVERRIDES
    if kind == "pt":
        return save_native_pt(hf, root / "llama.pt"), HEAD_OVERRIDES
    if kind == "meta":
        return save_meta(hf, root / "meta"), []
    raise ValueError(kind)


def save_encoder(kind: str, root: Path) -> Path:
    import transformers as t

    if kind == "clip":
        return save_hf_clip_vision(root / "clip")
    torch.manual_seed(0)
    if kind == "siglip":
        model = t.SiglipVisionModel(t.SiglipVisionConfig(**HF_VISION))
    elif kind == "clip-full":  # a whole CLIPModel: the text tower is left out
        model = t.CLIPModel(t.CLIPConfig(vision_config=HF_VISION, text_config=TINY_TEXT,
                                         projection_dim=24))
    else:
        raise ValueError(kind)
    model.save_pretrained(root / kind)
    return root / kind

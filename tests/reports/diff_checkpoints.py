"""Tiny real checkpoints for the diff tests: one set of Llama weights in every form.

The Hugging Face checkpoint comes from transformers' ``save_pretrained``. Its native and Meta
forms are derived HERE, with the key names and the RoPE permutation written out from SPEC.md
section 4, not with fusesurgery's convert layer, so the diff is checked against an independent
conversion. The fused checkpoint is fusesurgery's own fused model whose decoder tensors are
replaced by those native ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fusesurgery.config import DecoderConfig, FusionConfig, VisionEncoderConfig
from fusesurgery.modules import build_deep_fusion_model

NUM_HEADS, NUM_KV_HEADS, DIM, LAYERS, VOCAB, FFN = 4, 2, 32, 2, 64, 64
HEAD_DIM = DIM // NUM_HEADS

HF_DECODER = dict(
    hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
    num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV_HEADS, vocab_size=VOCAB,
)
HF_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    image_size=16, patch_size=8,
)
DECODER_CONFIG = DecoderConfig(
    vocab_size=VOCAB, embed_dim=DIM, num_layers=LAYERS, num_heads=NUM_HEADS,
    intermediate_dim=FFN, num_kv_heads=NUM_KV_HEADS,
)
VISION_CONFIG = VisionEncoderConfig(
    image_size=16, patch_size=8, embed_dim=32, num_layers=2, num_heads=4, intermediate_dim=64,
)
FUSION_LAYER = 1
FUSION_CONFIG = FusionConfig(fusion_layers=(FUSION_LAYER,), encoder_dim=DIM, fusion_vocab_size=8)

# SPEC.md section 4, written out: HF name -> (native name, Meta name), per layer and global.
LAYER_NAMES = {
    "input_layernorm.weight": ("sa_norm.scale", "attention_norm.weight"),
    "self_attn.q_proj.weight": ("attn.q_proj.weight", "attention.wq.weight"),
    "self_attn.k_proj.weight": ("attn.k_proj.weight", "attention.wk.weight"),
    "self_attn.v_proj.weight": ("attn.v_proj.weight", "attention.wv.weight"),
    "self_attn.o_proj.weight": ("attn.output_proj.weight", "attention.wo.weight"),
    "post_attention_layernorm.weight": ("mlp_norm.scale", "ffn_norm.weight"),
    "mlp.gate_proj.weight": ("mlp.w1.weight", "feed_forward.w1.weight"),
    "mlp.down_proj.weight": ("mlp.w2.weight", "feed_forward.w2.weight"),
    "mlp.up_proj.weight": ("mlp.w3.weight", "feed_forward.w3.weight"),
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", "tok_embeddings.weight"),
    "model.norm.weight": ("norm.scale", "norm.weight"),
    "lm_head.weight": ("output.weight", "output.weight"),
}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def save_hf_llama(directory: Path, seed: int = 0) -> Path:
    """A tiny LlamaForCausalLM (GQA, untied) saved with save_pretrained."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_DECODER))
    model.save_pretrained(directory)
    return directory


def save_hf_clip_vision(directory: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_VISION)).save_pretrained(
        directory
    )
    return directory


def hf_to_interleaved(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """SPEC.md section 4's HF -> native q/k permutation."""
    dim = weight.shape[1]
    return (weight.view(num_heads, 2, HEAD_DIM // 2, dim).transpose(1, 2)
            .reshape(num_heads * HEAD_DIM, dim))


def convert_hf(hf: dict[str, torch.Tensor], column: int, *, permute: bool = True
               ) -> dict[str, torch.Tensor]:
    """HF tensors renamed to the native (column 0) or Meta (column 1) names, q/k permuted."""
    out = {}
    for key, tensor in hf.items():
        if key in GLOBAL_NAMES:
            out[GLOBAL_NAMES[key][column]] = tensor.clone()
            continue
        _, _, layer, rest = key.split(".", 3)
        name = f"layers.{layer}.{LAYER_NAMES[rest][column]}"
        if permute and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            heads = NUM_HEADS if rest.startswith("self_attn.q") else NUM_KV_HEADS
            tensor = hf_to_interleaved(tensor, heads)
        out[name] = tensor.clone()
    return out


def save_native_pt(hf_dir: Path, path: Path, *, permute: bool = True) -> Path:
    """The HF checkpoint's weights in native names, torch.save'd (no config beside it)."""
    hf = read_safetensors(hf_dir / "model.safetensors")
    torch.save(convert_hf(hf, 0, permute=permute), path)
    return path


def save_meta(hf_dir: Path, directory: Path) -> Path:
    """The HF checkpoint's weights as a Meta consolidated.00.pth + params.json (+ rope.freqs)."""
    hf = read_safetensors(hf_dir / "model.safetensors")
    tensors = convert_hf(hf, 1)
    tensors["rope.freqs"] = torch.ones(HEAD_DIM // 2)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, directory / "consolidated.00.pth")
    params = {"dim": DIM, "n_layers": LAYERS, "n_heads": NUM_HEADS, "n_kv_heads": NUM_KV_HEADS,
              "vocab_size": VOCAB, "hidden_dim": FFN, "norm_eps": 1e-6, "rope_theta": 10000.0}
    (directory / "params.json").write_text(json.dumps(params))
    return directory


def fused_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    """A fused model (fusion layer 1, 8 new tokens, CLIP-style encoder) holding the HF
    checkpoint's decoder weights, with non-zero gates."""
    torch.manual_seed(1)
    model = build_deep_fusion_model(DECODER_CONFIG, VISION_CONFIG, FUSION_CONFIG)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    native = convert_hf(read_safetensors(hf_dir / "model.safetensors"), 0)
    for key, tensor in native.items():
        assert state["decoder." + key].shape == tensor.shape, key
        state["decoder." + key] = tensor
    for gate in ("ca_scale", "mlp_scale"):
        state[f"decoder.layers.{FUSION_LAYER}.fusion_layer.{gate}.scale"].fill_(0.25)
    return state


def save_fused(hf_dir: Path, path: Path) -> Path:
    save_file(fused_state_dict(hf_dir), path)
    return path


def is_fusion_or_encoder_key(key: str) -> bool:
    """What a fused checkpoint adds to its decoder, told by name (SPEC.md section 3)."""
    return key.startswith("encoder.") or ".fusion_layer." in key or "fusion_embedding" in key

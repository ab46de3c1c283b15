"""Issue 18's families through the whole life of a checkpoint, with sources written by
transformers itself: Qwen3 (per-head q/k RMSNorms, a head_dim that is not width / heads, no
biases), Mistral NeMo (head_dim not width / heads), Ministral (the same, a window on the
layers layer_types names), Gemma 3 text ((1 + w) norms before and
after attention and MLP, GeGLU, a scaled embedding, sliding layers of window 4 beside a
global one), Gemma 2 (the same without q/k norms, soft-capped scores), Phi-3 / Phi-4-mini
(stacked qkv_proj and gate_up_proj, partial rotary, LongRoPE past the original context) and
a SigLIP2
fixed-resolution tower (which transformers stores as ``siglip``).

Each case: ``load_decoder`` against transformers at 8 and 40 tokens; ``fuse`` ->
``validate --against`` (every row passes, identity) -> ``unfuse`` bitwise -> ``diff --values``
identical; ``convert --to native`` (torchtune's names and values) and back to hf bitwise with
the same config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fusesurgery import load_decoder, load_encoder
from fusesurgery.cli.app import app
from fusesurgery.io import open_checkpoint
from tests.tiny_models import TINY_TEXT, torchtune_state_dict

transformers = pytest.importorskip("transformers")
runner = CliRunner()

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# head_dim 12, not 32 / 4 = 8: q_proj has 48 rows for a width of 32
HEAD_DIM = 12
# Phi-3's LongRoPE context: 32 original positions of the 64 (factor 2, attention factor
# sqrt(1 + ln 2 / ln 32))
PHI3_LONGROPE = dict(original_max_position_embeddings=32)

# name -> (family, config settings, dtype written, max_shard_size or None, encoder)
CASES = {
    "qwen3-tied-f32": ("qwen3", dict(head_dim=HEAD_DIM, tie_word_embeddings=True),
                       torch.float32, None, "siglip2"),
    "qwen3-untied-bf16-sharded": ("qwen3", dict(head_dim=HEAD_DIM, tie_word_embeddings=False,
                                                rope_theta=1_000_000.0),
                                  torch.bfloat16, "8KB", "clip"),
    "mistral-nemo-f32": ("mistral", dict(head_dim=HEAD_DIM, sliding_window=None,
                                         rms_norm_eps=1e-5), torch.float32, None, "clip"),
    "mistral-nemo-tied-bf16-sharded": ("mistral", dict(head_dim=HEAD_DIM, sliding_window=None,
                                                       tie_word_embeddings=True),
                                       torch.bfloat16, "8KB", "siglip2"),
    # Ministral: a window of 4 on the layers layer_types names, the other global
    "ministral-f32": ("ministral", dict(head_dim=HEAD_DIM, sliding_window=4,
                                        layer_types=["full_attention", "sliding_attention"]),
                      torch.float32, None, "clip"),
    "ministral-tied-bf16-sharded": ("ministral", dict(head_dim=HEAD_DIM, sliding_window=4,
                                                      tie_word_embeddings=True),
                                    torch.bfloat16, "8KB", "siglip2"),
    # window 4, every 3rd layer global, capped logits: the 40-token check runs 10 windows
    "gemma3-tied-f32": ("gemma3", dict(head_dim=HEAD_DIM, num_hidden_layers=3,
                                       sliding_window=4, sliding_window_pattern=3,
                                       query_pre_attn_scalar=16, final_logit_softcapping=5.0),
                        torch.float32, None, "siglip2"),
    "gemma3-untied-bf16-sharded": ("gemma3", dict(head_dim=HEAD_DIM, num_hidden_layers=3,
                                                  sliding_window=4, sliding_window_pattern=2,
                                                  tie_word_embeddings=False,
                                                  rope_scaling={"rope_type": "linear",
                                                                "factor": 2.0}),
                                   torch.bfloat16, "8KB", "clip"),
    # Gemma 2: alternating layers, a score cap of 0.5 that bites, capped logits
    "gemma2-tied-f32": ("gemma2", dict(head_dim=HEAD_DIM, num_hidden_layers=3,
                                       sliding_window=4, attn_logit_softcapping=0.5,
                                       final_logit_softcapping=5.0),
                        torch.float32, None, "clip"),
    "gemma2-untied-bf16-sharded": ("gemma2", dict(head_dim=HEAD_DIM, num_hidden_layers=3,
                                                  sliding_window=4, tie_word_embeddings=False),
                                   torch.bfloat16, "8KB", "siglip2"),
    # Phi-4-mini's shape: 3/4 of each 8-wide head rotated (3 LongRoPE factors a list), tied,
    # a pad token of its own; the 40-token call passes the original 32 positions
    "phi4-mini-tied-f32": ("phi3", dict(PHI3_LONGROPE, partial_rotary_factor=0.75,
                                        tie_word_embeddings=True, pad_token_id=63,
                                        eos_token_id=62, bos_token_id=1,
                                        rope_scaling={"rope_type": "longrope",
                                                      "short_factor": [1.0, 1.25, 1.5],
                                                      "long_factor": [2.0, 3.0, 5.0]}),
                           torch.float32, None, "clip"),
    # Phi-3.5-mini's shape: whole heads rotated, untied, Phi-3 mini's sliding window; bf16 in
    # 8 kB shards, so the stacked tensors and their parts lie in several files
    "phi3.5-untied-bf16-sharded": ("phi3", dict(PHI3_LONGROPE, sliding_window=2047,
                                                pad_token_id=62, eos_token_id=62,
                                                rope_scaling={"rope_type": "longrope",
                                                              "short_factor": [1.0, 1.1, 1.2,
                                                                               1.3],
                                                              "long_factor": [1.5, 2.0, 4.0,
                                                                              8.0]}),
                                   torch.bfloat16, "8KB", "siglip2"),
}
CLASSES = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
           "mistral": ("MistralConfig", "MistralForCausalLM"),
           "ministral": ("MinistralConfig", "MinistralForCausalLM"),
           "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
           "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
           "phi3": ("Phi3Config", "Phi3ForCausalLM")}
GEMMA = ("gemma2", "gemma3")
# families whose native layout keeps transformers' rotate-half q/k rows
HALF = ("qwen3", "gemma3", "phi3")
QK_NORM = ("qwen3", "gemma3")
# the same operations in transformers' order, so bitwise (Phi-3: transformers runs one stacked
# q/k/v matmul where the native model runs three)
BITWISE = ("qwen3", "gemma3")


def _head_dim(case: str) -> int:
    return CASES[case][1].get("head_dim", SIZES["hidden_size"] // SIZES["num_attention_heads"])


def cli(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def save_decoder(case: str, directory: Path) -> Path:
    """The case's decoder, saved by transformers; every norm's weights drawn at random, so a
    q/k norm that is misplaced, mis-named or reordered changes the logits."""
    family, settings, dtype, shard, _ = CASES[case]
    config_cls, model_cls = (getattr(transformers, name) for name in CLASSES[family])
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**SIZES, **settings}))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.5)
    model.to(dtype).save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    return directory


def save_siglip2(directory: Path) -> Path:
    """A SigLIP2 fixed-resolution checkpoint's form: a two-tower ``SiglipModel``, 16-px
    patches (model_type ``siglip``, as google/siglip2-base-patch16-224 is stored)."""
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=16,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    transformers.SiglipModel(transformers.SiglipConfig(
        vision_config=vision, text_config=TINY_TEXT)).save_pretrained(directory)
    return directory


def save_clip(directory: Path) -> Path:
    torch.manual_seed(0)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=16, patch_size=8)).save_pretrained(directory)
    return directory


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as source:
        return {key: source.get_tensor(key).clone() for key in source.keys()}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).contiguous().view(torch.uint8)


def _assert_bitwise(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for key, tensor in ours.items():
        assert tensor.dtype == theirs[key].dtype, key
        assert torch.equal(_bits(tensor), _bits(theirs[key])), key


def _reference(directory: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_decoder_equals_transformers(tmp_path, case):
    hf = save_decoder(case, tmp_path / "hf")
    family, _, dtype, shard, _ = CASES[case]
    if shard:
        assert (hf / "model.safetensors.index.json").exists()
    reference = _reference(hf)
    decoder = load_decoder(hf, dtype=torch.float32).eval()
    attn, head_dim = decoder.layers[0].attn, _head_dim(case)
    assert attn.head_dim == head_dim and attn.q_proj.weight.shape == (4 * head_dim, 32)
    assert (attn.q_norm is not None) == (family in QK_NORM)
    assert attn.q_proj.bias is None and attn.output_proj.bias is None
    assert attn.pos_embeddings.style == ("half" if family in HALF else "interleaved")
    partial = CASES[case][1].get("partial_rotary_factor", 1.0)
    assert attn.pos_embeddings.rotary_dim == int(head_dim * partial)
    for length in (8, 40):
        tokens = torch.randint(0, SIZES["vocab_size"], (2, length),
                               generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            ours, theirs = decoder(tokens), reference(tokens).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        if family in BITWISE:
            # the same operations in transformers' order (rotate-half RoPE, q/k norms in
            # fp32, SDPA): bitwise; interleaved RoPE (Mistral) rounds differently
            assert torch.equal(ours, theirs)
    stored = load_decoder(hf)  # without dtype=: the stored dtype, kept
    assert stored.tok_embeddings.weight.dtype == dtype


@pytest.mark.parametrize("case", sorted(CASES))
def test_fuse_validate_unfuse_diff_convert(tmp_path, case):
    family, _, dtype, _, encoder_kind = CASES[case]
    decoder = save_decoder(case, tmp_path / "hf")
    encoder = (save_siglip2 if encoder_kind == "siglip2" else save_clip)(tmp_path / encoder_kind)
    fused = tmp_path / "fused"

    result = cli("fuse", encoder, decoder, "-o", fused, "--every", "1", "--json")
    assert result.exit_code == 0, result.output
    config = json.loads((fused / "fusion_config.json").read_text())
    hf_config = json.loads((decoder / "config.json").read_text())
    # the fusion layers' norms follow the family: RMSNorms with the decoder's own epsilon,
    # of its kind (Gemma's (1 + w)), recorded; Qwen3's q/k norms are recorded as part of its
    # decoder config, and Gemma's window and its layers
    eps = hf_config["rms_norm_eps"]
    assert (config["fusion"]["ca_norm_eps"], config["fusion"]["qk_norm_eps"]) == (eps, eps)
    assert config["fusion"]["norm_unit_offset"] == (family in GEMMA)
    assert config["decoder"]["qk_norm"] == (family in QK_NORM)
    if family in (*GEMMA, "ministral"):
        assert config["decoder"]["sliding_window"] == 4
        assert config["decoder"]["sliding_layers"] == [
            i for i, kind in enumerate(hf_config["layer_types"]) if kind == "sliding_attention"]
    assert (config["decoder"]["family"], config["decoder"]["head_dim"]) == (family,
                                                                          _head_dim(case))
    if family == "phi3":  # the stacked tensors recorded as the source of each part
        assert config["decoder"]["partial_rotary_factor"] == CASES[case][1].get(
            "partial_rotary_factor", 1.0)
        source_keys = config["sources"]["decoder"]["source_keys"]
        assert {source_keys[f"layers.0.attn.{p}_proj.weight"] for p in "qkv"} == {
            "model.layers.0.self_attn.qkv_proj.weight"}

    result = cli("validate", fused, "--against", decoder, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["identity"], report
    assert {check["status"] for check in report["checks"]} == {"pass"}

    unfused = tmp_path / "unfused"
    result = cli("unfuse", fused, "-o", unfused)
    assert result.exit_code == 0, result.output
    original = _tensors(decoder)
    _assert_bitwise(_tensors(unfused), original)
    assert (unfused / "config.json").read_bytes() == (decoder / "config.json").read_bytes()
    result = cli("diff", "--values", decoder, unfused)
    assert result.exit_code == 0, result.output

    native = tmp_path / "native"
    shard = ["--max-shard-size", "3KB"] if family == "phi3" and CASES[case][3] else []
    result = cli("convert", decoder, "-o", native, "--to", "native", *shard)
    assert result.exit_code == 0, result.output
    if shard:  # a stacked tensor's parts land in different output shards
        weight_map = json.loads((native / "model.safetensors.index.json").read_text())[
            "weight_map"]
        assert len({weight_map[f"layers.0.attn.{p}_proj.weight"] for p in "qkv"}) > 1
    # torchtune's converter's names and values: Qwen3 renamed only (q_norm / k_norm inside
    # attn, no row permutation), Mistral NeMo's q/k rows permuted per head of 12
    reference_config = transformers.AutoConfig.from_pretrained(decoder)
    _assert_bitwise(_tensors(native), torchtune_state_dict(original, family, reference_config))
    result = cli("diff", "--values", decoder, native)  # lined up in one layout: identical
    assert result.exit_code == 0, result.output
    back = tmp_path / "back"
    result = cli("convert", native, "-o", back, "--to", "hf")  # stacked from several shards
    assert result.exit_code == 0, result.output
    _assert_bitwise(_tensors(back), {k: v for k, v in original.items()})
    assert json.loads((back / "config.json").read_text()) == hf_config


def test_siglip2_fixed_resolution_tower_equals_transformers(tmp_path):
    """The vision half of a SigLIP2 fixed-resolution SiglipModel: post-normed hidden states,
    no class token, 16-px patches, read as a SigLIP tower."""
    source = save_siglip2(tmp_path / "siglip2")
    reference = transformers.SiglipModel.from_pretrained(source).vision_model.eval()
    encoder = load_encoder(source).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = encoder(images), reference(pixel_values=images).last_hidden_state
    assert ours.shape == (2, 4, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_ministral_transformers_export_is_transformers_own_ministral(tmp_path):
    """``fuse --format transformers`` of a Ministral: the text model is transformers' own
    Ministral with the source's ``layer_types``, so with zero gates the export's logits past
    the window are the source's, bitwise."""
    decoder = save_decoder("ministral-f32", tmp_path / "hf")
    encoder = save_clip(tmp_path / "clip")
    export = tmp_path / "export"
    result = cli("fuse", encoder, decoder, "-o", export, "--every", "1", "--format",
                 "transformers")
    assert result.exit_code == 0, result.output
    config = json.loads((export / "config.json").read_text())["text_config"]
    assert (config["model_type"], config["layer_types"]) == (
        "ministral", ["full_attention", "sliding_attention"])
    exported = transformers.AutoModelForImageTextToText.from_pretrained(
        export, dtype=torch.float32, trust_remote_code=True).eval()
    tokens = torch.randint(0, SIZES["vocab_size"], (2, 20),
                           generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(exported(input_ids=tokens).logits, _reference(decoder)(tokens).logits)

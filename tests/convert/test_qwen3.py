"""Qwen3's pieces one at a time: its config reading (q/k norms are an architecture fact,
checked against the weights), its native layout without a config (torchtune's), what layouts
cannot hold it, and the q/k-norm scales' row order between RoPE pairings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from fusesurgery import load_decoder
from fusesurgery.cli.app import app
from fusesurgery.config import DECODER_PRESETS, DecoderConfig
from fusesurgery.convert.configs import (
    hf_config_dict,
    hf_sliding_window,
    meta_config_dict,
    read_hf_decoder_config,
)
from fusesurgery.convert.plan import apply_plan_entry, layout_tensor_infos, plan_conversion
from fusesurgery.errors import ConfigError
from fusesurgery.modules.builders import build_decoder, init_non_persistent_buffers
from fusesurgery.surgery import detect_checkpoint
from tests.tiny_models import save_tiny_hf_decoder, torchtune_state_dict

transformers = pytest.importorskip("transformers")
runner = CliRunner()

QWEN3 = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=12, vocab_size=64, max_position_embeddings=64)


def _randomise_norms(directory) -> None:
    """q/k norm scales of ones would hide a missing or misordered norm."""
    path = directory / "model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(path)
    generator = torch.Generator().manual_seed(1)
    for key, tensor in tensors.items():
        if "norm" in key:
            tensors[key] = 1 + 0.5 * torch.randn(tensor.shape, generator=generator)
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_native_qwen3_without_config_is_torchtunes_and_computes_transformers(tmp_path):
    """torchtune's qwen3_hf_to_tune renames (q_norm / k_norm under attn) and permutes nothing:
    such a file, with no config beside it, is told to be Qwen3 from its keys and computes
    transformers' logits given what no weight tells: the head count and the epsilon."""
    hf = save_tiny_hf_decoder("qwen3", tmp_path / "hf", QWEN3, tie_word_embeddings=False)
    _randomise_norms(hf)
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    native = tmp_path / "native.safetensors"
    save_file(torchtune_state_dict(reference.state_dict(), "qwen3", reference.config), native)

    overrides = {"num_heads": 4, "norm_eps": 1e-6}
    detected = detect_checkpoint(native, overrides=overrides)
    assert (detected.layout, detected.family) == ("native", "qwen3")
    assert detected.config.qk_norm and detected.provenance["qk_norm"] == "inferred"
    assert (detected.config.head_dim, detected.config.num_kv_heads) == (12, 2)
    decoder = load_decoder(native, overrides=overrides).eval()
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(decoder(tokens), reference(tokens).logits, rtol=0,
                                   atol=1e-5)


def test_a_qwen3_config_with_weights_lacking_q_k_norms_is_refused(tmp_path):
    """model_type qwen3 states the q/k norms: weights without them (a Qwen2-like file under a
    Qwen3 config) are refused, naming the missing keys, not read as another model."""
    hf = save_tiny_hf_decoder("qwen3", tmp_path / "hf", QWEN3)
    from safetensors.torch import load_file

    tensors = {key: value for key, value in load_file(hf / "model.safetensors").items()
               if "_norm." not in key or "layernorm" in key}
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="q_norm"):
        detect_checkpoint(hf)
    result = runner.invoke(app, ["inspect", str(hf)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "q_norm" in result.output


def test_qwen3_config_reads_family_facts_and_writes_them_back(tmp_path):
    hf = save_tiny_hf_decoder("qwen3", tmp_path / "hf", QWEN3, tie_word_embeddings=True)
    detected = detect_checkpoint(hf)
    assert detected.family == "qwen3" and detected.provenance["qk_norm"] == "read"
    assert detected.config.head_dim == 12 and detected.config.norm_eps == 1e-6
    written = hf_config_dict(detected.config)
    assert (written["model_type"], written["architectures"]) == ("qwen3", ["Qwen3ForCausalLM"])
    assert written["head_dim"] == 12
    # a Llama cannot have q/k norms in a transformers config, nor a Qwen3 lack them
    with pytest.raises(ConfigError, match="qk_norm"):
        hf_config_dict(detected.config.replace(family="llama"))
    with pytest.raises(ConfigError, match="qk_norm"):
        hf_config_dict(detected.config.replace(qk_norm=False))


def test_qwen3_settings_the_native_model_does_not_compute_are_refused_or_read():
    """attention_bias puts a bias on Qwen3's o_proj too, which the native attention lacks;
    a sliding window is applied as Qwen2's is (use_sliding_window, from max_window_layers),
    and read into the native config."""
    with pytest.raises(ConfigError, match="attention_bias"):
        read_hf_decoder_config({"model_type": "qwen3", "attention_bias": True})
    windowed = {"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 8,
                "num_hidden_layers": 2, "max_window_layers": 1, "max_position_embeddings": 64}
    assert hf_sliding_window(windowed, "qwen3") == 8
    assert hf_sliding_window({**windowed, "use_sliding_window": False}, "qwen3") is None
    read = read_hf_decoder_config(windowed)
    assert read.differences == [] and (read.read["sliding_window"],
                                       read.read["sliding_layers"]) == (8, (1,))
    assert read_hf_decoder_config({**windowed, "use_sliding_window": False}).read[
        "sliding_layers"] == ()


def test_a_base_without_head_dim_gets_one_where_transformers_would_assume_another():
    """transformers' Qwen3Config takes head_dim 128 when config.json is silent, whatever the
    width, and Qwen2Config takes 32 key/value heads: written over such a base, the config
    states the model's own values instead of leaving transformers to assume others."""
    qwen3 = DECODER_PRESETS["qwen3_0_6b"].replace(head_dim=64)
    base = hf_config_dict(qwen3)
    del base["head_dim"]
    assert hf_config_dict(qwen3, base=base)["head_dim"] == 64
    qwen2 = DECODER_PRESETS["qwen2_0_5b"].replace(num_kv_heads=14)
    base = hf_config_dict(qwen2)
    del base["num_key_value_heads"]
    assert hf_config_dict(qwen2, base=base)["num_key_value_heads"] == 14
    # where transformers' assumption is the model's value, nothing is added
    base = hf_config_dict(DECODER_PRESETS["qwen3_0_6b"])
    del base["head_dim"]
    assert "head_dim" not in hf_config_dict(DECODER_PRESETS["qwen3_0_6b"], base=base)


def test_layouts_that_cannot_hold_q_k_norms_refuse_them(tmp_path):
    with pytest.raises(ConfigError, match="q/k norms"):
        meta_config_dict(DECODER_PRESETS["qwen3_0_6b"])
    hf = save_tiny_hf_decoder("qwen3", tmp_path / "hf", QWEN3)
    result = runner.invoke(app, ["convert", str(hf), "-o", str(tmp_path / "meta"),
                                 "--to", "meta"])
    assert result.exit_code == 2, result.output
    assert "k_norm.scale' has no name in the meta layout" in result.output
    assert not (tmp_path / "meta").exists()


def test_mllama_refuses_a_qwen3_fusion(tmp_path):
    from tests.fusion_inputs import save_encoder

    hf = save_tiny_hf_decoder("qwen3", tmp_path / "hf", QWEN3, tie_word_embeddings=False,
                              head_dim=8)  # even a head_dim of width / heads
    fused = tmp_path / "fused"
    result = runner.invoke(app, ["fuse", str(save_encoder("clip", tmp_path)), str(hf),
                                 "-o", str(fused), "--every", "2"])
    assert result.exit_code == 0, result.output
    config = json.loads((fused / "fusion_config.json").read_text())
    assert config["decoder"]["qk_norm"] is True
    result = runner.invoke(app, ["convert", str(fused), "-o", str(tmp_path / "mllama"),
                                 "--to", "mllama"])
    assert result.exit_code == 2, result.output
    assert "q/k head" in result.output


def test_q_k_norm_scales_follow_their_heads_rows_between_rope_pairings():
    """A q/k norm scale weighs one head's features, so a layout change that reorders each
    head's rows reorders the scale alike: a native interleaved model with q/k norms, converted
    to the rotate-half order, computes the same as the rotate-half model given those tensors."""
    interleaved = DecoderConfig(vocab_size=32, embed_dim=32, num_layers=1, num_heads=4,
                                num_kv_heads=2, head_dim=12, intermediate_dim=48,
                                max_seq_len=32, qk_norm=True)
    torch.manual_seed(0)
    source = build_decoder(interleaved).eval()
    with torch.no_grad():
        for name, parameter in source.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.5)
    state = source.state_dict()
    plan = plan_conversion(layout_tensor_infos(interleaved, dtype=torch.float32), "native",
                           interleaved, target_layout="hf")
    moved = {entry.target_key: apply_plan_entry(entry, state[entry.source_key])
             for entry in plan.entries}
    assert [entry.transform[0] for entry in plan.entries
            if entry.source_key.endswith("q_norm.scale")] == ["permute_qk_from_native"]

    half = build_decoder(interleaved.replace(family="qwen3")).eval()  # rotate-half RoPE
    from fusesurgery.convert.keymaps import keys_to_native

    native_names = keys_to_native(moved, "hf").mapping
    half.load_state_dict({native_names[key]: value for key, value in moved.items()})
    init_non_persistent_buffers(half)
    tokens = torch.randint(0, 32, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(half(tokens), source(tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("name", "transform", "q_rows"), [
    ("qwen3_0_6b", "identity", 16 * 128),         # 2048 q rows for a width of 1024
    ("mistral_nemo_12b", "permute_qk_to_native", 32 * 128),  # 4096 for a width of 5120
])
def test_real_sized_plans_use_head_dim_not_width_over_heads(name, transform, q_rows):
    """Planned from metadata alone at the real models' sizes: q/k rows are heads x head_dim,
    Qwen3's q/k norms are [head_dim] and keep their order, NeMo's rows are permuted per head
    of 128 (not of 160)."""
    config = DECODER_PRESETS[name]
    plan = plan_conversion(layout_tensor_infos(config, "hf"), "hf", config)
    entries = {entry.target_key: entry for entry in plan.entries}
    q = entries["layers.0.attn.q_proj.weight"]
    assert q.shape == (q_rows, config.embed_dim) and q.transform[0] == transform
    if transform != "identity":
        assert q.transform[1:] == (config.num_heads, 128)
        assert entries["layers.0.attn.k_proj.weight"].transform[1:] == (config.num_kv_heads, 128)
    norms = [key for key in entries if key.endswith(("q_norm.scale", "k_norm.scale"))]
    assert len(norms) == (2 * config.num_layers if config.qk_norm else 0)
    assert all(entries[key].shape == (128,) and entries[key].transform == ("identity",)
               for key in norms)

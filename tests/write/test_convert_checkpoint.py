import json

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from typer.testing import CliRunner

from fusesurgery import load_decoder, load_encoder
from fusesurgery.cli.app import app
from fusesurgery.errors import ConfigError
from fusesurgery.io import open_checkpoint
from fusesurgery.write import convert_checkpoint
from tests.tiny_models import torchtune_state_dict

SMALL = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture
def qwen_dir(tmp_path):
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL, tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def _llama_dir(tmp_path):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL)).eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_hf_native_hf_round_trip_is_bitwise(tmp_path, family, request):
    model, hf = request.getfixturevalue("qwen_dir") if family == "qwen2" else _llama_dir(tmp_path)
    result = convert_checkpoint(hf, tmp_path / "native", max_shard_size="40KB")
    assert result.written.plan.is_sharded and result.detected.layout == "hf"
    with open_checkpoint(tmp_path / "native") as native:
        assert ("layers.0.attn.q_proj.bias" in native) == (family == "qwen2")
        assert ("output.weight" in native) == (family == "llama")
    back = convert_checkpoint(tmp_path / "native", tmp_path / "hf2", to="hf")
    assert back.detected.layout == "native"
    with open_checkpoint(hf) as a, open_checkpoint(tmp_path / "hf2") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    reloaded = type(model).from_pretrained(tmp_path / "hf2").eval()
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 11))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)
        torch.testing.assert_close(load_decoder(tmp_path / "native")(tokens),
                                   model(tokens).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_native_tensors_are_torchtunes(tmp_path, family, request):
    """The native checkpoint holds exactly what torchtune's converter makes of the HF one:
    Qwen2's q/k/v weights and biases bitwise as Hugging Face stores them, Llama's q/k rows
    permuted into interleaved RoPE order."""
    model, hf = request.getfixturevalue("qwen_dir") if family == "qwen2" else _llama_dir(tmp_path)
    convert_checkpoint(hf, tmp_path / "native", to="native")
    with open_checkpoint(hf) as source:
        hf_state = {key: source.get_tensor(key) for key in source.keys()}
    expected = torchtune_state_dict(hf_state, family, model.config)
    with open_checkpoint(tmp_path / "native") as native:
        assert set(native.keys()) == set(expected)
        for key, tensor in expected.items():
            assert torch.equal(native.get_tensor(key), tensor), key
        for layer in range(SMALL["num_hidden_layers"]):
            for proj in ("q_proj", "k_proj", "v_proj"):
                for kind in ("weight", "bias") if family == "qwen2" else ("weight",):
                    stored = native.get_tensor(f"layers.{layer}.attn.{proj}.{kind}")
                    original = hf_state[f"model.layers.{layer}.self_attn.{proj}.{kind}"]
                    # Only Llama's q and k differ from Hugging Face's rows.
                    renamed_only = family == "qwen2" or proj == "v_proj"
                    assert torch.equal(stored, original) == renamed_only, (layer, proj, kind)


def test_vision_tower_to_native_and_dtype(tmp_path):
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=8)
    tf.SiglipVisionModel(tf.SiglipVisionConfig(**vision)).save_pretrained(tmp_path / "hf")
    result = convert_checkpoint(tmp_path / "hf", tmp_path / "native", dtype=torch.bfloat16)
    # SigLIP's pooling head is carried beside the native weights, not dropped
    assert not result.plan.dropped and (tmp_path / "native" / "siglip_head.safetensors").exists()
    with safe_open(tmp_path / "native" / "model.safetensors", "pt") as f:
        assert f.get_tensor("conv.weight").dtype == torch.bfloat16
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["encoder"]["family"] == "siglip" and config["torch_dtype"] == "bfloat16"
    assert load_encoder(tmp_path / "native").conv.weight.dtype == torch.bfloat16


def test_bad_target_and_existing_output(tmp_path, qwen_dir):
    _, hf = qwen_dir
    with pytest.raises(ConfigError, match="cannot convert to 'onnx'"):
        convert_checkpoint(hf, tmp_path / "x", to="onnx")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(hf), "-o", str(tmp_path / "taken")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_cli_convert_json(tmp_path, qwen_dir):
    _, hf = qwen_dir
    result = CliRunner().invoke(app, ["convert", str(hf), "-o", str(tmp_path / "out"),
                                      "--json", "--dtype", "f16"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["from"] == "hf" and payload["to"] == "native" and payload["tensors"] == 26
    bad = CliRunner().invoke(app, ["convert", str(hf), "-o", str(tmp_path / "o2"),
                                   "--dtype", "f13"])
    assert bad.exit_code == 2 and "unknown dtype" in bad.stderr

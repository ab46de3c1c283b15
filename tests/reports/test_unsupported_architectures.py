"""Issue 18 section 5: checkpoints of architectures no family file describes (OLMo2, GLM-4,
AIMv2, written by transformers itself). ``inspect`` still shows what a metadata viewer shows
(files, tensors, dtypes, parameters, config.json's main fields, key rows) and then which
native family it would need and the closest supported one; the commands that need a native
module (``convert --to native``, ``load_decoder``, ``load_encoder``) refuse in one line that
names the closest family and how to add one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import fusesurgery
from fusesurgery.cli.app import app
from fusesurgery.errors import UnsupportedFamilyError
from fusesurgery.reports import inspect_checkpoint

transformers = pytest.importorskip("transformers")
runner = CliRunner()

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=8)

# name -> (config class, model class, settings, model_type, kind, closest family)
CASES = {
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", SIZES, "olmo2", "decoder", "llama"),
    # Phi-3's file has GLM-4's stacked gate_up_proj and partial rotary
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {**SIZES, "head_dim": 8, "pad_token_id": 0},
             "glm4", "decoder", "phi3"),
    "granite": ("GraniteConfig", "GraniteForCausalLM", SIZES, "granite", "decoder", "llama"),
    "aimv2": ("Aimv2VisionConfig", "Aimv2VisionModel", VISION, "aimv2_vision_model", "vision",
              "siglip"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unsupported")
    out = {}
    for name, (config_cls, model_cls, settings, *_) in CASES.items():
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**settings))
        model.save_pretrained(root / name)
        out[name] = root / name
    torch.manual_seed(0)  # a torch pickle checkpoint of one, as older repos hold
    model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**SIZES))
    model.save_pretrained(root / "olmo2-bin", safe_serialization=False)
    out["olmo2-bin"] = root / "olmo2-bin"
    return out


@pytest.mark.parametrize("name", [*CASES, "olmo2-bin"])
def test_inspect_shows_the_metadata_and_the_family_it_needs(saved, name):
    _, _, settings, model_type, kind, closest = CASES[name.removesuffix("-bin")]
    weights = {}
    for file in saved[name].iterdir():
        if file.suffix in (".safetensors", ".bin"):
            weights.update(torch.load(file, weights_only=True) if file.suffix == ".bin"
                           else load_file(file))
    report = inspect_checkpoint(saved[name])
    assert report.model is None and report.kind == "unsupported"
    assert report.num_tensors == len(weights)
    assert report.num_parameters == sum(t.numel() for t in weights.values())
    assert {row.dtype for row in report.key_rows} == {"f32"}
    assert sum(row.num_tensors for row in report.key_rows) == len(weights)
    fields = report.unsupported.config_fields
    assert fields["model_type"] == model_type and fields["hidden_size"] == 32
    assert report.unsupported.kind == kind
    assert report.unsupported.closest.family.name == closest
    assert f"model_type {model_type!r} needs a native {kind} family of its own" in (
        report.unsupported.needs())

    result = runner.invoke(app, ["inspect", str(saved[name])], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].startswith(("safetensors, 1 file", "torch, 1 file"))
    assert f"{len(weights)} tensors" in lines[1] and "parameters" in lines[1]
    assert lines[2] == f"{kind} · {model_type} · no supported family"
    assert any(line.split()[:2] == ["hidden_size", "32"] for line in lines)
    assert any(line.startswith("f32") for line in lines)  # the dtypes table
    if kind == "decoder":
        assert any(line.startswith("model.layers.{0,1}.self_attn.q_proj.weight")
                   for line in lines)
    assert lines[-1].startswith(f"model_type {model_type!r} needs a native {kind} family")
    assert f"closest supported family is {closest} (" in lines[-1]
    assert f"copy fusesurgery/families/{closest}.py" in lines[-1]


def test_inspect_json_of_an_unsupported_architecture(saved):
    result = runner.invoke(app, ["inspect", str(saved["glm4"]), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["architecture"]["supported"] is False
    assert payload["architecture"]["closest_family"] == "phi3"
    assert payload["config_fields"]["head_dim"] == 8
    assert payload["key_tree"] and payload["num_tensors"] == sum(
        row["num_tensors"] for row in payload["key_tree"])
    assert "is not a supported decoder" in payload["error"]


@pytest.mark.parametrize("name", list(CASES))
def test_convert_names_the_closest_family_and_how_to_add_one(saved, tmp_path, name):
    _, _, _, model_type, kind, closest = CASES[name]
    result = runner.invoke(app, ["convert", str(saved[name]), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    what = "decoder" if kind == "decoder" else "vision encoder"
    message = result.stderr.strip()
    assert message.count("\n") == 0 and "Traceback" not in message
    assert f"model_type {model_type!r} is not a supported {what}" in message
    assert f"the closest supported family is {closest} (" in message
    assert 'README, "Adding a family"' in message
    assert not (tmp_path / "out").exists()


def test_load_decoder_and_load_encoder_name_the_closest_family(saved):
    for name, (*_, model_type, kind, closest) in CASES.items():
        if kind != "decoder":
            continue
        with pytest.raises(UnsupportedFamilyError, match=f"closest supported family is "
                                                         f"{closest} .*Adding a family") as info:
            fusesurgery.load_decoder(saved[name])
        assert (info.value.model_type, info.value.kind, info.value.closest) == (
            model_type, "decoder", closest)
    with pytest.raises(UnsupportedFamilyError, match="closest supported family is siglip"):
        fusesurgery.load_encoder(saved["aimv2"])


def test_a_multimodal_checkpoint_keeps_its_own_error(tmp_path):
    """A config with a text_config and a vision_config is no single family: not reported as
    one that needs a family file."""
    save_file({"language_model.model.embed_tokens.weight": torch.zeros(4, 2)},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llava", "text_config": {}, "vision_config": {}}))
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "multimodal model" in result.stderr


def test_an_unknown_model_type_no_family_lists_is_matched_by_key_names():
    """No family file names ``brand_new``: its kind comes from config.json's architecture,
    the closest family from the transformers key names it shares."""
    from fusesurgery.convert.detect import unsupported_family
    from fusesurgery.io import TensorInfo

    keys = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.bias", "model.layers.0.mlp.fused_proj.weight"]
    tensors = {key: TensorInfo(key, (4, 4), torch.float32) for key in keys}
    error = unsupported_family(tensors, {"model_type": "brand_new",
                                         "architectures": ["BrandNewForCausalLM"]}, "config.json")
    assert (error.kind, error.closest) == ("decoder", "qwen2")  # it has q/k/v biases
    assert "by key names: 3 of its 15 key rows" in str(error)
    neither = unsupported_family({}, {"model_type": "mystery"}, "config.json")
    assert neither.kind is None and "is neither a supported decoder" in str(neither)
    assert unsupported_family({}, {"model_type": "llama"}, "config.json") is None


@pytest.fixture(scope="module")
def configless(tmp_path_factory) -> dict[str, Path]:
    """OLMo2's weights without a config.json: a bare safetensors file, a torch state dict,
    and a sharded directory (index and shards, written by transformers, config removed)."""
    root = tmp_path_factory.mktemp("configless")
    torch.manual_seed(0)
    model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**SIZES))
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    (root / "sharded" / "config.json").unlink()
    weights = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    save_file(weights, root / "olmo2.safetensors")
    torch.save(weights, root / "olmo2.pt")
    return {"safetensors file": root / "olmo2.safetensors", "torch state dict":
            root / "olmo2.pt", "sharded without config": root / "sharded"}


@pytest.mark.parametrize("name", ["safetensors file", "torch state dict",
                                  "sharded without config"])
def test_inspect_without_a_config_shows_the_metadata_and_the_family_it_needs(configless,
                                                                          name):
    path = configless[name]
    assert len(list(path.glob("*.safetensors"))) > 1 if path.is_dir() else True
    result = runner.invoke(app, ["inspect", str(path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].startswith(("safetensors, 1 file", "torch, 1 file",
                                "safetensors-sharded, "))
    assert "25 tensors" in lines[1] and "parameters" in lines[1]
    assert lines[2] == "decoder · unknown · no supported family"
    assert "from key names and shapes" in lines
    for field, value in [("vocab_size", "64"), ("hidden_size", "32"),
                         ("num_hidden_layers", "2"), ("intermediate_size", "48")]:
        assert any(line.split() == [field, value] for line in lines), field
    assert any(line.startswith("f32") for line in lines)  # the dtypes table
    assert any(line.startswith("model.layers.{0,1}.post_feedforward_layernorm.weight")
               for line in lines)
    assert lines[-1].startswith("this checkpoint (no config; its keys look like olmo2 (norms "
                                "after attention and MLP only, q/k norms)) needs a native "
                                "decoder family of its own: the closest supported family is")
    assert "copy fusesurgery/families/" in lines[-1]

    payload = json.loads(runner.invoke(app, ["inspect", str(path), "--json"]).stdout)
    assert payload["config_fields_from"] == "shapes"
    assert payload["architecture"]["looks_like"].startswith("olmo2")
    assert payload["num_tensors"] == 25
    # a command that needs a native module still refuses in one line
    refused = runner.invoke(app, ["convert", str(path), "-o", str(path.parent / "out")])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.output


@pytest.mark.parametrize(("config_cls", "model_cls", "settings", "looks_like", "head_dim"), [
    ("Gemma3TextConfig", "Gemma3ForCausalLM", {**SIZES, "head_dim": 8}, "gemma3_text", 8),
    ("Gemma2Config", "Gemma2ForCausalLM", {**SIZES, "head_dim": 8}, "gemma2", None),
    ("Phi3Config", "Phi3ForCausalLM", {**SIZES, "pad_token_id": None}, "phi3", None),
])
def test_key_names_and_shapes_say_what_a_configless_decoder_looks_like(
        config_cls, model_cls, settings, looks_like, head_dim):
    """From transformers' own key names and shapes (built on the meta device)."""
    from fusesurgery.io import TensorInfo
    from fusesurgery.reports.inspection import _fields_from_shapes, _looks_like

    with torch.device("meta"):
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**settings))
    infos = {key: TensorInfo(key, tuple(t.shape), t.dtype)
             for key, t in model.state_dict().items()}
    assert _looks_like(infos).startswith(looks_like + " (")
    fields = _fields_from_shapes(infos)
    assert (fields["vocab_size"], fields["hidden_size"], fields["num_hidden_layers"]) == (
        64, 32, 2)
    if head_dim is not None:
        assert (fields["head_dim"], fields["num_attention_heads"],
                fields["num_key_value_heads"]) == (head_dim, 4, 2)


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case[4] == "decoder"])
def test_fuse_of_a_decoder_with_no_native_module_goes_through_transformers_with_a_note(
        saved, tmp_path, name):
    tower = tmp_path / "clip"
    torch.manual_seed(0)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).save_pretrained(tower)
    result = runner.invoke(app, ["fuse", str(tower), str(saved[name]), "-o",
                                 str(tmp_path / "fused"), "--every", "1"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "no native module" in line]
    assert notes == [f"note: the decoder's family {name!r} has no native module: written in "
                     "the transformers layout (load it with AutoModelForImageTextToText)"]
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config["text_config"]["model_type"] == name


def test_the_closest_family_is_the_file_with_the_most_of_what_it_needs():
    """A relative is named by the family file nearest to it, not by the oldest one: GLM-4's
    stacked gate_up_proj and partial rotary are Phi-3's, Gemma 1's layers Gemma 2's minus."""
    from fusesurgery.families import closest_family

    assert closest_family("decoder", "glm4").family.name == "phi3"
    assert closest_family("decoder", "gemma").family.name == "gemma2"
    assert closest_family("decoder", "granite").family.name == "llama"

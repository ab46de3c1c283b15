"""``fusesurgery convert FUSED --to transformers`` and back (``convert EXPORT --to native``):
the round trip gives the fused checkpoint's tensors back bitwise; the export's keys are the
sources' own transformers names; bad requests are one line and exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fusesurgery.cli.app import app

pytest.importorskip("transformers")
runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


@pytest.fixture(scope="module")
def export(fused_example, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    result = runner.invoke(app, ["convert", str(fused_example), "-o", str(out),
                                 "--to", "transformers", "--max-shard-size", "300KB"])
    assert result.exit_code == 0, result.output
    assert "fused -> transformers: 109 tensors" in result.stdout
    return out


def test_export_is_a_transformers_model_directory(export):
    names = {p.name for p in export.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json",
            "generation_config.json", "preprocessor_config.json",
            "configuration_fusesurgery_fused.py", "modeling_fusesurgery_fused.py"} <= names
    config = json.loads((export / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == (
        "modeling_fusesurgery_fused.FusedVisionTextForConditionalGeneration")
    assert config["text_config"]["model_type"] == "llama"
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["fusion_layers"] == [1, 3] and config["image_token_id"] == 512
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded


def test_export_keys_are_the_sources_own_names_and_bytes(export):
    exported = _tensors(export)
    llama = load_file(EXAMPLES / "tiny-llama" / "model.safetensors")
    clip = load_file(EXAMPLES / "tiny-clip-vision" / "model.safetensors")
    for key, tensor in llama.items():  # q/k rows back in transformers' order: equal bytes
        assert torch.equal(exported["language_model." + key], tensor), key
    for key, tensor in clip.items():
        assert torch.equal(exported["vision_tower." + key], tensor), key
    fusion = set(exported) - {"language_model." + k for k in llama} - {
        "vision_tower." + k for k in clip}
    assert {k.split(".")[0] for k in fusion} == {
        "cross_attention_layers", "projection", "fusion_embedding"}
    assert {k.split(".")[1] for k in fusion if k.startswith("cross")} == {"1", "3"}


def test_back_to_native_gives_the_fused_checkpoint_bitwise(export, fused_example, tmp_path):
    back = tmp_path / "back"
    result = runner.invoke(app, ["convert", str(export), "-o", str(back)])
    assert result.exit_code == 0, result.output
    original, returned = _tensors(fused_example), _tensors(back)
    assert sorted(original) == sorted(returned)
    assert all(torch.equal(original[k], returned[k]) for k in original)
    assert (back / "fusion_config.json").read_bytes() == (
        fused_example / "fusion_config.json").read_bytes()
    for kept in (fused_example / "source").rglob("*"):
        if kept.is_file():
            assert (back / kept.relative_to(fused_example)).read_bytes() == kept.read_bytes()


def test_register_transformers_loads_it_without_remote_code(export):
    from transformers import AutoModelForImageTextToText

    from fusesurgery.hf import register_transformers
    from fusesurgery.hf.template.modeling_fusesurgery_fused import (
        FusedVisionTextForConditionalGeneration,
    )

    register_transformers()
    register_transformers()  # twice is harmless
    model = AutoModelForImageTextToText.from_pretrained(export)
    assert type(model) is FusedVisionTextForConditionalGeneration


@pytest.mark.parametrize(("source", "args", "message"), [
    ("decoder", ["--to", "transformers"], "is not a fused checkpoint written by fusesurgery"),
    ("fused", ["--to", "transformers", "--dtype", "bf16"], "--dtype is not supported"),
    ("fused", ["--to", "transformers", "--num-heads", "4"], "config overrides are not supported"),
    ("export", ["--to", "native", "--norm-eps", "1e-6"], "config overrides are not supported"),
    ("export", ["--to", "hf"], "only --to native converts it"),
    ("export", ["--to", "transformers"], "only --to native converts it"),
])
def test_bad_requests_are_one_line_exit_2(source, args, message, export, fused_example,
                                          tmp_path):
    path = {"decoder": EXAMPLES / "tiny-llama", "fused": fused_example, "export": export}[source]
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(path), "-o", str(out), *args])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_output_inside_the_fused_input_is_refused(fused_example):
    out = fused_example / "hf"
    result = runner.invoke(app, ["convert", str(fused_example), "-o", str(out),
                                 "--to", "transformers"])
    assert result.exit_code == 2 and "lies inside the input" in result.stderr
    assert not out.exists()


def test_inspect_describes_an_export(export):
    result = runner.invoke(app, ["inspect", str(export)])
    assert result.exit_code == 0, result.output
    assert "a transformers export (convert --to transformers): clip_vision_model tower -> " \
        "llama text model" in result.stdout
    assert "identity: all gates 0 (4 gates)" in result.stdout


@pytest.mark.parametrize(("part", "field", "fragment"), [
    ("vision_config", "hidden_size", "expected [96, 3, 8, 8]"),
    ("vision_config", "num_hidden_layers", "gives num_layers 3, but the checkpoint holds 2"),
    ("text_config", "intermediate_size", "disagrees with text_config"),
])
def test_inspect_says_when_an_edited_config_no_longer_describes_the_weights(
        export, tmp_path, part, field, fragment):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(export, copy)
    document = json.loads((copy / "config.json").read_text())
    document[part][field] += 1 if field == "num_hidden_layers" else document[part][field]
    (copy / "config.json").write_text(json.dumps(document))
    result = runner.invoke(app, ["inspect", str(copy)])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and f"config.json's {part} does not describe the weights" in notes[0]
    assert fragment in notes[0]
    clean = runner.invoke(app, ["inspect", str(export)])
    assert "note:" not in clean.stdout


def test_training_with_gradient_checkpointing_gets_the_same_gradients(export):
    from transformers import AutoModelForImageTextToText

    from fusesurgery.hf import register_transformers

    register_transformers()
    model = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32)
    with torch.no_grad():  # gates open, so the image reaches the loss
        for name, param in model.named_parameters():
            if name.endswith(("ca_scale.scale", "mlp_scale.scale")):
                param.fill_(0.5)
    ids = torch.tensor([[1, 17, 42, 512, 7, 9, 11, 5]])
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def fusion_grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        loss = model(input_ids=ids, pixel_values=images, labels=ids, use_cache=False).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()
                if n.startswith("cross_attention_layers.")}

    model.train()
    plain = fusion_grads()
    enable = (getattr(model, "activation_checkpointing_enable", None)
              or model.gradient_checkpointing_enable)
    enable()
    checkpointed = fusion_grads()
    assert plain and all(g.abs().sum() > 0 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(("part", "example", "files"), [
    ("decoder", "tiny-llama", ("config.json", "generation_config.json", "tokenizer.json",
                               "tokenizer_config.json")),
    ("encoder", "tiny-clip-vision", ("config.json", "preprocessor_config.json")),
])
def test_unfuse_of_an_export_gives_the_source_back(part, example, files, export, tmp_path):
    out = tmp_path / part
    result = runner.invoke(app, ["unfuse", str(export), "-o", str(out), "--part", part])
    assert result.exit_code == 0, result.output
    original, returned = _tensors(EXAMPLES / example), _tensors(out)
    assert sorted(original) == sorted(returned)
    assert all(torch.equal(original[k], returned[k]) for k in original)
    for name in files:  # the source's own files, byte for byte
        assert (out / name).read_bytes() == (EXAMPLES / example / name).read_bytes(), name


def test_unfuse_of_an_export_refuses_what_a_prefix_strip_cannot_do(export, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["unfuse", str(export), "-o", str(out), "--merge-embeddings"])
    assert result.exit_code == 2 and "--merge-embeddings is not supported" in result.stderr
    assert not out.exists()


def test_trained_in_transformers_and_back_says_trained(export, tmp_path):
    from transformers import AutoModelForImageTextToText

    from fusesurgery.hf import register_transformers

    register_transformers()
    model = AutoModelForImageTextToText.from_pretrained(export)
    with torch.no_grad():
        model.cross_attention_layers["1"].ca_scale.scale.fill_(0.5)
    model.save_pretrained(tmp_path / "trained-hf")
    back = tmp_path / "back"
    result = runner.invoke(app, ["convert", str(tmp_path / "trained-hf"), "-o", str(back)])
    assert result.exit_code == 0, result.output
    config = json.loads((back / "fusion_config.json").read_text())
    assert config["trained"] is True
    assert config["gates"]["decoder.layers.1.fusion_layer.ca_scale.scale"] == 0.5
    assert config["gates"]["decoder.layers.3.fusion_layer.mlp_scale.scale"] == 0.0


def test_convert_checkpoint_names_the_exporter(fused_example, tmp_path):
    from fusesurgery.errors import ConfigError
    from fusesurgery.write import convert_checkpoint

    with pytest.raises(ConfigError, match="fusesurgery.export_transformers"):
        convert_checkpoint(fused_example, tmp_path / "out", to="transformers")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def export_without_tokenizer(export, tmp_path_factory) -> Path:
    import shutil

    copy = tmp_path_factory.mktemp("no-tokenizer") / "hf"
    shutil.copytree(export, copy)
    (copy / "tokenizer.json").unlink()
    return copy


@pytest.mark.parametrize("command", ["unfuse", "validate"])
def test_an_export_missing_its_tokenizer_says_the_processor_cannot_load(
        export, export_without_tokenizer, tmp_path, command):
    args = ([command, str(export_without_tokenizer), "-o", str(tmp_path / "out")]
            if command == "unfuse" else [command, str(export_without_tokenizer)])
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "tokenizer.json is missing: AutoProcessor cannot load this export" in result.output
    if command == "unfuse":  # the decoder written is whole: its tokenizer comes from source/
        assert (tmp_path / "out" / "tokenizer.json").is_file()
    if command == "unfuse":
        clean = runner.invoke(app, [command, str(export), "-o", str(tmp_path / "clean")])
        assert clean.exit_code == 0 and "AutoProcessor cannot load" not in clean.output


def test_no_processor_config_for_a_decoder_without_a_tokenizer(tmp_path):
    import shutil

    import fusesurgery

    decoder = tmp_path / "llama"
    decoder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(EXAMPLES / "tiny-llama" / name, decoder / name)
    fusesurgery.fuse(EXAMPLES / "tiny-clip-vision", decoder, tmp_path / "fused", every=2)
    result = runner.invoke(app, ["convert", str(tmp_path / "fused"), "-o", str(tmp_path / "hf"),
                                 "--to", "transformers"])
    assert result.exit_code == 0, result.output
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert "config.json" in names and "preprocessor_config.json" in names
    assert "processor_config.json" not in names  # a processor that could not load

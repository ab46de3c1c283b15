"""Class 4: damaged files, duplicate keys and config values that the shapes or the domain
contradict are errors, never a model that loads with wrong numbers."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusesurgery import detect_checkpoint, load_decoder
from fusesurgery.errors import CheckpointError, ConfigError
from fusesurgery.io import open_checkpoint
from tests.hardening.conftest import assert_one_line_error, cli, edit_config


def strict_json(text: str):
    """Parse as a standard JSON parser would: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def llama_pt(llama: Path, path: Path) -> Path:
    torch.save(load_file(llama / "model.safetensors"), path)
    return path


def shorten_record(path: Path, record_suffix: str, keep: int) -> Path:
    """A copy of a torch.save zip whose data record ``record_suffix`` keeps ``keep`` bytes."""
    damaged = path.with_name("damaged-" + path.name)
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(damaged, "w") as out:
        for record in source.infolist():
            data = source.read(record.filename)
            if record.filename.endswith(record_suffix):
                data = data[:keep]
            out.writestr(record.filename, data)
    return damaged


def test_a_torch_record_shorter_than_its_tensor_is_an_error(llama, tmp_path):
    damaged = shorten_record(llama_pt(llama, tmp_path / "llama.pt"), "data/0", 8)
    with pytest.raises(CheckpointError, match="needs .* bytes, its record .* holds 8"):
        open_checkpoint(damaged)
    with pytest.raises(CheckpointError, match="holds 8"):
        load_decoder(damaged, overrides={"num_heads": 4})
    assert_one_line_error(cli("convert", damaged, "-o", tmp_path / "out", "--num-heads", 4),
                          "holds 8")
    assert not (tmp_path / "out").exists()


def test_an_intact_torch_file_still_loads_every_byte(llama, tmp_path):
    path = llama_pt(llama, tmp_path / "llama.pt")
    expected = load_file(llama / "model.safetensors")
    with open_checkpoint(path) as source:
        for key, tensor in expected.items():
            assert torch.equal(source.get_tensor(key), tensor)


def write_index(directory: Path, body: str) -> Path:
    index = directory / "model.safetensors.index.json"
    index.write_text(body)
    return index


def test_a_shard_index_naming_a_key_twice_is_an_error(llama):
    (llama / "model.safetensors").rename(llama / "model-00001-of-00002.safetensors")
    (llama / "model-00002-of-00002.safetensors").write_bytes(
        (llama / "model-00001-of-00002.safetensors").read_bytes())
    keys = list(load_file(llama / "model-00001-of-00002.safetensors"))
    entries = [f'"{key}": "model-00001-of-00002.safetensors"' for key in keys]
    entries.append(f'"{keys[0]}": "model-00002-of-00002.safetensors"')
    write_index(llama, '{"metadata": {}, "weight_map": {' + ", ".join(entries) + "}}")
    with pytest.raises(CheckpointError, match=f"names '{keys[0]}' twice"):
        open_checkpoint(llama)
    assert_one_line_error(cli("inspect", llama), "twice")


def test_a_config_key_given_twice_is_an_error(llama):
    text = (llama / "config.json").read_text()
    (llama / "config.json").write_text(text.replace('"num_attention_heads": 4',
                                                    '"num_attention_heads": 4, '
                                                    '"num_attention_heads": 8'))
    with pytest.raises(ConfigError, match="num_attention_heads' twice"):
        detect_checkpoint(llama)


def test_a_config_silent_on_the_head_count_asks_for_it(llama):
    (llama / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match=r"num_heads.*--num-heads"):
        detect_checkpoint(llama)
    described = cli("inspect", llama)  # inspect shows what it can, and what needs the flag
    assert described.exit_code == 0, described.output
    assert "num_heads ? needs --num-heads" in " ".join(described.stdout.split())
    detected = detect_checkpoint(llama, overrides={"num_heads": 4})
    assert (detected.config.num_heads, detected.config.head_dim) == (4, 16)


def test_a_vision_config_silent_on_the_head_count_asks_for_it(clip):
    edit_config(clip, num_attention_heads=...)
    with pytest.raises(ConfigError, match="--encoder-num-heads"):
        detect_checkpoint(clip)


BAD_DECODER_VALUES = [
    ("rms_norm_eps", math.nan, "norm_eps"),
    ("rms_norm_eps", math.inf, "norm_eps"),
    ("rms_norm_eps", 0, "norm_eps"),
    ("num_attention_heads", 0, "num_heads"),
    ("num_attention_heads", -4, "num_heads"),
    ("num_attention_heads", "4", "num_heads"),
    ("num_attention_heads", 4.0, "num_heads"),
    ("num_key_value_heads", 3, "num_kv_heads"),
    ("hidden_size", [64], "embed_dim"),
    ("vocab_size", True, "vocab_size"),
    ("intermediate_size", None, "intermediate_dim"),  # null: left to the shapes, must match
    ("max_position_embeddings", -1, "max_seq_len"),
    ("tie_word_embeddings", "no", "tie_word_embeddings"),
    ("head_dim", 0, "head_dim"),
    ("model_type", ["llama"], "model_type"),
    ("architectures", 7, "config.json"),  # read only without a model_type: removed below
    ("rope_scaling", "llama3", "rope_scaling"),  # read only without rope_parameters: removed
]


@pytest.mark.parametrize(("key", "value", "field"), BAD_DECODER_VALUES,
                         ids=[f"{k}={v!r}" for k, v, _ in BAD_DECODER_VALUES])
def test_out_of_domain_decoder_values_name_the_field_and_the_file(llama, key, value, field):
    edit_config(llama, **{key: value})
    if key == "architectures":
        edit_config(llama, model_type=...)
    if key == "rope_scaling":
        edit_config(llama, rope_parameters=...)
    if key == "intermediate_size":
        edit_config(llama, intermediate_size=...)  # null and absent alike: inferred, accepted
        assert detect_checkpoint(llama).config.intermediate_dim == 172
        return
    with pytest.raises(ConfigError) as error:
        detect_checkpoint(llama)
    message = str(error.value)
    assert "config.json" in message and field in message, message
    assert_one_line_error(cli("inspect", llama), "config.json")


@pytest.mark.parametrize(("key", "value"), [("rope_theta", -1.0), ("rope_theta", "big"),
                                            ("factor", math.nan), ("factor", -8)])
def test_out_of_domain_rope_values_name_the_file(llama, key, value):
    config = json.loads((llama / "config.json").read_text())
    config["rope_parameters"][key] = value
    (llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="config.json"):
        detect_checkpoint(llama)


@pytest.mark.parametrize(("key", "value"), [("layer_norm_eps", -1e-5), ("image_size", "32"),
                                            ("patch_size", 0), ("hidden_act", 3)])
def test_out_of_domain_vision_values_name_the_file(clip, key, value):
    edit_config(clip, **{key: value})
    with pytest.raises(ConfigError, match="config.json"):
        detect_checkpoint(clip)
    assert_one_line_error(cli("inspect", clip), "config.json")


def test_json_reports_are_standard_json_even_for_nan_weights(llama, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_bytes((llama / "config.json").read_bytes())
    tensors = load_file(llama / "model.safetensors")
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], math.nan)
    from safetensors.torch import save_file

    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    for args in (("diff", llama, other, "--values", "--json"), ("inspect", other, "--json"),
                 ("inspect", llama, "--json", "--keys")):
        result = cli(*args)
        assert result.exit_code in (0, 1), result.output
        strict_json(result.stdout)


def test_written_config_files_are_standard_json(llama, tmp_path):
    assert cli("convert", llama, "-o", tmp_path / "native").exit_code == 0
    assert cli("convert", tmp_path / "native", "-o", tmp_path / "hf", "--to", "hf").exit_code == 0
    for name in ("native", "hf"):
        strict_json((tmp_path / name / "config.json").read_text())

"""Class 5: every failure is a FuseSurgeryError (exit 2 with one line), never a bare torch
or Python error from deep inside (exit 3, "a bug in fusesurgery")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusesurgery import DecoderConfig, VisionEncoderConfig, load_decoder, load_encoder
from fusesurgery.errors import CheckpointError, ConfigError, ShapeError
from fusesurgery.write import convert_checkpoint
from tests.hardening.conftest import assert_one_line_error, cli

TINY = dict(vocab_size=8, embed_dim=8, num_layers=1, num_heads=2, intermediate_dim=8)


@pytest.mark.parametrize("changes", [{"num_heads": 0}, {"num_kv_heads": 0}, {"head_dim": 0},
                                     {"num_heads": 3}, {"embed_dim": 0}])
def test_zero_or_non_dividing_heads_are_config_errors(changes):
    with pytest.raises(ConfigError):
        DecoderConfig(**{**TINY, **changes})


def test_zero_vision_heads_are_a_config_error():
    with pytest.raises(ConfigError, match="num_heads"):
        VisionEncoderConfig(image_size=8, patch_size=4, embed_dim=8, num_layers=1, num_heads=0,
                            intermediate_dim=8)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.complex64,
                                   "bfloat16"])
def test_an_unsupported_cast_dtype_is_a_config_error(llama, clip, tmp_path, dtype):
    with pytest.raises(ConfigError, match="cannot cast weights"):
        load_decoder(llama, dtype=dtype)
    with pytest.raises(ConfigError, match="cannot cast weights"):
        load_encoder(clip, dtype=dtype)
    with pytest.raises(ConfigError, match="cannot cast weights"):
        convert_checkpoint(llama, tmp_path / "out", dtype=dtype)
    assert not (tmp_path / "out").exists()


def test_meta_device_tensors_in_a_checkpoint_are_a_checkpoint_error(llama, tmp_path):
    tensors = {key: torch.empty_like(value, device="meta")
               for key, value in load_file(llama / "model.safetensors").items()}
    torch.save(tensors, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="meta device"):
        load_decoder(tmp_path / "meta.pt", overrides={"num_heads": 4})
    assert_one_line_error(cli("inspect", tmp_path / "meta.pt"), "meta device")


def int_weights(llama: Path, path: Path) -> Path:
    tensors = load_file(llama / "model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_integer_weights_are_a_shape_error(llama, tmp_path):
    path = int_weights(llama, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((llama / "config.json").read_bytes())
    with pytest.raises(ShapeError, match="int32 values"):
        load_decoder(path)
    assert_one_line_error(cli("convert", path, "-o", tmp_path / "out"), "int32")
    assert not (tmp_path / "out").exists()

"""CheckpointSource.read_scalar: a gate's value from the file's bytes, equal to torch's."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from safetensors.torch import save_file

from fusesurgery.errors import CheckpointError
from fusesurgery.io import open_checkpoint

VALUES = [0.0, -0.0, 1.0, -2.5, 0.123456789, 3.0e-5, 65504.0, 1e-40, math.inf, -math.inf]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                   torch.float8_e4m3fn])
def test_read_scalar_is_the_stored_value(tmp_path, dtype):
    tensors = {f"g{i}": torch.tensor([value]).to(dtype) for i, value in enumerate(VALUES)}
    tensors["nan"] = torch.tensor(math.nan).to(dtype)  # a 0-d tensor too
    save_file(tensors, tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as source:
        for key, tensor in tensors.items():
            got, expected = source.read_scalar(key), float(tensor.reshape(-1)[0].item())
            assert isinstance(got, float)
            if math.isnan(expected):
                assert math.isnan(got), key
            else:  # bitwise, the sign of zero included
                assert struct.pack("<d", got) == struct.pack("<d", expected), (key, got)


def test_read_scalar_refuses_a_tensor_of_several_values(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as source:
        with pytest.raises(CheckpointError, match="not one value"):
            source.read_scalar("w")


def test_read_scalar_of_a_truncated_file_is_a_checkpoint_error(tmp_path):
    save_file({"a": torch.zeros(4), "g": torch.ones(1)}, tmp_path / "m.safetensors")
    path = tmp_path / "m.safetensors"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(CheckpointError):
        with open_checkpoint(path) as source:
            source.read_scalar("g")

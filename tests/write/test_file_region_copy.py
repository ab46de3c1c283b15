import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fusesurgery.errors import ShapeError
from fusesurgery.io import open_checkpoint
from fusesurgery.write import write_safetensors


def test_file_regions_are_copied_byte_for_byte(tmp_path):
    tensors = {"w": torch.randn(64, 33), "h": torch.randn(5).to(torch.float16)}
    save_file(tensors, tmp_path / "src.safetensors")
    with open_checkpoint(tmp_path / "src.safetensors") as source:
        infos = list(source.infos().values())
        write_safetensors(tmp_path / "out", infos, source.file_region)
        with pytest.raises(ShapeError, match="file region"):
            write_safetensors(tmp_path / "bad", infos[:1],
                              lambda key: source.file_region("h" if key == "w" else "w"))
    assert not (tmp_path / "bad").exists()
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        for key, expected in tensors.items():
            assert torch.equal(f.get_tensor(key), expected)

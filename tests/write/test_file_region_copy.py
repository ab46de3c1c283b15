import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fusesurgery.errors import ShapeError
from fusesurgery.io import open_checkpoint
from fusesurgery.write import write_safetensors


def test_file_regions_are_copied_byte_for_byte(tmp_path):
    # neighbours in the source are copied together; the f16 tensor breaks the run
    tensors = {"w": torch.randn(64, 33), "h": torch.randn(5).to(torch.float16),
               "v": torch.randn(7), "u": torch.randn(3, 3)}
    save_file(tensors, tmp_path / "src.safetensors")
    with open_checkpoint(tmp_path / "src.safetensors") as source:
        infos = list(source.infos().values())
        written = []
        write_safetensors(tmp_path / "out", infos, source.file_region,
                          on_tensor_written=written.append)
        assert sorted(info.name for info in written) == sorted(tensors)
        with pytest.raises(ShapeError, match="file region"):
            write_safetensors(tmp_path / "bad", infos[:1],
                              lambda key: source.file_region("h" if key == "w" else "w"))
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "out" / "model.safetensors"
    with open_checkpoint(tmp_path / "src.safetensors") as source, open_checkpoint(out) as copy:
        # the data region starts where the source's does, modulo a page
        for key in tensors:
            assert (copy.file_region(key).offset - source.file_region(key).offset) % 4096 == 0
    with safe_open(out, "pt") as f:
        for key, expected in tensors.items():
            assert torch.equal(f.get_tensor(key), expected)

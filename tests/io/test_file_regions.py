import torch
from safetensors.torch import save_file

from fusesurgery.io import FileRegion, open_checkpoint


def test_regions_and_reads_match_mapped_tensors(tmp_path):
    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "m.safetensors")
    torch.save(tensors, tmp_path / "m.pt")
    with open_checkpoint(tmp_path / "m.safetensors") as source:
        raw = (tmp_path / "m.safetensors").read_bytes()
        for key, expected in tensors.items():
            region = source.file_region(key)
            assert isinstance(region, FileRegion) and region.nbytes == expected.nbytes
            stored = raw[region.offset : region.offset + region.nbytes]
            assert stored == expected.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            read = source.read_tensor(key)
            assert torch.equal(read, expected) and read.dtype == expected.dtype
            mapped = source.get_tensor(key)
            if expected.numel():
                assert read.data_ptr() != mapped.data_ptr()
    with open_checkpoint(tmp_path / "m.pt") as source:
        assert source.file_region("a") is None
        assert torch.equal(source.read_tensor("a"), tensors["a"])

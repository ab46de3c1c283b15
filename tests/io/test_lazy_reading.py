"""Tensors come from memory maps of the file, and opening reads headers only."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fusesurgery.config import preset
from fusesurgery.convert import layout_tensor_infos
from fusesurgery.io import TensorInfo, open_checkpoint
from fusesurgery.testing import write_sparse_safetensors, write_sparse_sharded_safetensors
from tests.io.helpers import file_mappings, rss_anon_bytes

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/maps and /proc/self/status"
)

BIG_ELEMENTS = 16 * 2**20  # 64 MiB of float32


@pytest.fixture(scope="module")
def big_checkpoints(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("big")
    big = torch.arange(BIG_ELEMENTS, dtype=torch.float32)
    state = {"small": torch.ones(3), "big": big}
    save_file(state, directory / "big.safetensors")
    torch.save(state, directory / "big.pt")
    return {"safetensors": directory / "big.safetensors", "torch": directory / "big.pt"}


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_tensor_data_lies_in_a_mapping_of_the_file(big_checkpoints, kind: str) -> None:
    file = big_checkpoints[kind]
    with open_checkpoint(file) as source:
        tensor = source.get_tensor("big")
        start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
        mappings = file_mappings(file)
        assert any(low <= start and end <= high for low, high in mappings), (
            f"tensor [{start:#x}, {end:#x}) not inside any mapping of {file}: {mappings}"
        )


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_reading_a_64_mib_tensor_adds_no_anonymous_memory(big_checkpoints, kind: str) -> None:
    with open_checkpoint(big_checkpoints[kind]) as source:
        before = rss_anon_bytes()
        tensor = source.get_tensor("big")
        # Touch every page; a copy would add 64 MiB of anonymous memory, a file map adds none.
        smallest, largest = tensor.min().item(), tensor.max().item()
        grown = rss_anon_bytes() - before
        assert torch.equal(tensor[::4099], torch.arange(0, BIG_ELEMENTS, 4099).float())
    assert (smallest, largest) == (0, BIG_ELEMENTS - 1)
    assert grown < 16 * 2**20, f"anonymous memory grew by {grown / 2**20:.1f} MiB"


def test_opening_maps_nothing_until_a_tensor_is_asked_for(tmp_path: Path, monkeypatch) -> None:
    file = tmp_path / "lazy.safetensors"
    write_sparse_safetensors(file, [TensorInfo("w", (1024, 1024), torch.float32)])

    def refuse(*args, **kwargs):
        raise AssertionError("opening must not map tensor data")

    with monkeypatch.context() as patch:
        patch.setattr(torch.UntypedStorage, "from_file", refuse)
        source = open_checkpoint(file)
        assert source.info("w").shape == (1024, 1024)
        assert source.infos()["w"].nbytes == 4 * 2**20
    assert file_mappings(file) == []
    assert source.get_tensor("w").shape == (1024, 1024)
    assert file_mappings(file) != []
    source.close()


def test_llama_405b_shaped_sparse_checkpoint_opens_from_headers(tmp_path: Path) -> None:
    # timings: benchmarks/bench_inspect_diff.py; here, that nothing but headers is touched
    written = layout_tensor_infos(preset("llama3_1_405b"), "hf")
    shapes = {name: (info.shape, info.dtype) for name, info in written.items()}
    index = write_sparse_sharded_safetensors(tmp_path, written, max_shard_size=5 * 10**9)
    with open_checkpoint(tmp_path) as source:
        infos = source.infos()
        keys = source.keys()
    assert source.format == "safetensors-sharded"
    assert keys == list(shapes)  # shards written in order, so stored order is the input order
    assert len(keys) == 3 + 126 * 9
    assert len(source.files) > 100
    assert {name: (info.shape, info.dtype) for name, info in infos.items()} == shapes
    assert source.total_bytes == 2 * sum(math.prod(shape) for shape, _ in shapes.values())
    assert 810e9 < source.total_bytes < 812e9
    assert all(file_mappings(file) == [] for file in source.files)
    assert index.name == "model.safetensors.index.json"

"""Every kind of bad input raises one FuseSurgeryError subclass with a one-line message."""

from __future__ import annotations

import builtins
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fusesurgery.errors import (
    CheckpointError,
    ConfigError,
    UnrecognizedFormatError,
    UnsafeCheckpointError,
)
from fusesurgery.io import open_checkpoint
from tests.io.helpers import assert_one_line_naming, f32_entry, write_raw_safetensors

FOUR_FLOATS = bytes(16)


class PickledConfig:
    """A class defined here: a pickle holding one needs this module's code to load."""

    def __init__(self) -> None:
        self.hidden = 4


def open_fails(path: Path, error_type: type[Exception] = CheckpointError) -> str:
    with pytest.raises(error_type) as error:
        open_checkpoint(path)
    return assert_one_line_naming(error, path)


# --- paths ---------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    assert "no such file" in open_fails(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize("name", ["empty.safetensors", "empty.pt", "empty.weights"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    assert "empty file" in open_fails(tmp_path / name)


def test_directory_with_nothing_recognisable(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("hi")
    (tmp_path / "tokenizer.json").write_text("{}")
    message = open_fails(tmp_path, UnrecognizedFormatError)
    assert "no checkpoint found" in message


def test_directory_with_two_candidates(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1)}, tmp_path / "one.safetensors")
    save_file({"a": torch.ones(1)}, tmp_path / "two.safetensors")
    message = open_fails(tmp_path, UnrecognizedFormatError)
    assert "one.safetensors, two.safetensors" in message


def test_unknown_file_content(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("just some text, not weights")
    open_fails(tmp_path / "notes.txt", UnrecognizedFormatError)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_unreadable_file_chmod(tmp_path: Path) -> None:
    file = tmp_path / "locked.safetensors"
    save_file({"a": torch.ones(1)}, file)
    file.chmod(0)
    try:
        assert "permission denied" in open_fails(file)
    finally:
        file.chmod(0o644)


@pytest.mark.parametrize("name", ["locked.safetensors", "locked.pt"])
def test_unreadable_file_simulated(tmp_path: Path, monkeypatch, name: str) -> None:
    file = tmp_path / name
    tensors = {"a": torch.ones(1)}
    save_file(tensors, file) if name.endswith(".safetensors") else torch.save(tensors, file)
    real_open = builtins.open

    def deny(target, *args, **kwargs):
        if Path(os.fsdecode(target)) == file:
            raise PermissionError(13, "Permission denied", str(target))
        return real_open(target, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    assert "permission denied" in open_fails(file)


def test_malformed_config_beside_weights(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError) as error:
        open_checkpoint(tmp_path)
    assert_one_line_naming(error, tmp_path / "config.json")


# --- safetensors headers -----------------------------------------------------------------


def test_file_shorter_than_the_length_prefix(tmp_path: Path) -> None:
    (tmp_path / "short.safetensors").write_bytes(b"\x05\x00\x00")
    assert "too short" in open_fails(tmp_path / "short.safetensors")


def test_header_length_larger_than_the_file(tmp_path: Path) -> None:
    file = write_raw_safetensors(tmp_path / "x.safetensors", b"{}", header_length=1000)
    assert "larger than the file" in open_fails(file)


@pytest.mark.parametrize("claimed", [100_000_001, 2**63, 2**64 - 1])
def test_header_length_absurd(tmp_path: Path, claimed: int) -> None:
    file = write_raw_safetensors(tmp_path / "x.safetensors", b"{}", header_length=claimed)
    assert "absurd" in open_fails(file)


@pytest.mark.parametrize(
    "header, expected",
    [
        (b'{"a": {"dtype": "F32", ', "not valid JSON"),
        (b"\x00" * 16, "not valid JSON"),
        (b'{"a\xff": {}}', "not UTF-8"),
        (b"[1, 2, 3]", "a list, not an object"),
        (b'"just a string"', "a str, not an object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
    ids=["truncated-json", "zeros", "not-utf8", "list", "string", "deep"],
)
def test_header_not_a_json_object(tmp_path: Path, header: bytes, expected: str) -> None:
    file = write_raw_safetensors(tmp_path / "x.safetensors", header)
    assert expected in open_fails(file)


def test_entry_not_an_object(tmp_path: Path) -> None:
    file = write_raw_safetensors(tmp_path / "x.safetensors", {"a": [1, 2]})
    assert "entry 'a' is a list" in open_fails(file)


@pytest.mark.parametrize("field", ["dtype", "shape", "data_offsets"])
def test_entry_missing_a_field(tmp_path: Path, field: str) -> None:
    entry = f32_entry(0, 4)
    del entry[field]
    file = write_raw_safetensors(tmp_path / "x.safetensors", {"a": entry}, FOUR_FLOATS)
    assert f"entry 'a' has no {field}" in open_fails(file)


@pytest.mark.parametrize("dtype", ["Q7", "f32", 4, None])
def test_unknown_dtype(tmp_path: Path, dtype) -> None:
    entry = {**f32_entry(0, 4), "dtype": dtype}
    file = write_raw_safetensors(tmp_path / "x.safetensors", {"a": entry}, FOUR_FLOATS)
    assert f"unknown dtype {dtype!r}" in open_fails(file)


@pytest.mark.parametrize("shape", [[-4], [2, -2], [4.0], [True, 4], ["4"], 4, None])
def test_bad_shape(tmp_path: Path, shape) -> None:
    entry = {**f32_entry(0, 4), "shape": shape}
    file = write_raw_safetensors(tmp_path / "x.safetensors", {"a": entry}, FOUR_FLOATS)
    assert f"tensor 'a' has shape {shape!r}" in open_fails(file)


@pytest.mark.parametrize("offsets", [[0], [0, 16, 32], [-16, 0], [16, 0], [0.0, 16], "0-16"])
def test_bad_offsets(tmp_path: Path, offsets) -> None:
    entry = {**f32_entry(0, 4), "data_offsets": offsets}
    file = write_raw_safetensors(tmp_path / "x.safetensors", {"a": entry}, FOUR_FLOATS)
    assert "data_offsets" in open_fails(file)


def test_offsets_past_the_end_of_the_file(tmp_path: Path) -> None:
    header = {"a": f32_entry(0, 4), "b": f32_entry(16, 4)}
    file = write_raw_safetensors(tmp_path / "x.safetensors", header, FOUR_FLOATS + bytes(8))
    assert "tensor 'b' data_offsets [16, 32] run past the end" in open_fails(file)


def test_offsets_overlapping(tmp_path: Path) -> None:
    header = {"a": f32_entry(0, 4), "b": f32_entry(8, 4)}
    file = write_raw_safetensors(tmp_path / "x.safetensors", header, bytes(24))
    assert "tensor 'b' at [8, 24] overlaps tensor 'a'" in open_fails(file)


def test_offsets_not_contiguous(tmp_path: Path) -> None:
    header = {"a": f32_entry(0, 2), "b": f32_entry(12, 1)}
    file = write_raw_safetensors(tmp_path / "x.safetensors", header, bytes(16))
    assert "gap of 4 unclaimed bytes before tensor 'b'" in open_fails(file)


def test_bytes_after_the_last_tensor(tmp_path: Path) -> None:
    file = write_raw_safetensors(tmp_path / "x.safetensors", {"a": f32_entry(0, 4)}, bytes(20))
    assert "4 bytes after the last tensor" in open_fails(file)


def test_byte_span_not_matching_shape(tmp_path: Path) -> None:
    entry = {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 16]}
    file = write_raw_safetensors(tmp_path / "x.safetensors", {"a": entry}, bytes(16))
    message = open_fails(file)
    assert "needs 12 bytes but its data_offsets [0, 16] span 16" in message


def test_huge_shape_is_a_span_mismatch_not_an_overflow(tmp_path: Path) -> None:
    entry = {"dtype": "F64", "shape": [2**62, 2**62], "data_offsets": [0, 16]}
    file = write_raw_safetensors(tmp_path / "x.safetensors", {"a": entry}, bytes(16))
    assert f"needs {2**124 * 8} bytes" in open_fails(file)


def test_duplicate_tensor_name(tmp_path: Path) -> None:
    entry = json.dumps(f32_entry(0, 4))
    header = f'{{"a": {entry}, "a": {entry}}}'.encode()
    file = write_raw_safetensors(tmp_path / "x.safetensors", header, FOUR_FLOATS)
    assert "names 'a' twice" in open_fails(file)


@pytest.mark.parametrize("metadata", [["format"], {"format": 1}, "pt"])
def test_metadata_not_a_string_map(tmp_path: Path, metadata) -> None:
    header = {"__metadata__": metadata, "a": f32_entry(0, 4)}
    file = write_raw_safetensors(tmp_path / "x.safetensors", header, FOUR_FLOATS)
    assert "__metadata__ must map strings to strings" in open_fails(file)


def test_truncated_file_written_by_safetensors(tmp_path: Path) -> None:
    file = tmp_path / "cut.safetensors"
    save_file({"a": torch.ones(100), "b": torch.ones(100)}, file)
    raw = file.read_bytes()
    file.write_bytes(raw[: len(raw) - 10])
    assert "run past the end of the file" in open_fails(file)


# --- shard indexes -----------------------------------------------------------------------


def sharded(tmp_path: Path, index: object) -> Path:
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00001.safetensors")
    index_path = tmp_path / "model.safetensors.index.json"
    text = index if isinstance(index, str) else json.dumps(index)
    index_path.write_text(text)
    return index_path


def test_index_not_json(tmp_path: Path) -> None:
    assert "not valid JSON" in open_fails(sharded(tmp_path, '{"weight_map": '))


def test_index_not_an_object(tmp_path: Path) -> None:
    assert "not an object" in open_fails(sharded(tmp_path, ["model-00001-of-00001.safetensors"]))


def test_index_without_weight_map(tmp_path: Path) -> None:
    assert 'no "weight_map"' in open_fails(sharded(tmp_path, {"metadata": {"total_size": 8}}))


@pytest.mark.parametrize("weight_map", [{}, ["a"], {"a": 3}])
def test_index_with_a_bad_weight_map(tmp_path: Path, weight_map) -> None:
    assert "weight_map" in open_fails(sharded(tmp_path, {"weight_map": weight_map}))


@pytest.mark.parametrize("shard", ["/etc/model.safetensors", "../model.safetensors", ""])
def test_index_shard_outside_its_directory(tmp_path: Path, shard: str) -> None:
    message = open_fails(sharded(tmp_path, {"weight_map": {"a": shard}}))
    assert "relative to the index's directory" in message


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    weight_map = {"a": "model-00001-of-00001.safetensors", "b": "model-00002-of-00002.safetensors"}
    message = open_fails(sharded(tmp_path, {"weight_map": weight_map}))
    assert "names shard 'model-00002-of-00002.safetensors', which does not exist" in message


def test_index_naming_a_key_absent_from_its_shard(tmp_path: Path) -> None:
    shard = "model-00001-of-00001.safetensors"
    message = open_fails(sharded(tmp_path, {"weight_map": {"a": shard, "ghost": shard}}))
    assert f"maps 'ghost' to shard '{shard}', which does not hold it" in message


def test_index_mixing_safetensors_and_torch_shards(tmp_path: Path) -> None:
    torch.save({"b": torch.ones(1)}, tmp_path / "part.bin")
    weight_map = {"a": "model-00001-of-00001.safetensors", "b": "part.bin"}
    open_fails(sharded(tmp_path, {"weight_map": weight_map}), UnrecognizedFormatError)


def test_torch_index_naming_a_key_absent_from_its_shard(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(1)}, tmp_path / "pytorch_model-00001-of-00001.bin")
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "pytorch_model-00001-of-00001.bin",
                                                "b": "pytorch_model-00001-of-00001.bin"}}))
    assert "maps 'b'" in open_fails(index)


# --- torch pickles -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload, needs",
    [
        (lambda: {"w": torch.ones(2), "config": PickledConfig()}, "PickledConfig"),
        (lambda: {"w": torch.ones(2), "activation": math.sqrt}, "sqrt"),
        (lambda: torch.nn.Linear(2, 2), "Linear"),
    ],
    ids=["custom-class", "function", "whole-module"],
)
def test_pickle_that_needs_code(tmp_path: Path, payload, needs: str) -> None:
    file = tmp_path / "unsafe.pt"
    torch.save(payload(), file)
    message = open_fails(file, UnsafeCheckpointError)
    assert needs in message
    assert "weights_only=True" in message
    assert "state dict" in message and "safetensors" in message and "trusted" in message


def test_legacy_torch_format(tmp_path: Path) -> None:
    file = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, file, _use_new_zipfile_serialization=False)
    assert "legacy" in open_fails(file)


def test_garbage_torch_file(tmp_path: Path) -> None:
    (tmp_path / "junk.bin").write_bytes(b"this is not a checkpoint at all")
    assert "not a torch.save zip archive" in open_fails(tmp_path / "junk.bin")


def test_damaged_torch_zip(tmp_path: Path) -> None:
    file = tmp_path / "damaged.pt"
    torch.save({"w": torch.ones(2)}, file)
    raw = file.read_bytes()
    file.write_bytes(raw[: len(raw) // 2])
    assert "damaged" in open_fails(file)


@pytest.mark.parametrize(
    "payload, expected",
    [
        ({"epoch": 3, "optimizer": {"lr": 0.1}}, "holds no tensors"),
        ({"model": {"epoch": 3}}, "holds no tensors"),
        ({}, "holds no tensors"),
        (torch.ones(2), "holds a single tensor"),
        ([torch.ones(2)], "holds a list"),
    ],
    ids=["no-tensors", "empty-wrapper", "empty-dict", "bare-tensor", "list"],
)
def test_pickle_holding_no_state_dict(tmp_path: Path, payload, expected: str) -> None:
    file = tmp_path / "nothing.pt"
    torch.save(payload, file)
    assert expected in open_fails(file)


class _MarkedTensor(torch.Tensor):
    """A Tensor subclass: its pickle rebuilds it through this module's class."""


def _nested(layout: torch.layout) -> torch.Tensor:
    return torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(1, 3)], layout=layout)


@pytest.mark.filterwarnings("ignore::UserWarning")  # sparse CSR, nested, quantized: "beta"
@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: torch.eye(3).to_sparse(), "a sparse COO tensor (layout torch.sparse_coo)"),
        (lambda: torch.eye(3).to_sparse_csr(), "a sparse CSR tensor (layout torch.sparse_csr)"),
        (lambda: torch.eye(4).to_sparse_bsr((2, 2)),
         "a sparse BSR tensor (layout torch.sparse_bsr)"),
        (lambda: torch.quantize_per_tensor(torch.ones(2, 2), 0.1, 0, torch.qint8),
         "a quantized tensor (qint8, per_tensor_affine)"),
        (lambda: _nested(torch.strided), "a nested tensor (layout torch.strided)"),
        (lambda: torch.ones(2).as_subclass(_MarkedTensor), "a tensor subclass (tests.io."),
    ],
    ids=["sparse-coo", "sparse-csr", "sparse-bsr", "quantized", "nested", "subclass"],
)
def test_tensor_without_one_dense_byte_range(tmp_path: Path, make, expected: str) -> None:
    """A layout or subclass the lazy reader cannot map is refused up front, naming the key
    and the layout, whatever the command (it failed later as an internal error before)."""
    file = tmp_path / "odd.pt"
    torch.save({"dense.weight": torch.ones(2), "odd.weight": make()}, file)
    # the subclass case: as a user who registered it as safe would load it
    with torch.serialization.safe_globals([_MarkedTensor]):
        message = open_fails(file)
    assert "'odd.weight'" in message and expected in message, message
    assert "dense (strided) tensors only" in message


def test_nested_jagged_tensor(tmp_path: Path) -> None:
    file = tmp_path / "njt.pt"
    torch.save({"odd.weight": _nested(torch.jagged)}, file)
    assert "a nested tensor (layout torch.jagged)" in open_fails(file)


def test_sparse_tensor_through_the_cli(tmp_path: Path) -> None:
    from tests.hardening.conftest import assert_one_line_error, cli

    file = tmp_path / "sparse.pt"
    torch.save({"tok_embeddings.weight": torch.eye(8).to_sparse()}, file)
    assert_one_line_error(cli("inspect", file), "'tok_embeddings.weight'", "sparse COO")


# --- Meta --------------------------------------------------------------------------------


@pytest.mark.parametrize("open_file", [False, True], ids=["directory", "file"])
def test_meta_model_parallel_set_of_unknown_keys(tmp_path: Path, open_file: bool) -> None:
    # model-parallel ranks are merged (tests/io/test_meta_model_parallel.py), but only keys
    # whose split is known
    for rank in range(2):
        torch.save({"w": torch.ones(2)}, tmp_path / f"consolidated.{rank:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 4}))
    path = tmp_path / "consolidated.00.pth" if open_file else tmp_path
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(path)
    message = assert_one_line_naming(error, tmp_path)
    assert "model-parallel Meta checkpoint holds keys whose split is unknown (w)" in message

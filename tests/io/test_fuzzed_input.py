"""Damaged files either open with data consistent with their header or raise FuseSurgeryError."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fusesurgery.errors import FuseSurgeryError
from fusesurgery.io import open_checkpoint

# FUSESURGERY_FUZZ_EXAMPLES raises the count for a long local run; the suite keeps 300.
FUZZ_SETTINGS = settings(
    max_examples=int(os.environ.get("FUSESURGERY_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def valid_tensors() -> dict[str, torch.Tensor]:
    return {
        "f32": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "bf16": torch.linspace(-1, 1, 5).bfloat16(),
        "i64": torch.tensor([1, -2, 3], dtype=torch.int64),
        "u8": torch.arange(7, dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.zeros(0, 3),
    }


@pytest.fixture(scope="module")
def valid_file_bytes(tmp_path_factory) -> bytes:
    file = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    save_file(valid_tensors(), file, metadata={"format": "pt"})
    return file.read_bytes()


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-out") / "mutated.safetensors"


def open_and_read_consistently(path: Path) -> bool:
    """Open and read every tensor; True if that worked, False on FuseSurgeryError.

    A success must agree with the file: every tensor's bytes are exactly the bytes its header
    entry points at, with the header's shape and dtype. Any other exception fails the test.
    """
    try:
        with open_checkpoint(path) as source:
            raw = path.read_bytes()
            (length,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8 : 8 + length])
            data = raw[8 + length :]
            assert set(source.keys()) == set(header) - {"__metadata__"}
            for name in source.keys():
                info, tensor = source.info(name), source.get_tensor(name)
                assert tensor.shape == info.shape == tuple(header[name]["shape"])
                assert tensor.dtype == info.dtype
                begin, end = header[name]["data_offsets"]
                stored = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
                assert stored == data[begin:end], name
        return True
    except FuseSurgeryError:
        return False


def test_the_unmutated_file_reads_back_exactly(valid_file_bytes: bytes, fuzz_file: Path) -> None:
    fuzz_file.write_bytes(valid_file_bytes)
    assert open_and_read_consistently(fuzz_file)
    with open_checkpoint(fuzz_file) as source:
        for name, tensor in valid_tensors().items():
            assert torch.equal(source.get_tensor(name), tensor)


@FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_header_bytes(valid_file_bytes: bytes, fuzz_file: Path, data) -> None:
    (length,) = struct.unpack("<Q", valid_file_bytes[:8])
    mutations = data.draw(
        st.lists(st.tuples(st.integers(8, 8 + length - 1), st.integers(0, 255)), min_size=1,
                 max_size=4)
    )
    mutated = bytearray(valid_file_bytes)
    for position, value in mutations:
        mutated[position] = value
    fuzz_file.write_bytes(bytes(mutated))
    open_and_read_consistently(fuzz_file)


@FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_header_length(valid_file_bytes: bytes, fuzz_file: Path, data) -> None:
    (length,) = struct.unpack("<Q", valid_file_bytes[:8])
    claimed = data.draw(
        st.one_of(
            st.integers(0, 2**64 - 1),
            st.integers(-24, 24).map(lambda delta: max(0, length + delta)),
            st.integers(0, len(valid_file_bytes) + 8),
        )
    )
    fuzz_file.write_bytes(struct.pack("<Q", claimed) + valid_file_bytes[8:])
    succeeded = open_and_read_consistently(fuzz_file)
    if claimed < length:
        assert not succeeded  # the JSON would be cut short


@pytest.fixture(scope="module")
def valid_pickle_bytes(tmp_path_factory) -> bytes:
    file = tmp_path_factory.mktemp("fuzz-pickle") / "valid.pt"
    torch.save({"model": valid_tensors(), "epoch": 3}, file)
    return file.read_bytes()


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns about some damaged pickles
@FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_torch_archive(valid_pickle_bytes: bytes, fuzz_file: Path, data) -> None:
    mutations = data.draw(
        st.lists(
            st.tuples(st.integers(0, len(valid_pickle_bytes) - 1), st.integers(0, 255)),
            min_size=1, max_size=3,
        )
    )
    mutated = bytearray(valid_pickle_bytes)
    for position, value in mutations:
        mutated[position] = value
    file = fuzz_file.with_suffix(".pt")
    file.write_bytes(bytes(mutated))
    try:
        with open_checkpoint(file) as source:
            for name in source.keys():
                tensor = source.get_tensor(name)
                assert (tensor.shape, tensor.dtype) == (source.info(name).shape,
                                                        source.info(name).dtype)
    except FuseSurgeryError:
        pass

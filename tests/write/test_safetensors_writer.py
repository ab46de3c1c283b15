"""The streaming safetensors writer: round trips, the file format, atomicity and errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fusesurgery.errors import ShapeError, WriteError
from fusesurgery.io.tensor_info import SAFETENSORS_DTYPES, TensorInfo
from fusesurgery.write import safetensors_writer, write_safetensors
from fusesurgery.write.output_guard import MARKER_FILE

INDEX_NAME = "model.safetensors.index.json"


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 4).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=dtype)


def infos_of(tensors: dict[str, torch.Tensor]) -> list[TensorInfo]:
    return [TensorInfo(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (actual, expected)]
    assert torch.equal(*as_bytes)


def read_output(out_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output directory, through safetensors' own reader."""
    index_path = out_dir / INDEX_NAME
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = None, ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for filename in files:
        with safe_open(out_dir / filename, framework="pt") as f:
            assert f.metadata()["format"] == "pt"
            for key in f.keys():
                assert key not in tensors
                if weight_map is not None:
                    assert weight_map[key] == filename
                tensors[key] = f.get_tensor(key)
    return tensors


def read_header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header_text = raw[8 : 8 + length].decode()
    assert header_text.rstrip(" ").endswith("}")  # JSON, then only space padding
    return length, json.loads(header_text)


def mixed_tensors() -> dict[str, torch.Tensor]:
    return {
        "embed.weight": random_tensor((16, 8), torch.float32, seed=1),
        "layers.0.norm.scale": random_tensor((8,), torch.bfloat16, seed=2),
        "layers.0.attn.q.weight": random_tensor((8, 8), torch.float16, seed=3),
        "layers.0.mask": random_tensor((3, 5), torch.bool, seed=4),
        "positions": random_tensor((7,), torch.int64, seed=5),
        "layers.1.attn.q.weight": random_tensor((8, 8), torch.float32, seed=6),
        "scalar": torch.tensor(3.5, dtype=torch.float32),
        "empty": torch.zeros((0, 4), dtype=torch.bfloat16),
        "fp8": random_tensor((4, 4), torch.float8_e4m3fn, seed=7),
        "output.weight": random_tensor((16, 8), torch.float32, seed=8),
    }


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(SAFETENSORS_DTYPES.values()), ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (), (0,), (2, 0, 3)], ids=str)
def test_every_dtype_and_shape_round_trips_bitwise(tmp_path, dtype, shape):
    tensors = {"t": random_tensor(shape, dtype), "after": random_tensor((3,), dtype, seed=9)}
    result = write_safetensors(tmp_path / "out", infos_of(tensors), tensors.__getitem__)
    assert result.files == ("model.safetensors",)
    assert sorted(os.listdir(tmp_path / "out")) == [MARKER_FILE, "model.safetensors"]
    loaded = read_output(tmp_path / "out")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert_bitwise_equal(loaded[name], tensor)


def test_single_file_with_mixed_dtypes(tmp_path):
    tensors = mixed_tensors()
    result = write_safetensors(tmp_path / "out", infos_of(tensors), tensors.__getitem__)
    assert not result.plan.is_sharded
    assert result.total_size == sum(t.nbytes for t in tensors.values())
    loaded = read_output(tmp_path / "out")
    for name, tensor in tensors.items():
        assert_bitwise_equal(loaded[name], tensor)


def test_sharded_output_follows_hf_convention(tmp_path):
    tensors = mixed_tensors()
    max_size = 600
    result = write_safetensors(
        tmp_path / "out", infos_of(tensors), tensors.__getitem__, max_shard_size=max_size
    )
    out = tmp_path / "out"
    shard_names = [s.filename for s in result.plan.shards]
    count = len(shard_names)
    assert count >= 3
    assert shard_names == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert sorted(os.listdir(out)) == sorted([MARKER_FILE, *shard_names, INDEX_NAME])
    assert result.files[-1] == INDEX_NAME  # the index is written last

    index = json.loads((out / INDEX_NAME).read_text())
    assert index.keys() == {"metadata", "weight_map"}
    assert index["metadata"] == {"total_size": sum(t.nbytes for t in tensors.values())}
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == set(shard_names)

    for name in shard_names:
        length, header = read_header(out / name)
        data_size = (out / name).stat().st_size - 8 - length
        keys = [k for k in header if k != "__metadata__"]
        assert data_size <= max_size or len(keys) == 1
        assert data_size == sum(tensors[k].nbytes for k in keys)

    loaded = read_output(out)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert_bitwise_equal(loaded[name], tensor)


def test_header_layout(tmp_path):
    tensors = mixed_tensors()
    write_safetensors(
        tmp_path / "out", infos_of(tensors), tensors.__getitem__, metadata={"source": "test"}
    )
    path = tmp_path / "out" / "model.safetensors"
    length, header = read_header(path)
    assert length % 8 == 0  # data starts 8-byte aligned
    assert header.pop("__metadata__") == {"format": "pt", "source": "test"}
    spans = sorted((entry["data_offsets"], name) for name, entry in header.items())
    offset = 0
    for (begin, end), name in spans:
        assert begin == offset  # back to back, no gaps
        assert end - begin == tensors[name].nbytes
        assert begin % tensors[name].element_size() == 0  # each tensor aligned to its dtype
        assert header[name]["shape"] == list(tensors[name].shape)
        offset = end
    assert path.stat().st_size == 8 + length + offset


def test_each_tensor_fetched_once_and_progress_reported(tmp_path):
    tensors = mixed_tensors()
    fetched: list[str] = []
    written: list[str] = []

    def get_tensor(name: str) -> torch.Tensor:
        fetched.append(name)
        return tensors[name]

    write_safetensors(
        tmp_path / "out",
        infos_of(tensors),
        get_tensor,
        max_shard_size=600,
        on_tensor_written=lambda info: written.append(info.name),
    )
    assert sorted(fetched) == sorted(tensors)
    assert written == fetched


def test_non_contiguous_and_offset_tensors(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    param = torch.nn.Parameter(torch.randn(4, 3))
    tensors = {
        "transposed": base.T,
        "strided": base[:, ::3],
        "expanded": torch.tensor([1.0, 2.0]).expand(5, 2),
        "offset_slice": base.reshape(-1)[17:29],  # contiguous, but starts mid-storage
        "parameter": param,
        "negated_view": torch._neg_view(base[0]),
    }
    write_safetensors(tmp_path / "out", infos_of(tensors), tensors.__getitem__)
    loaded = read_output(tmp_path / "out")
    for name, tensor in tensors.items():
        assert_bitwise_equal(loaded[name], tensor.detach().resolve_neg())
    assert torch.equal(loaded["negated_view"], -base[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_moved_to_cpu(tmp_path):
    tensors = {"w": torch.randn(64, 32, device="cuda").to(torch.bfloat16).T}
    write_safetensors(tmp_path / "out", infos_of(tensors), tensors.__getitem__)
    assert_bitwise_equal(read_output(tmp_path / "out")["w"], tensors["w"].cpu())


def test_extra_files_are_written_with_the_weights(tmp_path):
    tensors = {"w": torch.ones(2)}
    config = json.dumps({"model_type": "llama"})
    result = write_safetensors(
        tmp_path / "out",
        infos_of(tensors),
        tensors.__getitem__,
        extra_files={"config.json": config, "README.md": "# fused\n", "sub/blob.bin": b"\x00\x01"},
    )
    out = tmp_path / "out"
    assert (out / "config.json").read_text() == config
    assert (out / "README.md").read_text() == "# fused\n"
    assert (out / "sub" / "blob.bin").read_bytes() == b"\x00\x01"
    assert set(result.files) == {"model.safetensors", "config.json", "README.md", "sub/blob.bin"}


def test_missing_parents_are_created_and_an_empty_directory_is_filled(tmp_path):
    tensors = {"w": torch.ones(2)}
    write_safetensors(tmp_path / "a" / "b" / "out", infos_of(tensors), tensors.__getitem__)
    assert (tmp_path / "a" / "b" / "out" / "model.safetensors").is_file()
    (tmp_path / "empty").mkdir()
    write_safetensors(tmp_path / "empty", infos_of(tensors), tensors.__getitem__)
    assert sorted(os.listdir(tmp_path / "empty")) == [MARKER_FILE, "model.safetensors"]
    assert leftovers(tmp_path) == []


# --- atomicity -----------------------------------------------------------------------------


def test_failing_get_tensor_leaves_nothing_behind(tmp_path):
    tensors = mixed_tensors()
    calls = 0

    def get_tensor(name: str) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 4:  # second shard, after the first one was completely written
            raise RuntimeError("source went away")
        return tensors[name]

    with pytest.raises(RuntimeError, match="source went away"):
        write_safetensors(tmp_path / "out", infos_of(tensors), get_tensor, max_shard_size=600)
    assert calls == 4
    assert os.listdir(tmp_path) == []


def test_reader_os_errors_pass_through_unchanged(tmp_path):
    def get_tensor(name: str) -> torch.Tensor:
        raise FileNotFoundError(errno.ENOENT, "No such file", "source.safetensors")

    with pytest.raises(FileNotFoundError):
        write_safetensors(tmp_path / "out", [TensorInfo("w", (2,), torch.float32)], get_tensor)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("returned", "match"),
    [
        (torch.zeros(3, 2), r"is \[3, 2\] torch.float32, but its metadata says \[2, 3\]"),
        (torch.zeros(2, 3, dtype=torch.bfloat16), "torch.bfloat16, but its metadata says"),
        (torch.zeros(6), r"is \[6\]"),
        ([[0.0] * 3] * 2, "returned list, expected a torch.Tensor"),
        (torch.zeros(2, 3, device="meta"), "meta device"),
    ],
    ids=["shape", "dtype", "flat", "not-a-tensor", "meta"],
)
def test_mismatching_tensor_raises_shape_error_and_writes_nothing(tmp_path, returned, match):
    tensors = {"first": torch.ones(4), "bad": returned}
    infos = [TensorInfo("first", (4,), torch.float32), TensorInfo("bad", (2, 3), torch.float32)]
    with pytest.raises(ShapeError, match=match):
        write_safetensors(tmp_path / "out", infos, tensors.__getitem__)
    assert os.listdir(tmp_path) == []


def test_non_empty_destination_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    tensors = {"w": torch.ones(2)}
    fetched = []
    for overwrite in (False, True):  # a directory fusesurgery did not write is never replaced
        with pytest.raises(WriteError, match=r"out is not empty and was not written by "):
            write_safetensors(out, infos_of(tensors), lambda n: fetched.append(n) or tensors[n],
                              overwrite=overwrite)
    assert fetched == []  # refused before reading anything
    assert os.listdir(out) == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_an_earlier_output_is_replaced_only_when_asked(tmp_path):
    out = tmp_path / "out"
    tensors = {"w": torch.ones(2)}
    write_safetensors(out, infos_of(tensors), tensors.__getitem__)
    with pytest.raises(WriteError, match=r"holds an earlier fusesurgery output.*"
                       r"\(pass overwrite=True\)$") as refused:
        write_safetensors(out, infos_of(tensors), tensors.__getitem__)
    assert "--overwrite" not in str(refused.value)  # the Python caller's spelling
    assert refused.value.cli_message().endswith("(pass --overwrite)")  # the command line's
    write_safetensors(out, infos_of(tensors), tensors.__getitem__, overwrite=True)
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["written_by"] == "fusesurgery" and marker["files"] == ["model.safetensors"]


def test_destination_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(WriteError, match="not a directory"):
        write_safetensors(tmp_path / "out", [], lambda n: None)


def test_overwrite_replaces_only_after_completion(tmp_path):
    out = tmp_path / "out"
    first = mixed_tensors()
    write_safetensors(out, infos_of(first), first.__getitem__, max_shard_size=600)
    (out / "stale.txt").write_text("old")

    second = {"only": torch.arange(5)}
    write_safetensors(out, infos_of(second), second.__getitem__, overwrite=True)
    # old shards and index are gone
    assert sorted(os.listdir(out)) == [MARKER_FILE, "model.safetensors"]
    assert_bitwise_equal(read_output(out)["only"], second["only"])
    assert leftovers(tmp_path) == []


def test_failed_overwrite_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    old = {"w": torch.ones(3)}
    write_safetensors(out, infos_of(old), old.__getitem__)
    before = (out / "model.safetensors").read_bytes()

    def failing(name: str) -> torch.Tensor:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_safetensors(out, infos_of(old), failing, overwrite=True)
    assert sorted(os.listdir(out)) == [MARKER_FILE, "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == before
    assert leftovers(tmp_path) == []


def test_failed_swap_during_overwrite_restores_the_old_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    old = {"w": torch.ones(3)}
    write_safetensors(out, infos_of(old), old.__getitem__)
    before = (out / "model.safetensors").read_bytes()
    real_rename = os.rename

    def rename_failing_for_new_output(src, dst):
        if ".partial-" in os.fspath(src):
            raise OSError(errno.EIO, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(safetensors_writer.os, "rename", rename_failing_for_new_output)
    new = {"w": torch.zeros(3)}
    with pytest.raises(WriteError, match="Input/output error"):
        write_safetensors(out, infos_of(new), new.__getitem__, overwrite=True)
    assert sorted(os.listdir(out)) == [MARKER_FILE, "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == before
    assert leftovers(tmp_path) == []


# --- OS errors and argument checks ---------------------------------------------------------


def test_disk_full_becomes_one_line_write_error(tmp_path, monkeypatch):
    real_write_all = safetensors_writer._write_all
    calls = 0

    def write_all_until_full(fd, data):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fd, data)

    monkeypatch.setattr(safetensors_writer, "_write_all", write_all_until_full)
    tensors = mixed_tensors()
    with pytest.raises(WriteError) as caught:
        write_safetensors(tmp_path / "out", infos_of(tensors), tensors.__getitem__)
    message = str(caught.value)
    assert "\n" not in message
    assert "No space left on device" in message and "free some space" in message
    assert "model.safetensors" in message
    assert os.listdir(tmp_path) == []


def test_permission_error_on_final_rename_becomes_write_error(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(safetensors_writer.os, "replace", refuse)
    tensors = {"w": torch.ones(2)}
    with pytest.raises(WriteError, match="Permission denied; choose a writable output directory"):
        write_safetensors(tmp_path / "out", infos_of(tensors), tensors.__getitem__)
    assert os.listdir(tmp_path) == []


def test_too_little_free_space_is_refused_up_front(tmp_path, monkeypatch):
    real_usage = shutil.disk_usage
    monkeypatch.setattr(
        safetensors_writer.shutil,
        "disk_usage",
        lambda path: real_usage(path)._replace(free=10),
    )
    tensors = {"w": torch.ones(100)}
    with pytest.raises(WriteError, match="not enough space"):
        write_safetensors(tmp_path / "out", infos_of(tensors), tensors.__getitem__)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metadata": {"format": "np"}}, "'format' must be 'pt'"),
        ({"metadata": {"layers": 3}}, "must map str to str"),
        ({"extra_files": {"../escape.json": "{}"}}, "relative path"),
        ({"extra_files": {"/abs.json": "{}"}}, "relative path"),
        ({"extra_files": {"model.safetensors": b""}}, "would overwrite a weight file"),
        ({"extra_files": {"config.json": 3}}, "must be bytes or str"),
        ({"max_shard_size": "5 parsecs"}, "cannot parse size"),
    ],
)
def test_invalid_arguments_raise_before_touching_disk(tmp_path, kwargs, match):
    tensors = {"w": torch.ones(2)}
    with pytest.raises(WriteError, match=match):
        write_safetensors(tmp_path / "out", infos_of(tensors), tensors.__getitem__, **kwargs)
    assert os.listdir(tmp_path) == []


def test_unsupported_dtype_is_refused_before_writing(tmp_path):
    infos = [TensorInfo("c", (2,), torch.complex64)]
    with pytest.raises(WriteError, match="complex64, which safetensors cannot store"):
        write_safetensors(tmp_path / "out", infos, lambda n: torch.zeros(2, dtype=torch.complex64))
    assert os.listdir(tmp_path) == []

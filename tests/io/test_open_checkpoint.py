"""open_checkpoint on every supported form, built for real in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fusesurgery.errors import CheckpointError
from fusesurgery.io import (
    SAFETENSORS_DTYPES,
    CheckpointSource,
    TensorInfo,
    TensorNotFoundError,
    open_checkpoint,
)
from fusesurgery.testing import write_sparse_safetensors
from fusesurgery.write import safetensors_header
from tests.io.helpers import f32_entry, write_raw_safetensors


def small_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "tok_embeddings.weight": torch.randn(10, 4, generator=generator),
        "layers.0.attn.q_proj.weight": torch.randn(4, 4, generator=generator).bfloat16(),
        "layers.0.sa_norm.scale": torch.ones(4, dtype=torch.float16),
        "step": torch.tensor(7, dtype=torch.int64),
    }


def assert_matches(source: CheckpointSource, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(source.keys()) == sorted(expected)
    assert len(source) == len(expected)
    for name, tensor in expected.items():
        assert name in source
        info = source.info(name)
        assert (info.shape, info.dtype) == (tuple(tensor.shape), tensor.dtype)
        loaded = source.get_tensor(name)
        assert loaded.dtype == tensor.dtype
        assert torch.equal(loaded, tensor), name
    assert source.total_bytes == sum(t.numel() * t.element_size() for t in expected.values())


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def reference_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in a directory, read by the safetensors library."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


# --- safetensors -------------------------------------------------------------------------


def test_single_safetensors_file(tmp_path: Path) -> None:
    expected = small_state_dict()
    file = tmp_path / "weights.safetensors"
    save_file(expected, file, metadata={"format": "pt", "origin": "test"})
    with open_checkpoint(file) as source:
        assert source.format == "safetensors"
        assert source.files == [file]
        assert source.path == file
        assert source.metadata == {"format": "pt", "origin": "test"}
        assert (source.config, source.config_file, source.is_hf_dir) == (None, None, False)
        assert_matches(source, expected)
        assert source.info("step") == TensorInfo("step", (), torch.int64, file)


def test_keys_follow_byte_order_not_name_order(tmp_path: Path) -> None:
    file = tmp_path / "ordered.safetensors"
    write_sparse_safetensors(file, [
        TensorInfo("zeta", (2,), torch.float32),
        TensorInfo("alpha", (3,), torch.bfloat16),
        TensorInfo("mid", (1,), torch.int64),
    ])
    with open_checkpoint(file) as source:
        assert source.keys() == ["zeta", "alpha", "mid"]
        assert list(source) == ["zeta", "alpha", "mid"]
        assert list(source.infos()) == ["zeta", "alpha", "mid"]


@pytest.mark.parametrize("dtype_name", sorted(SAFETENSORS_DTYPES))
def test_every_safetensors_dtype_round_trips(tmp_path: Path, dtype_name: str) -> None:
    dtype = SAFETENSORS_DTYPES[dtype_name]
    raw = torch.arange(24, dtype=torch.uint8).repeat_interleave(dtype.itemsize)
    values = raw.view(dtype).reshape(2, 3, 4) if dtype != torch.bool else (raw % 2).bool()
    expected = {"x": values.reshape(2, 3, 4), "empty": torch.zeros(0, 5, dtype=dtype)}
    file = tmp_path / "x.safetensors"
    save_file(expected, file)
    with open_checkpoint(file) as source:
        for name, tensor in expected.items():
            loaded = source.get_tensor(name)
            assert loaded.dtype == dtype and loaded.shape == tensor.shape
            assert torch.equal(loaded.view(torch.uint8), tensor.view(torch.uint8))


def test_misaligned_tensor_is_copied_correctly(tmp_path: Path) -> None:
    # A 3-byte header puts the data region at offset 11: no float32 view can start there.
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    header = json.dumps({"x": f32_entry(0, 3)}).encode()
    header += b" " * ((-len(header) - 8) % 4 + 1)
    file = write_raw_safetensors(tmp_path / "odd.safetensors", header, values.numpy().tobytes())
    assert (8 + len(header)) % 4 != 0
    with open_checkpoint(file) as source:
        assert torch.equal(source.get_tensor("x"), values)


def test_sharded_safetensors_hf_directory(tmp_path: Path, tiny_llama) -> None:
    directory = tmp_path / "hf"
    tiny_llama.save_pretrained(directory, max_shard_size="4KB")
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 1
    expected = reference_tensors(directory)
    for path in (directory, directory / "model.safetensors.index.json"):
        with open_checkpoint(path) as source:
            assert source.format == "safetensors-sharded"
            assert source.files == shards
            assert source.is_hf_dir and source.config_file == "config.json"
            assert source.config["model_type"] == "llama"
            assert source.metadata.get("format") == "pt"
            assert_matches(source, expected)
            # Stored order: shard by shard.
            shard_of = [source.files.index(source.info(key).file) for key in source.keys()]
            assert shard_of == sorted(shard_of)
    state = tiny_llama.state_dict()
    with open_checkpoint(directory) as source:
        for name in source.keys():
            assert torch.equal(source.get_tensor(name), state[name])


def test_single_safetensors_hf_directory(tmp_path: Path, tiny_llama) -> None:
    directory = tmp_path / "hf"
    tiny_llama.save_pretrained(directory)
    with open_checkpoint(directory) as source:
        assert source.format == "safetensors"
        assert source.files == [directory / "model.safetensors"]
        assert source.is_hf_dir and source.config["hidden_size"] == 16
        assert_matches(source, reference_tensors(directory))


def test_index_keys_missing_from_weight_map_are_not_exposed(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2), "stray": torch.zeros(1)}, tmp_path / "s1.safetensors")
    save_file({"b": torch.full((3,), 2.0)}, tmp_path / "s2.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"b": "s2.safetensors", "a": "s1.safetensors"}}))
    with open_checkpoint(tmp_path) as source:
        assert source.keys() == ["a", "b"]
        assert torch.equal(source.get_tensor("b"), torch.full((3,), 2.0))


# --- torch pickles -----------------------------------------------------------------------


def write_hf_torch_shards(directory: Path, state: dict[str, torch.Tensor], shards: int) -> None:
    """pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json, as HF wrote them."""
    names = list(state)
    weight_map = {}
    for number in range(1, shards + 1):
        shard_name = f"pytorch_model-{number:05d}-of-{shards:05d}.bin"
        part = {name: state[name] for name in names[number - 1 :: shards]}
        torch.save(part, directory / shard_name)
        weight_map.update(dict.fromkeys(part, shard_name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="flat"),
        pytest.param(lambda sd: {"model": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, id="model"),
        pytest.param(lambda sd: {"state_dict": sd, "hyper": {"n": [1, 2]}}, id="state_dict"),
        pytest.param(lambda sd: {**sd, "epoch": 3, "note": "x"}, id="flat-with-extras"),
    ],
)
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_state_dict_files(tmp_path: Path, wrap, suffix: str) -> None:
    expected = small_state_dict()
    file = tmp_path / f"checkpoint{suffix}"
    torch.save(wrap(expected), file)
    with open_checkpoint(file) as source:
        assert source.format == "torch"
        assert source.files == [file]
        assert source.keys() == list(expected)  # pickled order
        assert source.metadata == {}
        assert_matches(source, expected)


def test_hf_directory_pytorch_model_bin(tmp_path: Path) -> None:
    expected = small_state_dict()
    torch.save(expected, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with open_checkpoint(tmp_path) as source:
        assert source.format == "torch"
        assert source.is_hf_dir and source.config == {"model_type": "llama"}
        assert_matches(source, expected)


def test_hf_directory_sharded_pytorch_model_bin(tmp_path: Path) -> None:
    expected = small_state_dict()
    write_hf_torch_shards(tmp_path, expected, shards=2)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for path in (tmp_path, tmp_path / "pytorch_model.bin.index.json"):
        with open_checkpoint(path) as source:
            assert source.format == "torch-sharded"
            assert [file.name for file in source.files] == [
                "pytorch_model-00001-of-00002.bin",
                "pytorch_model-00002-of-00002.bin",
            ]
            assert source.is_hf_dir
            assert_matches(source, expected)


def test_safetensors_preferred_over_pickles(tmp_path: Path, tiny_llama) -> None:
    tiny_llama.save_pretrained(tmp_path, max_shard_size="4KB")
    stale = {"stale.weight": torch.zeros(1)}
    torch.save(stale, tmp_path / "pytorch_model.bin")
    write_hf_torch_shards(tmp_path, stale, shards=1)
    with open_checkpoint(tmp_path) as source:
        assert source.format == "safetensors-sharded"
        assert "stale.weight" not in source


def test_meta_directory(tmp_path: Path) -> None:
    expected = {
        "tok_embeddings.weight": torch.randn(8, 4),
        "layers.0.attention.wq.weight": torch.randn(4, 4),
    }
    params = {"dim": 4, "n_layers": 1, "n_heads": 2, "vocab_size": 8, "norm_eps": 1e-5}
    torch.save(expected, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(params))
    (tmp_path / "tokenizer.model").write_bytes(b"not weights")
    for path in (tmp_path, tmp_path / "consolidated.00.pth"):
        with open_checkpoint(path) as source:
            assert source.format == "meta"
            assert (source.config, source.config_file) == (params, "params.json")
            assert not source.is_hf_dir
            assert_matches(source, expected)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "finetuned.pt", "weights.ckpt"])
def test_directory_with_one_checkpoint_file(tmp_path: Path, name: str) -> None:
    expected = small_state_dict()
    if name.endswith(".safetensors"):
        save_file(expected, tmp_path / name)
    else:
        torch.save({"state_dict": expected}, tmp_path / name)
    # Trainer leftovers beside the weights are not candidates (training_args.bin needs code).
    (tmp_path / "training_args.bin").write_bytes(b"\x80\x04not loaded")
    (tmp_path / "README.md").write_text("hello")
    with open_checkpoint(tmp_path) as source:
        assert source.files == [tmp_path / name]
        assert_matches(source, expected)


def test_unknown_extension_is_sniffed(tmp_path: Path) -> None:
    expected = small_state_dict()
    save_file(expected, tmp_path / "a.weights")
    torch.save(expected, tmp_path / "b.weights")
    with open_checkpoint(tmp_path / "a.weights") as source:
        assert source.format == "safetensors"
        assert_matches(source, expected)
    with open_checkpoint(tmp_path / "b.weights") as source:
        assert source.format == "torch"
        assert_matches(source, expected)


# --- the source object -------------------------------------------------------------------


def test_missing_key_is_a_key_error_with_a_suggestion(tmp_path: Path) -> None:
    file = tmp_path / "m.safetensors"
    save_file(small_state_dict(), file)
    with open_checkpoint(file) as source:
        with pytest.raises(TensorNotFoundError) as error:
            source.info("layers.0.attn.q_proj.wieght")
        assert isinstance(error.value, KeyError) and isinstance(error.value, CheckpointError)
        assert str(error.value) == (
            f"{file}: no tensor named 'layers.0.attn.q_proj.wieght' "
            "(did you mean 'layers.0.attn.q_proj.weight'?)"
        )
        with pytest.raises(KeyError):
            source.get_tensor("nope")
        assert "nope" not in source


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_close_keeps_handed_out_tensors_valid(tmp_path: Path, kind: str) -> None:
    expected = small_state_dict()
    file = tmp_path / ("c.safetensors" if kind == "safetensors" else "c.pt")
    save_file(expected, file) if kind == "safetensors" else torch.save(expected, file)
    with open_checkpoint(file) as source:
        taken = source.get_tensor("tok_embeddings.weight")
    with pytest.raises(CheckpointError, match="closed"):
        source.get_tensor("tok_embeddings.weight")
    assert source.info("step").shape == ()  # metadata stays readable
    assert torch.equal(taken, expected["tok_embeddings.weight"])


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_writing_a_tensor_never_changes_the_file(tmp_path: Path, kind: str) -> None:
    expected = small_state_dict()
    file = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pt")
    save_file(expected, file) if kind == "safetensors" else torch.save(expected, file)
    before = file.read_bytes()
    with open_checkpoint(file) as source:
        source.get_tensor("tok_embeddings.weight").add_(1.0)
    assert file.read_bytes() == before
    with open_checkpoint(file) as source:
        assert torch.equal(source.get_tensor("tok_embeddings.weight"),
                           expected["tok_embeddings.weight"])


def test_sparse_writer_makes_valid_zero_files(tmp_path: Path) -> None:
    infos = {"a": ((3, 5), torch.bfloat16), "b": ((7,), torch.int32), "c": ((), torch.float64)}
    tensors = [TensorInfo(name, shape, dtype) for name, (shape, dtype) in infos.items()]
    size = write_sparse_safetensors(tmp_path / "z.safetensors", tensors)
    prefix = safetensors_header(tensors, {"format": "pt"})
    data_size = sum(info.nbytes for info in tensors)
    assert size == len(prefix) + data_size == (tmp_path / "z.safetensors").stat().st_size
    assert len(prefix) % 8 == 0
    assert data_size == 3 * 5 * 2 + 7 * 4 + 8
    with safe_open(tmp_path / "z.safetensors", framework="pt") as reference:
        assert list(reference.keys()) == sorted(infos)  # the safetensors library accepts it
    with open_checkpoint(tmp_path / "z.safetensors") as source:
        for name, (shape, _) in infos.items():
            tensor = source.get_tensor(name)
            assert tensor.shape == shape and not tensor.any()



def test_each_tensor_owns_a_storage_of_its_own_bytes(tmp_path: Path) -> None:
    # So torch.save(tensor) or a writer's shared-storage check sees the tensor, not the file.
    file = tmp_path / "s.safetensors"
    save_file({**small_state_dict(), "big": torch.zeros(100_000)}, file)
    with open_checkpoint(file) as source:
        for name in source.keys():
            tensor = source.get_tensor(name)
            assert tensor.untyped_storage().nbytes() == source.info(name).nbytes
        single = tmp_path / "single.pt"
        torch.save(source.get_tensor("layers.0.sa_norm.scale"), single)
        assert single.stat().st_size < 10_000 < 400_000 < file.stat().st_size


def test_symlinked_files_as_in_the_hub_cache(tmp_path: Path) -> None:
    expected = small_state_dict()
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    save_file(expected, blobs / "e3b0c442")
    (blobs / "98fc1c14").write_text(json.dumps({"model_type": "llama"}))
    (snapshot / "model.safetensors").symlink_to(blobs / "e3b0c442")
    (snapshot / "config.json").symlink_to(blobs / "98fc1c14")
    with open_checkpoint(snapshot) as source:
        assert source.format == "safetensors" and source.is_hf_dir
        assert_matches(source, expected)

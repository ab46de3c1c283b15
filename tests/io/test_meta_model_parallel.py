"""Model-parallel Meta checkpoints: consolidated.00.pth ... consolidated.NN.pth merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusesurgery import load_decoder
from fusesurgery.errors import CheckpointError
from fusesurgery.io import open_checkpoint
from fusesurgery.write import convert_checkpoint
from tests.convert.conftest import meta_state_dict

# How Meta's fairscale layers slice each weight across ranks, written out as the test's own
# source of truth: column-parallel along dim 0, row-parallel along dim 1, norms replicated.
SPLIT_DIMS = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
    "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0, "output.weight": 0,
}
PARAMS = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64,
          "norm_eps": 1e-5, "rope_theta": 500000.0, "multiple_of": 32,
          "ffn_dim_multiplier": None, "use_scaled_rope": False}


def split_dim(name: str, embedding_dim: int) -> int | None:
    if name == "tok_embeddings.weight":
        return embedding_dim
    return SPLIT_DIMS.get(name.split(".", 2)[-1] if name.startswith("layers.") else name)


def save_ranks(directory: Path, full: dict[str, torch.Tensor], ranks: int,
               embedding_dim: int) -> None:
    directory.mkdir()
    for rank in range(ranks):
        state = {}
        for name, tensor in full.items():
            dim = split_dim(name, embedding_dim)
            state[name] = (tensor if dim is None
                           else tensor.chunk(ranks, dim=dim)[rank]).clone()
        torch.save(state, directory / f"consolidated.{rank:02d}.pth")
    (directory / "params.json").write_text(json.dumps(PARAMS))


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("embedding_dim", [0, 1], ids=["llama3-vocab", "llama2-dim"])
def test_ranks_merge_into_the_full_tensors(tmp_path, ranks, embedding_dim):
    full = meta_state_dict()
    save_ranks(tmp_path / "mp", full, ranks, embedding_dim)
    with open_checkpoint(tmp_path / "mp") as source:
        assert source.format == "meta"
        assert [file.name for file in source.files] == [
            f"consolidated.{rank:02d}.pth" for rank in range(ranks)]
        assert {key: info.shape for key, info in source.infos().items()} == {
            key: tuple(tensor.shape) for key, tensor in full.items()}
        assert source.total_bytes == sum(tensor.nbytes for tensor in full.values())
        for key, tensor in full.items():
            assert torch.equal(source.get_tensor(key), tensor), key


def test_merged_ranks_load_and_convert_like_one_file(tmp_path):
    full = meta_state_dict(dtype=torch.float32)
    (tmp_path / "one").mkdir()
    torch.save(full, tmp_path / "one" / "consolidated.00.pth")
    (tmp_path / "one" / "params.json").write_text(json.dumps(PARAMS))
    save_ranks(tmp_path / "mp", full, 2, embedding_dim=0)
    overrides = {"intermediate_dim": 96}
    tokens = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(load_decoder(tmp_path / "mp", overrides=overrides)(tokens),
                           load_decoder(tmp_path / "one", overrides=overrides)(tokens))
    convert_checkpoint(tmp_path / "mp", tmp_path / "native", overrides=overrides)
    convert_checkpoint(tmp_path / "one", tmp_path / "native1", overrides=overrides)
    with open_checkpoint(tmp_path / "native") as a, open_checkpoint(tmp_path / "native1") as b:
        assert a.keys() == b.keys()
        assert all(torch.equal(a.get_tensor(key), b.get_tensor(key)) for key in a.keys())


def _broken(tmp_path: Path, damage) -> str:
    full = meta_state_dict()
    save_ranks(tmp_path / "mp", full, 2, embedding_dim=0)
    rank1 = tmp_path / "mp" / "consolidated.01.pth"
    state = torch.load(rank1, weights_only=True)
    damage(state)
    torch.save(state, rank1)
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(tmp_path / "mp")
    message = str(error.value)
    assert "\n" not in message
    return message


def test_ranks_with_other_keys(tmp_path):
    message = _broken(tmp_path, lambda state: state.pop("norm.weight"))
    assert "consolidated.01.pth: holds other keys" in message and "norm.weight" in message


def test_ranks_with_other_shapes(tmp_path):
    def widen(state):
        state["layers.0.attention.wq.weight"] = torch.zeros(16, 33, dtype=torch.bfloat16)

    message = _broken(tmp_path, widen)
    assert "layers.0.attention.wq.weight is [16, 33]" in message and "rank 0 has" in message


def test_ranks_with_other_dtypes(tmp_path):
    message = _broken(tmp_path, lambda state: state.update(
        {"norm.weight": state["norm.weight"].float()}))
    assert "norm.weight" in message and "torch.float32" in message


def test_unknown_keys_and_missing_ranks(tmp_path):
    for rank in range(2):
        torch.save({"w": torch.ones(2)}, tmp_path / f"consolidated.{rank:02d}.pth")
    with pytest.raises(CheckpointError, match=r"split is unknown \(w\)"):
        open_checkpoint(tmp_path)
    (tmp_path / "consolidated.01.pth").rename(tmp_path / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match=r"ranks \[0, 2\]"):
        open_checkpoint(tmp_path)

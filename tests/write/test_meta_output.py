"""Meta is an output layout: consolidated.00.pth + params.json, read back losslessly."""

from __future__ import annotations

import json

import pytest
import torch

from fusesurgery import detect_checkpoint, load_decoder
from fusesurgery.convert.configs import meta_config_dict, read_meta_decoder_config
from fusesurgery.errors import FuseSurgeryError
from fusesurgery.io import open_checkpoint
from fusesurgery.write import convert_checkpoint
from tests.fusion_inputs import save_decoder


def _tensors(path):
    with open_checkpoint(path) as source:
        return {key: source.get_tensor(key).clone() for key in source.keys()}


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_hf_to_meta_and_back_is_bitwise(tmp_path, family):
    decoder, _ = save_decoder(family, tmp_path)
    meta, back = tmp_path / "meta", tmp_path / "back"
    convert_checkpoint(decoder, meta, to="meta")
    names = {p.name for p in meta.iterdir()}
    assert {"consolidated.00.pth", "params.json"} <= names and "config.json" not in names
    state = torch.load(meta / "consolidated.00.pth", weights_only=True, mmap=True)
    assert "layers.0.attention.wq.weight" in state and "tok_embeddings.weight" in state
    assert detect_checkpoint(meta).config == detect_checkpoint(decoder).config.replace(
        max_seq_len=detect_checkpoint(meta).config.max_seq_len)
    tokens = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_decoder(meta)(tokens), load_decoder(decoder)(tokens),
                                   rtol=0, atol=0)
    convert_checkpoint(meta, back, to="hf")
    original, again = _tensors(decoder), _tensors(back)
    assert set(original) == set(again)
    for key in original:
        assert torch.equal(original[key], again[key]), key


@pytest.mark.parametrize("dim, hidden", [(4096, 14336), (8192, 28672), (2048, 8192),
                                         (32, 64), (48, 100)])
def test_params_json_gives_back_the_mlp_width(dim, hidden):
    from fusesurgery.config import DecoderConfig

    config = DecoderConfig(vocab_size=10, embed_dim=dim, num_layers=1, num_heads=4,
                           intermediate_dim=hidden)
    params = meta_config_dict(config)
    assert json.loads(json.dumps(params)) == params
    assert read_meta_decoder_config(params).read["intermediate_dim"] == hidden


def test_qwen2_has_no_meta_layout(tmp_path):
    decoder, _ = save_decoder("qwen2-tied", tmp_path)
    with pytest.raises(FuseSurgeryError, match="bias"):
        convert_checkpoint(decoder, tmp_path / "meta", to="meta")
    assert not (tmp_path / "meta").exists()

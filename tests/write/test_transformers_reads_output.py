"""transformers, as an independent reader, loads what the writer produced."""

from __future__ import annotations

import pytest
import torch

from fusesurgery.io.tensor_info import TensorInfo
from fusesurgery.write import write_safetensors

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sharded_llama_loads_with_from_pretrained(tmp_path, dtype):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    state = model.state_dict()
    infos = [TensorInfo(name, tuple(t.shape), t.dtype) for name, t in state.items()]

    result = write_safetensors(
        tmp_path / "llama",
        infos,
        state.__getitem__,
        max_shard_size=20_000 if dtype == torch.float32 else 10_000,
        extra_files={"config.json": model.config.to_json_string()},
    )
    assert len(result.plan.shards) >= 3

    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=dtype).eval()
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded_state[name].dtype == tensor.dtype
        assert torch.equal(loaded_state[name], tensor), name

    # The reference is transformers' own writer, reloaded the same way: `model` itself is no
    # reference in bf16, because `.to(bf16)` also rounds its non-persistent rotary `inv_freq`
    # buffer, which a freshly loaded model recomputes in float32.
    model.save_pretrained(tmp_path / "reference")
    reference = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "reference", dtype=dtype
    ).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, reference(tokens).logits)
        if dtype == torch.float32:
            assert torch.equal(loaded(tokens).logits, model(tokens).logits)

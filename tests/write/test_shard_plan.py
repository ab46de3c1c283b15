"""Shard plans from sizes alone: plain ints and metadata, never tensor data."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusesurgery.errors import WriteError
from fusesurgery.io.tensor_info import TensorInfo
from fusesurgery.write import ShardPlan, parse_size, plan_shards, shard_filename


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("5GB", 5_000_000_000),
        ("500MB", 500_000_000),
        ("10GiB", 10 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("0.5KiB", 512),
        ("5gb", 5_000_000_000),
        (" 20 KB ", 20_000),
        ("2TB", 2 * 10**12),
        ("123", 123),
        ("64B", 64),
        (4096, 4096),
    ],
)
def test_parse_size_understands_units(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5XB", "", "GB", "5 G B", "-1GB", "0", "0MB", 0, -3, 1.5, True])
def test_parse_size_rejects_nonsense(size):
    with pytest.raises(WriteError, match="size"):
        parse_size(size)


def test_single_shard_has_hf_name_and_no_index():
    plan = plan_shards([("a", 10), ("b", 20)], max_shard_size=100)
    assert not plan.is_sharded
    assert plan.index_filename is None
    assert [s.filename for s in plan.shards] == ["model.safetensors"]
    assert plan.shards[0].keys == ("a", "b")
    assert plan.total_size == 30
    assert plan.weight_map == {"a": "model.safetensors", "b": "model.safetensors"}


def test_greedy_split_keeps_order_and_fills_to_the_limit():
    plan = plan_shards([("a", 4), ("b", 4), ("c", 4), ("d", 3), ("e", 1)], max_shard_size=8)
    assert [s.keys for s in plan.shards] == [("a", "b"), ("c", "d", "e")]
    assert [s.nbytes for s in plan.shards] == [8, 8]  # exactly the limit still fits
    assert [s.filename for s in plan.shards] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert plan.is_sharded
    assert plan.index_filename == "model.safetensors.index.json"
    assert plan.index() == {
        "metadata": {"total_size": 16},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
            "d": "model-00002-of-00002.safetensors",
            "e": "model-00002-of-00002.safetensors",
        },
    }


def test_tensor_larger_than_limit_gets_its_own_shard():
    plan = plan_shards(
        [("big0", 50), ("a", 3), ("big1", 11), ("big2", 12), ("b", 3), ("c", 3), ("z", 0)],
        max_shard_size=10,
    )
    assert [s.keys for s in plan.shards] == [
        ("big0",), ("a",), ("big1",), ("big2",), ("b", "c", "z")
    ]
    assert [s.nbytes for s in plan.shards] == [50, 3, 11, 12, 6]


def test_no_entries_is_one_empty_file():
    plan = plan_shards([], max_shard_size="1MB")
    assert [(s.filename, s.keys, s.nbytes) for s in plan.shards] == [("model.safetensors", (), 0)]
    assert plan.total_size == 0


def test_tensor_infos_are_sized_by_shape_and_dtype():
    infos = [
        TensorInfo("w", (3, 4), torch.bfloat16),  # 24 bytes
        TensorInfo("s", (), torch.float32),  # 4 bytes
        TensorInfo("e", (0, 7), torch.float32),  # 0 bytes
        TensorInfo("i", (5,), torch.int64),  # 40 bytes
    ]
    plan = plan_shards(infos, max_shard_size=28)
    assert [s.keys for s in plan.shards] == [("w", "s", "e"), ("i",)]
    assert plan.total_size == 68


def test_custom_prefix_and_wide_numbering():
    plan = plan_shards([("a", 1), ("b", 1)], max_shard_size=1, filename_prefix="diffusion_model")
    assert plan.weight_map == {
        "a": "diffusion_model-00001-of-00002.safetensors",
        "b": "diffusion_model-00002-of-00002.safetensors",
    }
    assert plan.index_filename == "diffusion_model.safetensors.index.json"
    assert shard_filename("model", 7, 123456) == "model-000007-of-123456.safetensors"


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([("a", 1), ("a", 2)], "appears twice"),
        ([("__metadata__", 1)], "__metadata__"),
        ([("", 1)], "invalid tensor name"),
        ([("a", -1)], "byte count"),
        ([("a", 1.0)], "byte count"),
    ],
)
def test_invalid_entries_raise(entries, match):
    with pytest.raises(WriteError, match=match):
        plan_shards(entries, max_shard_size=10)


def test_plan_is_frozen():
    plan = plan_shards([("a", 1)], max_shard_size=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.shards = ()  # type: ignore[misc]
    plan.weight_map["a"] = "elsewhere"  # a copy: the plan does not change
    assert plan.weight_map == {"a": "model.safetensors"}


def _llama_405b_infos() -> list[TensorInfo]:
    dim, layers, n_heads, n_kv, ffn, vocab = 16384, 126, 128, 8, 53248, 128256
    head_dim = dim // n_heads
    bf16 = torch.bfloat16
    infos = [TensorInfo("model.embed_tokens.weight", (vocab, dim), bf16)]
    for i in range(layers):
        p = f"model.layers.{i}."
        infos += [
            TensorInfo(p + "input_layernorm.weight", (dim,), bf16),
            TensorInfo(p + "self_attn.q_proj.weight", (n_heads * head_dim, dim), bf16),
            TensorInfo(p + "self_attn.k_proj.weight", (n_kv * head_dim, dim), bf16),
            TensorInfo(p + "self_attn.v_proj.weight", (n_kv * head_dim, dim), bf16),
            TensorInfo(p + "self_attn.o_proj.weight", (dim, n_heads * head_dim), bf16),
            TensorInfo(p + "post_attention_layernorm.weight", (dim,), bf16),
            TensorInfo(p + "mlp.gate_proj.weight", (ffn, dim), bf16),
            TensorInfo(p + "mlp.up_proj.weight", (ffn, dim), bf16),
            TensorInfo(p + "mlp.down_proj.weight", (dim, ffn), bf16),
        ]
    infos += [
        TensorInfo("model.norm.weight", (dim,), bf16),
        TensorInfo("lm_head.weight", (vocab, dim), bf16),
    ]
    return infos


def test_llama_405b_layout_is_planned_from_metadata():
    infos = _llama_405b_infos()
    plan = plan_shards(infos, max_shard_size="5GB")
    # Llama 3.1 405B has 405,853,388,800 parameters, 2 bytes each in bf16.
    assert plan.total_size == 2 * 405_853_388_800
    assert len(plan.weight_map) == len(infos) == 1 + 126 * 9 + 2
    assert all(s.nbytes <= 5 * 10**9 for s in plan.shards)
    assert len(plan.shards) >= math.ceil(plan.total_size / (5 * 10**9))
    assert plan.shards[0].filename == f"model-00001-of-{len(plan.shards):05d}.safetensors"
    assert [k for s in plan.shards for k in s.keys] == [i.name for i in infos]
    # The same plan from (name, nbytes) pairs.
    assert plan_shards([(i.name, i.nbytes) for i in infos], "5GB") == plan


def test_tensor_larger_than_a_small_limit_in_a_big_model():
    infos = _llama_405b_infos()
    plan = plan_shards(infos, max_shard_size="1GB")
    embed = plan.shards[0]
    assert embed.keys == ("model.embed_tokens.weight",)
    assert embed.nbytes == 128256 * 16384 * 2  # 4.2 GB, above the 1 GB limit, alone


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=100), max_size=40),
    limit=st.integers(min_value=1, max_value=120),
)
def test_plan_invariants(sizes, limit):
    entries = [(f"t{i}", n) for i, n in enumerate(sizes)]
    plan = plan_shards(entries, max_shard_size=limit)
    size_of = dict(entries)
    assert isinstance(plan, ShardPlan)
    assert [k for s in plan.shards for k in s.keys] == [name for name, _ in entries]
    for shard in plan.shards:
        assert shard.nbytes == sum(size_of[k] for k in shard.keys)
        assert shard.nbytes <= limit or len(shard.keys) == 1
    for shard, following in zip(plan.shards, plan.shards[1:], strict=False):
        # Greedy: a new shard starts only when the next tensor would overflow this one.
        assert shard.nbytes + size_of[following.keys[0]] > limit
    assert plan.total_size == sum(sizes)
    assert plan.is_sharded == (len(plan.shards) > 1)

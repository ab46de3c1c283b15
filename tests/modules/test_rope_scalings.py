"""Every RoPE scaling's cos/sin against transformers' own rotary embedding for the same config
(``ROPE_INIT_FUNCTIONS`` and ``dynamic_rope_update``), bit for bit, over drawn configs and call
sequences; and what the tables hold."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fusesurgery.config import RopeScaling
from fusesurgery.modules import RotaryPositionalEmbeddings, rope_attention_factor

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

PROPERTY = settings(max_examples=15, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def theirs(head_dim: int, max_positions: int, base: float, rope: dict) -> LlamaRotaryEmbedding:
    config = transformers.LlamaConfig(
        hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
        max_position_embeddings=max_positions, rope_parameters={**rope, "rope_theta": base})
    return LlamaRotaryEmbedding(config)


def assert_same_calls(head_dim: int, max_positions: int, base: float, rope: dict,
                      scaling: RopeScaling, calls: list[tuple[int, int]]) -> None:
    """Each call ``(start, stop)``: positions ``start..stop-1`` through both modules, one
    after the other (the dynamic scaling's state carries over, as in a decode loop)."""
    reference = theirs(head_dim, max_positions, base, rope)
    ours = RotaryPositionalEmbeddings(head_dim, max_seq_len=10**6, base=base,
                                      scaling=scaling, style="half")
    for start, stop in calls:
        positions = torch.arange(start, stop)[None]
        cos, sin = reference(torch.zeros(1, stop - start, 1, head_dim), positions)
        rows = ours.cos_sin(stop - start, positions)
        # transformers repeats the h_d/2 angles: [cos(a), cos(a)]
        assert torch.equal(rows[..., 0], cos[..., : head_dim // 2]), (start, stop)
        assert torch.equal(rows[..., 1], sin[..., : head_dim // 2]), (start, stop)


head_dims = st.sampled_from([4, 8, 16, 64, 128])
bases = st.sampled_from([100.0, 10_000.0, 500_000.0, 1_000_000.0])
factors = st.floats(1.0, 40.0, allow_nan=False).map(lambda f: round(f, 3))
originals = st.sampled_from([4, 16, 50, 64])


@PROPERTY
@given(head_dims, bases, factors, originals, st.integers(1, 300))
def test_linear_and_llama3(head_dim, base, factor, original, length):
    assert_same_calls(head_dim, 4 * original, base, {"rope_type": "linear", "factor": factor},
                      RopeScaling(rope_type="linear", factor=factor), [(0, length)])
    llama3 = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    assert_same_calls(head_dim, 4 * original, base, llama3,
                      RopeScaling(factor=factor, original_max_position_embeddings=original),
                      [(0, length)])


@PROPERTY
@given(head_dims, bases, factors, originals, st.integers(1, 300),
       st.one_of(st.none(), st.floats(0.5, 64)), st.one_of(st.none(), st.floats(0.25, 4)),
       st.one_of(st.none(), st.floats(0.1, 2)), st.one_of(st.none(), st.floats(0.1, 2)),
       st.one_of(st.none(), st.booleans()), st.one_of(st.none(), st.floats(0.5, 2)))
def test_yarn(head_dim, base, factor, original, length, beta_fast, beta_slow, mscale,
              mscale_all_dim, truncate, attention_factor):
    optional = dict(beta_fast=beta_fast, beta_slow=beta_slow, mscale=mscale,
                    mscale_all_dim=mscale_all_dim, truncate=truncate,
                    attention_factor=attention_factor)
    optional = {k: v for k, v in optional.items() if v is not None}
    assume((beta_fast or 32) >= (beta_slow or 1))  # the other order is refused
    rope = {"rope_type": "yarn", "factor": factor,
            "original_max_position_embeddings": original, **optional}
    scaling = RopeScaling(rope_type="yarn", factor=factor,
                          original_max_position_embeddings=original, **optional)
    assert_same_calls(head_dim, 4 * original, base, rope, scaling, [(0, length)])


@PROPERTY
@given(head_dims, bases, originals, st.data())
def test_longrope_switches_factors_per_call(head_dim, base, original, data):
    half = head_dim // 2
    factor_lists = st.lists(st.floats(1.0, 60.0), min_size=half, max_size=half)
    short, long = data.draw(factor_lists), data.draw(factor_lists)
    max_positions = data.draw(st.sampled_from([original, 2 * original, 32 * original]))
    calls = data.draw(st.lists(st.tuples(st.integers(0, 3 * original), st.integers(1, 20))
                               .map(lambda c: (c[0], c[0] + c[1])), min_size=1, max_size=5))
    rope = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": original}
    # transformers' factor when config.json leaves it out: max_position_embeddings / original
    scaling = RopeScaling(rope_type="longrope", factor=max_positions / original,
                          original_max_position_embeddings=original, short_factor=short,
                          long_factor=long)
    assert_same_calls(head_dim, max_positions, base, rope, scaling, calls)


@PROPERTY
@given(st.sampled_from([4, 8, 64]), bases, st.floats(1.0, 8.0).map(lambda f: round(f, 2)),
       originals, st.data())
def test_dynamic_ntk_follows_transformers_state_across_calls(head_dim, base, factor,
                                                             original, data):
    """Growth past the longest call so far, the original frequencies again for a call shorter
    than the original context, and a decode loop (one position per call) across it."""
    calls = data.draw(st.lists(st.tuples(st.integers(0, 3 * original), st.integers(1, 20))
                               .map(lambda c: (c[0], c[0] + c[1])), min_size=1, max_size=6))
    calls += [(p, p + 1) for p in range(original - 2, original + 3)]
    assert_same_calls(head_dim, original, base, {"rope_type": "dynamic", "factor": factor},
                      RopeScaling(rope_type="dynamic", factor=factor,
                                  original_max_position_embeddings=original), calls)


def test_attention_factors_are_transformers():
    yarn = RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
    assert rope_attention_factor(yarn) == theirs(8, 64, 1e4, yarn.parameters()).attention_scaling
    longrope = RopeScaling(rope_type="longrope", factor=8.0, original_max_position_embeddings=16,
                           short_factor=[1.0] * 4, long_factor=[2.0] * 4)
    assert rope_attention_factor(longrope) == theirs(
        8, 128, 1e4, longrope.parameters()).attention_scaling
    assert rope_attention_factor(longrope) > 1 and rope_attention_factor(yarn) > 1
    assert rope_attention_factor(RopeScaling(factor=8.0)) == 1.0


def test_tables_stay_bounded():
    """Dynamic NTK past its original context computes each call's rows alone (the table keeps
    only the original frequencies); LongRoPE's long table grows on demand like the first."""
    from fusesurgery.modules.rope import ROPE_CHUNK

    dynamic = RotaryPositionalEmbeddings(8, max_seq_len=10**9, scaling=RopeScaling(
        rope_type="dynamic", factor=2.0, original_max_position_embeddings=16), style="half")
    x = torch.randn(1, 1, 2, 8)
    for position in (3, 40, 10**6):
        dynamic(x, input_pos=torch.tensor([[position]]))
    assert dynamic.cache.shape == (ROPE_CHUNK, 4, 2)
    longrope = RotaryPositionalEmbeddings(8, max_seq_len=10**9, scaling=RopeScaling(
        rope_type="longrope", factor=4.0, original_max_position_embeddings=16,
        short_factor=[1.0] * 4, long_factor=[2.0] * 4))
    longrope(x, input_pos=torch.tensor([[3]]))
    assert longrope.cache.shape[0] == ROPE_CHUNK and longrope.long_cache.shape[0] == 0
    longrope(x, input_pos=torch.tensor([[ROPE_CHUNK + 5]]))
    assert longrope.cache.shape[0] == ROPE_CHUNK and longrope.long_cache.shape[0] == 2 * ROPE_CHUNK
    with pytest.raises(ValueError, match="position 1000000000 is past max_seq_len 1000000000"):
        dynamic(x, input_pos=torch.tensor([[10**9]]))


def test_reset_forgets_the_dynamic_length():
    scaling = RopeScaling(rope_type="dynamic", factor=2.0, original_max_position_embeddings=8)
    rope = RotaryPositionalEmbeddings(8, max_seq_len=64, scaling=scaling, style="half")
    fresh = RotaryPositionalEmbeddings(8, max_seq_len=64, scaling=scaling, style="half")
    rope.cos_sin(40)
    grown = rope.cos_sin(10)  # 10 >= 8: still the frequencies for 40, as transformers keeps
    assert not torch.equal(grown, fresh.cos_sin(10))
    rope.reset_parameters()
    assert torch.equal(rope.cos_sin(10), RotaryPositionalEmbeddings(
        8, max_seq_len=64, scaling=scaling, style="half").cos_sin(10))

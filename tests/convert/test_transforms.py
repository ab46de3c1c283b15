from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusesurgery.convert.transforms import (
    IDENTITY,
    PERMUTE_QK_FROM_NATIVE,
    PERMUTE_QK_TO_NATIVE,
    apply_transform,
    invert_transform,
    permute_qk_from_native,
    permute_qk_to_native,
)
from fusesurgery.errors import ShapeError


def test_permutation_on_row_indices():
    # One head of h_d 8: HF holds halves [0 1 2 3 | 4 5 6 7], native pairs (0 4)(1 5)(2 6)(3 7).
    rows = torch.arange(8)
    assert permute_qk_to_native(rows, 1, 8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert permute_qk_from_native(rows, 1, 8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    # Heads never mix.
    two_heads = torch.arange(8)
    assert permute_qk_to_native(two_heads, 2, 4).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@settings(max_examples=40, deadline=None)
@given(
    num_heads=st.integers(1, 6),
    half_head_dim=st.integers(1, 8),
    dim=st.integers(1, 12),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    with_bias=st.booleans(),
)
def test_round_trips_are_bitwise(num_heads, half_head_dim, dim, dtype, with_bias):
    head_dim = 2 * half_head_dim
    shape = (num_heads * head_dim,) if with_bias else (num_heads * head_dim, dim)
    tensor = torch.randn(shape).to(dtype)
    native = permute_qk_to_native(tensor, num_heads, head_dim)
    assert native.shape == tensor.shape and native.dtype == dtype and native.is_contiguous()
    assert torch.equal(permute_qk_from_native(native, num_heads, head_dim), tensor)
    assert torch.equal(permute_qk_to_native(permute_qk_from_native(tensor, num_heads, head_dim),
                                            num_heads, head_dim), tensor)
    if head_dim > 2:  # with h_d 2 the permutation is the identity
        assert not torch.equal(native, tensor) or tensor.unique().numel() == 1


def _interleaved_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Meta-style RoPE: rotate (x[2j], x[2j+1]) by angles[j]. x: [s, n, h_d]; angles [s, h_d/2]."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    return torch.view_as_real(rotated).flatten(-2)


def test_permuted_projection_computes_what_transformers_rope_computes():
    """Half-split RoPE on HF weights == interleaved RoPE on the permuted (native) weights."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    num_heads, num_kv_heads, head_dim, dim, seq = 4, 2, 16, 64, 7
    config = LlamaConfig(
        hidden_size=dim, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=16_384, rope_theta=500_000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    rotary = LlamaRotaryEmbedding(config)
    torch.manual_seed(0)
    wq, wk = torch.randn(num_heads * head_dim, dim), torch.randn(num_kv_heads * head_dim, dim)
    x = torch.randn(1, seq, dim)
    positions = torch.arange(seq)[None]
    cos, sin = rotary(x, positions)

    def heads(w, n):  # [1, n, s, h_d]
        return (x @ w.T).view(1, seq, n, head_dim).transpose(1, 2)

    q_hf, k_hf = apply_rotary_pos_emb(heads(wq, num_heads), heads(wk, num_kv_heads), cos, sin)

    angles = positions[0, :, None].float() * rotary.inv_freq[None, :]
    wq_native = permute_qk_to_native(wq, num_heads, head_dim)
    wk_native = permute_qk_to_native(wk, num_kv_heads, head_dim)
    q_native = _interleaved_rope((x[0] @ wq_native.T).view(seq, num_heads, head_dim), angles)
    k_native = _interleaved_rope((x[0] @ wk_native.T).view(seq, num_kv_heads, head_dim), angles)

    # Same values with each head's dims in native order.
    native_order = permute_qk_to_native(torch.arange(head_dim), 1, head_dim)
    torch.testing.assert_close(q_native, q_hf[0, :, :, native_order].transpose(0, 1))
    torch.testing.assert_close(k_native, k_hf[0, :, :, native_order].transpose(0, 1))
    # So the attention scores agree too (up to summation order).
    scores_hf = q_hf[0, :2] @ k_hf[0].transpose(-1, -2)
    scores_native = q_native[:, :2].transpose(0, 1) @ k_native.permute(1, 2, 0)
    torch.testing.assert_close(scores_native, scores_hf, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("function", [permute_qk_to_native, permute_qk_from_native])
def test_bad_shapes_are_refused(function):
    with pytest.raises(ShapeError, match="head_dim 3 is odd"):
        function(torch.zeros(6, 4), 2, 3)
    with pytest.raises(ShapeError, match=r"expected a \[4\*8, ...\].*got shape \[30, 4\]"):
        function(torch.zeros(30, 4), 4, 8)
    with pytest.raises(ShapeError):
        function(torch.zeros(8, 2, 2), 1, 8)


def test_transforms_as_data():
    tensor = torch.randn(16, 3)
    step = (PERMUTE_QK_TO_NATIVE, 2, 8)
    assert torch.equal(apply_transform(step, tensor), permute_qk_to_native(tensor, 2, 8))
    assert invert_transform(step) == (PERMUTE_QK_FROM_NATIVE, 2, 8)
    assert torch.equal(apply_transform(invert_transform(step), apply_transform(step, tensor)),
                       tensor)
    assert apply_transform((IDENTITY,), tensor) is tensor
    with pytest.raises(ShapeError, match="unknown tensor transform 'transpose'"):
        apply_transform(("transpose",), tensor)

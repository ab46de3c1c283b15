"""Both RoPE pairings against a straightforward per-element formula, and the family table."""

import math

import pytest
import torch

from fusesurgery.config import DECODER_PRESETS, NATIVE_ROPE_STYLE, RopeScaling
from fusesurgery.convert.transforms import permute_qk_to_native
from fusesurgery.modules import RotaryPositionalEmbeddings, build_decoder_layer

SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=16)


def reference_inv_freq(head_dim: int, base: float, scaling: RopeScaling | None) -> list[float]:
    """Llama 3.1 scaling written out one frequency at a time, as the paper states it."""
    out = []
    for j in range(head_dim // 2):
        freq = 1.0 / base ** (2 * j / head_dim)
        if scaling is not None:
            wavelen = 2 * math.pi / freq
            low = scaling.original_max_position_embeddings / scaling.low_freq_factor
            high = scaling.original_max_position_embeddings / scaling.high_freq_factor
            if wavelen > low:
                freq = freq / scaling.factor
            elif wavelen >= high:
                smooth = (scaling.original_max_position_embeddings / wavelen
                          - scaling.low_freq_factor) / (
                    scaling.high_freq_factor - scaling.low_freq_factor)
                freq = (1 - smooth) * freq / scaling.factor + smooth * freq
        out.append(freq)
    return out


def reference_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: list[float],
                   style: str) -> torch.Tensor:
    """x: [b, s, n, h_d]; positions: [b, s]. Rotate each pair element by element."""
    b, s, n, head_dim = x.shape
    half = head_dim // 2
    out = torch.empty_like(x, dtype=torch.float64)
    xd = x.double()
    for bi in range(b):
        for si in range(s):
            for j in range(half):
                angle = float(positions[bi, si]) * inv_freq[j]
                cos, sin = math.cos(angle), math.sin(angle)
                a, c = (2 * j, 2 * j + 1) if style == "interleaved" else (j, j + half)
                first, second = xd[bi, si, :, a], xd[bi, si, :, c]
                out[bi, si, :, a] = first * cos - second * sin
                out[bi, si, :, c] = second * cos + first * sin
    return out


@pytest.mark.parametrize("style", ["interleaved", "half"])
@pytest.mark.parametrize("scaling", [None, SCALING], ids=["plain", "llama3.1"])
def test_rope_matches_the_formula(style, scaling):
    head_dim, base, b, s, n = 16, 500_000.0, 2, 40, 3
    rope = RotaryPositionalEmbeddings(head_dim, max_seq_len=64, base=base, scaling=scaling,
                                      style=style)
    x = torch.randn(b, s, n, head_dim)
    inv_freq = reference_inv_freq(head_dim, base, scaling)
    positions = torch.arange(s).expand(b, s)
    expected = reference_rope(x, positions, inv_freq, style).float()
    torch.testing.assert_close(rope(x), expected, rtol=0, atol=1e-5)

    # input_pos: a different, unordered set of positions per batch row
    input_pos = torch.stack([torch.randperm(64)[:s], torch.randperm(64)[:s]])
    expected = reference_rope(x, input_pos, inv_freq, style).float()
    torch.testing.assert_close(rope(x, input_pos=input_pos), expected, rtol=0, atol=1e-5)


def test_half_style_is_interleaved_style_on_permuted_dims():
    """The two pairings differ only in which dims pair up: the q/k permutation maps one to the
    other, which is why a permuted checkpoint and an unpermuted one compute the same thing."""
    head_dim = 8
    x = torch.randn(1, 5, 2, head_dim)
    order = permute_qk_to_native(torch.arange(head_dim), 1, head_dim)
    half = RotaryPositionalEmbeddings(head_dim, 16, scaling=SCALING, style="half")
    interleaved = RotaryPositionalEmbeddings(head_dim, 16, scaling=SCALING)
    assert torch.equal(interleaved(x[..., order]), half(x)[..., order])


def test_half_order_output_hands_attention_transformers_dim_order():
    # an interleaved-layout q rotated with half_order_output is the half-style rotation of the
    # same q in transformers' layout: the same values in the same places, bit for bit
    head_dim = 8
    x = torch.randn(1, 5, 2, head_dim)
    order = permute_qk_to_native(torch.arange(head_dim), 1, head_dim)
    half = RotaryPositionalEmbeddings(head_dim, 16, scaling=SCALING, style="half")
    reordered = RotaryPositionalEmbeddings(head_dim, 16, scaling=SCALING,
                                           half_order_output=True)
    assert torch.equal(reordered(x[..., order]), half(x))
    both = RotaryPositionalEmbeddings(head_dim, 16, scaling=SCALING, style="half",
                                      half_order_output=True)
    assert torch.equal(both(x), half(x))


def test_dtype_is_kept_and_bad_arguments_are_refused():
    rope = RotaryPositionalEmbeddings(8, 16, style="half")
    assert rope(torch.randn(1, 3, 2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown RoPE style 'rotate'; valid: interleaved, half"):
        RotaryPositionalEmbeddings(8, 16, style="rotate")
    with pytest.raises(ValueError, match="even head_dim, got 7"):
        RotaryPositionalEmbeddings(7, 16, style="half")


def test_each_family_builds_the_pairing_of_its_native_layout():
    assert NATIVE_ROPE_STYLE == {"llama": "interleaved", "mistral": "interleaved",
                                 "qwen2": "half", "qwen3": "half", "smollm3": "half",
                                 "gemma2": "interleaved", "gemma3": "half", "phi3": "half",
                                 "ministral": "interleaved"}
    tiny = DECODER_PRESETS["tiny"]
    for family, style in NATIVE_ROPE_STYLE.items():
        config = tiny.replace(family=family)
        assert config.rope_style == style
        assert build_decoder_layer(config).attn.pos_embeddings.style == style


def test_a_huge_max_seq_len_costs_nothing_until_positions_are_used():
    """10**12 positions stated: the table holds the chunk the positions used, no more."""
    from fusesurgery.modules.rope import ROPE_CHUNK

    rope = RotaryPositionalEmbeddings(16, max_seq_len=10**12, base=500_000.0, scaling=SCALING)
    assert rope.cache.shape == (0, 8, 2)
    x = torch.randn(1, 8, 2, 16)
    out = rope(x)
    assert rope.cache.shape == (ROPE_CHUNK, 8, 2)
    positions = torch.arange(8).expand(1, 8)
    expected = reference_rope(x, positions, reference_inv_freq(16, 500_000.0, SCALING),
                              "interleaved")
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    rope(x[:, :1], input_pos=torch.tensor([[ROPE_CHUNK + 3]]))  # one chunk more, on demand
    assert rope.cache.shape == (2 * ROPE_CHUNK, 8, 2)


def test_the_table_does_not_depend_on_how_it_grew():
    """Grown a chunk at a time or at once, to the same rows: the same bits (a fused model and
    the decoder loaded on its own must agree bit for bit whatever each one ran before)."""
    from fusesurgery.modules.rope import ROPE_CHUNK

    stepwise = RotaryPositionalEmbeddings(16, max_seq_len=3 * ROPE_CHUNK + 5, scaling=SCALING)
    at_once = RotaryPositionalEmbeddings(16, max_seq_len=3 * ROPE_CHUNK + 5, scaling=SCALING)
    for length in (1, ROPE_CHUNK + 1, 3 * ROPE_CHUNK + 5):
        stepwise.reserve(length)
    at_once.reserve(3 * ROPE_CHUNK + 5)
    assert stepwise.cache.shape == (3 * ROPE_CHUNK + 5, 8, 2)
    assert torch.equal(stepwise.cache.view(torch.int32), at_once.cache.view(torch.int32))


def test_a_position_past_max_seq_len_is_refused():
    rope = RotaryPositionalEmbeddings(16, max_seq_len=10)
    with pytest.raises(ValueError, match="position 10 is past max_seq_len 10"):
        rope(torch.randn(1, 1, 2, 16), input_pos=torch.tensor([[10]]))
    with pytest.raises(ValueError, match="past max_seq_len 10"):
        rope(torch.randn(1, 11, 2, 16))


def test_the_largest_position_is_read_once_per_positions_tensor(monkeypatch):
    """Every layer gets the same input_pos: the device is waited on once for it, and again
    only when it changes in place (a decode loop that increments it)."""
    rope = RotaryPositionalEmbeddings(16, max_seq_len=10**6)
    reads = []
    reserve = rope.reserve
    monkeypatch.setattr(rope, "reserve", lambda length: (reads.append(length), reserve(length)))
    x = torch.randn(1, 1, 2, 16)
    pos = torch.tensor([[5]])
    for _ in range(8):  # eight layers
        rope(x, input_pos=pos)
    assert reads == [6]
    pos += 5000
    rope(x, input_pos=pos)
    rope(x, input_pos=pos)
    assert reads == [6, 5006] and rope.cache.shape[0] == 8192

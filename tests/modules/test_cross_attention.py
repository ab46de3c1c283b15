"""The fusion cross-attention on the CPU: half-precision inputs attend in float32 (the CPU's
half-precision SDPA kernel is several times slower for a one-token query and rounds the
probabilities to the half dtype), the image keys and values are cached in float32, and grouped
heads pair in the kernel instead of being copied per query head."""

import pytest
import torch
import torch.nn.functional as F

from fusesurgery.modules import build_fusion_layer
from fusesurgery.modules.attention import MultiHeadAttention

S_E = 40  # image positions


def _layer(decoder_cfg, fusion_cfg, dtype):
    layer = build_fusion_layer(decoder_cfg, fusion_cfg).to(dtype).eval()
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.5)  # norms' scales and gates too: every branch counts
    return layer


def _float32_reference(attn: MultiHeadAttention, x: torch.Tensor, y: torch.Tensor,
                       mask: torch.Tensor | None) -> torch.Tensor:
    """The cross-attention computed from the same half-precision q, k and v, cast up to
    float32 for the attention alone, the k/v heads repeated per query head."""
    b, s, _ = x.shape
    q = attn.q_norm(attn.q_proj(x).view(b, s, attn.num_heads, attn.head_dim)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(y).view(b, -1, attn.num_kv_heads, attn.head_dim))
    v = attn.v_proj(y).view(b, -1, attn.num_kv_heads, attn.head_dim)
    group = attn.num_heads // attn.num_kv_heads
    k = k.transpose(1, 2).repeat_interleave(group, dim=1)
    v = v.transpose(1, 2).repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                         attn_mask=None if mask is None else mask[:, None])
    return attn.output_proj(out.to(x.dtype).transpose(1, 2).reshape(b, s, -1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_half_precision_attends_in_float32(decoder_cfg, fusion_cfg, dtype, masked):
    attn = _layer(decoder_cfg, fusion_cfg, dtype).attn
    assert attn.num_kv_heads < attn.num_heads  # grouped heads: the kernel pairs them
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, decoder_cfg.embed_dim, generator=g).to(dtype)
    y = torch.randn(2, S_E, fusion_cfg.encoder_dim, generator=g).to(dtype)
    mask = torch.rand(2, 5, S_E, generator=g) > 0.4 if masked else None
    with torch.no_grad():
        out = attn(x, y, mask=mask)
        assert out.dtype == dtype
        assert torch.equal(out, _float32_reference(attn, x, y, mask))


def test_float32_is_unchanged_with_grouped_heads_paired_in_the_kernel(decoder_cfg, fusion_cfg):
    attn = _layer(decoder_cfg, fusion_cfg, torch.float32).attn
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, decoder_cfg.embed_dim, generator=g)
    y = torch.randn(2, S_E, fusion_cfg.encoder_dim, generator=g)
    mask = torch.rand(2, 5, S_E, generator=g) > 0.4
    with torch.no_grad():
        for m in (None, mask):  # bitwise what copying the heads gave
            assert torch.equal(attn(x, y, mask=m), _float32_reference(attn, x, y, m))


def test_the_image_cache_is_float32_and_steps_equal_uncached_calls(decoder_cfg, fusion_cfg):
    dtype = torch.bfloat16
    layer = _layer(decoder_cfg, fusion_cfg, dtype)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, decoder_cfg.embed_dim, generator=g).to(dtype)
    y = torch.randn(2, S_E, fusion_cfg.encoder_dim, generator=g).to(dtype)
    layer.setup_cache(2, dtype, encoder_max_seq_len=S_E, decoder_max_seq_len=16)
    cache = layer.attn.kv_cache
    # cast once at the prefill, not at every step; exact, so nothing else changes
    assert cache.k_cache.dtype == cache.v_cache.dtype == torch.float32
    with torch.no_grad():
        prefill = layer(x[:, :2], encoder_input=y)
        steps = [layer(x[:, i:i + 1]) for i in range(2, 6)]
        layer.teardown_cache()
        assert torch.equal(prefill, layer(x[:, :2], encoder_input=y))
        for i, step in enumerate(steps, start=2):
            assert step.dtype == dtype
            assert torch.equal(step, layer(x[:, i:i + 1], encoder_input=y))


def test_self_attention_and_other_devices_keep_their_dtype(decoder_cfg, fusion_cfg):
    fusion = _layer(decoder_cfg, fusion_cfg, torch.bfloat16).attn
    fusion.setup_cache(1, torch.bfloat16, S_E)
    assert fusion.kv_cache.k_cache.dtype == torch.float32
    plain = MultiHeadAttention(  # the decoder's and the towers' attention: untouched
        embed_dim=8, num_heads=2, num_kv_heads=1, head_dim=4,
        q_proj=torch.nn.Linear(8, 8), k_proj=torch.nn.Linear(8, 4),
        v_proj=torch.nn.Linear(8, 4), output_proj=torch.nn.Linear(8, 8))
    plain.setup_cache(1, torch.bfloat16, 8)
    assert plain.kv_cache.k_cache.dtype == torch.bfloat16
    with torch.device("meta"):
        on_meta = _layer(decoder_cfg, fusion_cfg, torch.bfloat16).attn
    on_meta.setup_cache(1, torch.bfloat16, S_E)
    assert on_meta.kv_cache.k_cache.dtype == torch.bfloat16

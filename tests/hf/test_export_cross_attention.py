"""The exported model's cross-attention layer computes what fusesurgery's own does, bit for bit,
in float32 and in half precision: on the CPU both attend in float32 for bfloat16 / float16
inputs, keep the image keys and values in float32 with their ``n_kv`` heads, and pair the query
heads with them inside SDPA."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fusesurgery.config import DecoderConfig, FusionConfig
from fusesurgery.modules import build_fusion_layer

pytest.importorskip("transformers")

D, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, S_E = 32, 4, 2, 8, 64, 40


def _pair(dtype: torch.dtype):
    """A native fusion layer and the exported one holding the same random weights."""
    from fusesurgery.hf.template.modeling_fusesurgery_fused import FusionCrossAttentionLayer

    decoder = DecoderConfig(vocab_size=64, embed_dim=D, num_layers=2, num_heads=HEADS,
                            num_kv_heads=KV_HEADS, intermediate_dim=HIDDEN, max_seq_len=32)
    native = build_fusion_layer(decoder, FusionConfig.every(1, 2, encoder_dim=D,
                                                            fusion_vocab_size=1))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in native.parameters():
            param.normal_(0.0, 0.5)  # every norm, gate and projection counts
    config = SimpleNamespace(
        hidden_size=D, fusion_num_heads=HEADS, fusion_num_kv_heads=KV_HEADS,
        fusion_head_dim=HEAD_DIM, fusion_intermediate_size=HIDDEN,
        qk_norm_eps=native.attn.q_norm.eps, ca_norm_eps=native.ca_norm.eps,
        fusion_norm_unit_offset=False)
    exported = FusionCrossAttentionLayer(config)
    exported.load_state_dict(native.state_dict())
    return native.to(dtype).eval(), exported.to(dtype).eval()


def _inputs(dtype: torch.dtype, s: int = 6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, s, D, generator=g).to(dtype)
    image = torch.randn(2, S_E, D, generator=g).to(dtype)
    mask = torch.rand(2, s, S_E, generator=g) > 0.4
    mask[0, :2] = False  # text before the image: rows the layer leaves unchanged
    return x, image, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exported_layer_equals_the_native_one_bitwise(dtype):
    native, exported = _pair(dtype)
    x, image, mask = _inputs(dtype)
    with torch.no_grad():
        k, v = exported.attn.project_kv(image)
        for m in (mask, None):
            expected = native(x, encoder_input=image, encoder_mask=m)
            assert torch.equal(exported(x, k, v, m), expected)
        skipped = exported(x, k, v, mask)[0, :2]  # rows that see no image position
        assert torch.equal(skipped, x[0, :2])
        # decoding steps: the native layer reads its cache, the export its project_kv
        native.setup_cache(2, dtype, encoder_max_seq_len=S_E, decoder_max_seq_len=8)
        native(x[:, :1], encoder_input=image, encoder_mask=mask[:, :1])
        for i in range(1, x.shape[1]):
            step = native(x[:, i:i + 1], encoder_mask=mask[:, i:i + 1])
            assert torch.equal(exported(x[:, i:i + 1], k, v, mask[:, i:i + 1]), step)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_image_keys_are_float32_and_attended_in_float32(dtype):
    _, exported = _pair(dtype)
    x, image, mask = _inputs(dtype)
    attn = exported.attn
    with torch.no_grad():
        k, v = attn.project_kv(image)
        # once per image: cast up, contiguous per head, the n_kv heads not copied per query head
        for t in (k, v):
            assert t.dtype == torch.float32 and t.is_contiguous()
            assert t.shape == (2, KV_HEADS, S_E, HEAD_DIM)
        q = attn.q_norm(attn.q_proj(x).view(2, -1, HEADS, HEAD_DIM)).transpose(1, 2)
        k_half = attn.k_norm(attn.k_proj(image).view(2, S_E, KV_HEADS, HEAD_DIM)).transpose(1, 2)
        v_half = attn.v_proj(image).view(2, S_E, KV_HEADS, HEAD_DIM).transpose(1, 2)
        assert torch.equal(k, k_half.float()) and torch.equal(v, v_half.float())  # exact
        reference = F.scaled_dot_product_attention(
            q.float(), k_half.float().repeat_interleave(HEADS // KV_HEADS, dim=1),
            v_half.float().repeat_interleave(HEADS // KV_HEADS, dim=1),
            attn_mask=mask[:, None])
        expected = attn.output_proj(reference.to(dtype).transpose(1, 2).reshape(2, x.shape[1], -1))
        out = attn(x, k, v, mask)
    assert out.dtype == dtype and torch.equal(out, expected)

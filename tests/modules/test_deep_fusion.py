import itertools

import pytest
import torch

from fusesurgery.modules import (
    DeepFusionModel,
    ProjectedEncoder,
    TanhGate,
    build_decoder,
    build_deep_fusion_model,
    build_projection,
    build_vision_encoder,
    fuse_decoder,
    get_fusion_params,
)


def fused_copy(decoder_cfg, vision_cfg, fusion_cfg, original, dtype=torch.float32):
    """A fused model whose decoder holds `original`'s weights."""
    model = build_deep_fusion_model(decoder_cfg, vision_cfg, fusion_cfg).to(dtype)
    result = model.decoder.load_state_dict(original.state_dict(), strict=False)
    assert all(".fusion_" in k for k in result.missing_keys)
    return model


def inputs(decoder_cfg, vision_cfg, b=2, s=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, decoder_cfg.vocab_size, (b, s), generator=g)
    images = torch.randn(b, 3, vision_cfg.image_size, vision_cfg.image_size, generator=g)
    return tokens, images


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_gates_give_bitwise_identical_logits(decoder_cfg, vision_cfg, fusion_cfg, dtype):
    original = build_decoder(decoder_cfg).to(dtype)
    model = fused_copy(decoder_cfg, vision_cfg, fusion_cfg, original, dtype)
    tokens, images = inputs(decoder_cfg, vision_cfg)
    expected = original(tokens)
    text_only = model(tokens)
    s_e = vision_cfg.seq_len
    encoder_mask = torch.ones(tokens.shape[0], tokens.shape[1], s_e, dtype=torch.bool)
    with_image = model(tokens, encoder_input={"images": images.to(dtype)},
                       encoder_mask=encoder_mask)
    no_mask = model(tokens, encoder_input={"images": images.to(dtype)})
    for out in (text_only, with_image, no_mask):
        assert torch.equal(out, expected)
    # the fusion layers really ran: their output feeds the cross-attention
    assert model.encoder(images.to(dtype)).shape == (2, s_e, decoder_cfg.embed_dim)


def test_nonzero_gates_change_only_rows_that_see_the_image(decoder_cfg, vision_cfg, fusion_cfg):
    original = build_decoder(decoder_cfg)
    model = fused_copy(decoder_cfg, vision_cfg, fusion_cfg, original)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TanhGate):
                module.scale.fill_(0.5)
    tokens, images = inputs(decoder_cfg, vision_cfg)
    # tokens 0..4 come before the image: they attend to nothing
    encoder_mask = torch.zeros(2, tokens.shape[1], vision_cfg.seq_len, dtype=torch.bool)
    encoder_mask[:, 5:, :] = True
    expected = original(tokens)
    out = model(tokens, encoder_input={"images": images}, encoder_mask=encoder_mask)
    assert torch.equal(out[:, :5], expected[:, :5])
    assert not torch.allclose(out[:, 5:], expected[:, 5:])
    assert torch.isfinite(out).all()


def test_new_tokens_use_the_fusion_table(decoder_cfg, vision_cfg, fusion_cfg):
    model = build_deep_fusion_model(decoder_cfg, vision_cfg, fusion_cfg)
    image_token = decoder_cfg.vocab_size  # <|image|> = vocab + 0
    tokens = torch.tensor([[image_token, 1, 2]])
    emb = model.decoder.tok_embeddings
    assert torch.equal(emb(tokens)[0, 0], emb.fusion_embedding.weight[0])
    assert model(tokens).shape == (1, 3, decoder_cfg.vocab_size)


def test_kv_cache_decoding_equals_full_forward(decoder_cfg, vision_cfg, fusion_cfg):
    model = build_deep_fusion_model(decoder_cfg, vision_cfg, fusion_cfg)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TanhGate):
                module.scale.uniform_(-1, 1)
    model.eval()
    tokens, images = inputs(decoder_cfg, vision_cfg, s=10)
    b, s = tokens.shape
    encoder_mask = torch.ones(b, s, vision_cfg.seq_len, dtype=torch.bool)
    encoder_mask[:, :2] = False
    encoder_mask[1, :, -3:] = False
    with torch.no_grad():
        full = model(tokens, encoder_input={"images": images}, encoder_mask=encoder_mask)
        model.setup_caches(b, torch.float32, encoder_max_seq_len=vision_cfg.seq_len,
                           decoder_max_seq_len=32)
        assert model.caches_are_enabled()
        prompt = 4
        steps = [model(tokens[:, :prompt], encoder_input={"images": images},
                       encoder_mask=encoder_mask[:, :prompt],
                       input_pos=torch.arange(prompt).expand(b, prompt))]
        for pos in range(prompt, s):
            steps.append(model(tokens[:, pos:pos + 1], encoder_mask=encoder_mask[:, pos:pos + 1],
                               input_pos=torch.full((b, 1), pos)))
        incremental = torch.cat(steps, dim=1)
        torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)

        model.reset_caches()  # and again with positions derived from the cache
        steps = [model(tokens[:, :prompt], encoder_input={"images": images},
                       encoder_mask=encoder_mask[:, :prompt])]
        steps += [model(tokens[:, p:p + 1], encoder_mask=encoder_mask[:, p:p + 1])
                  for p in range(prompt, s)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_chunked_output(decoder_cfg, vision_cfg, fusion_cfg):
    model = build_deep_fusion_model(decoder_cfg, vision_cfg, fusion_cfg)
    tokens, _ = inputs(decoder_cfg, vision_cfg)
    full = model(tokens)
    model.set_num_output_chunks(3)
    chunks = model(tokens)
    assert len(chunks) == 3 and torch.equal(torch.cat(chunks, dim=1), full)


def test_tied_output_with_fusion_embedding(decoder_cfg, vision_cfg, fusion_cfg):
    cfg = decoder_cfg.replace(tie_word_embeddings=True, attn_bias=True)
    original = build_decoder(cfg)
    assert "output.weight" not in original.state_dict()
    decoder = fuse_decoder(build_decoder(cfg), cfg, fusion_cfg)
    decoder.load_state_dict(original.state_dict(), strict=False)
    tokens, _ = inputs(cfg, vision_cfg)
    assert torch.equal(decoder(tokens), original(tokens))
    assert "layers.0.attn.q_proj.bias" in decoder.state_dict()


@pytest.mark.parametrize(
    "decoder_trainable,encoder_trainable,fusion_trainable",
    list(itertools.product([False, True], repeat=3)),
)
def test_trainable_flags(decoder_cfg, vision_cfg, fusion_cfg, decoder_trainable,
                         encoder_trainable, fusion_trainable):
    decoder = fuse_decoder(build_decoder(decoder_cfg), decoder_cfg, fusion_cfg)
    encoder = ProjectedEncoder(build_vision_encoder(vision_cfg),
                               build_projection("mlp", vision_cfg.embed_dim, decoder_cfg.embed_dim))
    model = DeepFusionModel(decoder, encoder, decoder_trainable=decoder_trainable,
                            encoder_trainable=encoder_trainable,
                            fusion_trainable=fusion_trainable)
    fusion = set(get_fusion_params(model))
    assert "decoder.tok_embeddings.fusion_embedding.weight" in fusion
    assert "encoder.projection.w1.weight" in fusion
    assert "decoder.layers.1.fusion_layer.ca_scale.scale" in fusion
    assert not any(".layer." in n or "vision" in n for n in fusion)
    for name, param in model.named_parameters():
        if name in fusion:
            expected = fusion_trainable
        elif name.startswith("decoder."):
            expected = decoder_trainable
        else:
            expected = encoder_trainable
        assert param.requires_grad is expected, name

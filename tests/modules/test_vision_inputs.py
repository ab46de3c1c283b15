"""The vision encoder at another resolution (its position table resized, as transformers'
``interpolate_pos_encoding``) and several images per sample (``[b, n, c, h, w]``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fusesurgery
from fusesurgery.config import VISION_PRESETS
from fusesurgery.modules import ProjectedEncoder, build_projection, build_vision_encoder
from tests.fusion_inputs import save_encoder

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("kind, size", [("clip", (48, 48)), ("clip", (16, 40)),
                                        ("siglip", (32, 24))])
def test_other_resolutions_match_transformers(tmp_path: Path, kind: str, size):
    import transformers

    path = EXAMPLES / "tiny-clip-vision" if kind == "clip" else save_encoder("siglip", tmp_path)
    hf_class = transformers.CLIPVisionModel if kind == "clip" else transformers.SiglipVisionModel
    hf = hf_class.from_pretrained(path).eval()
    ours = fusesurgery.load_encoder(path)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # CLIP's last hidden state is un-normed, SigLIP's post-normed: as the native towers
        expected = hf(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
        got = ours(images)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_native_resolution_is_untouched():
    encoder = build_vision_encoder(VISION_PRESETS["tiny_clip"])
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        table = encoder.token_pos_embedding.positional_embedding
        assert torch.equal(encoder.token_pos_embedding.resized((4, 4), 1), table)
        assert encoder(images).shape == (1, 17, 48)


def test_bad_image_shapes_are_named():
    encoder = build_vision_encoder(VISION_PRESETS["tiny_clip"])
    with pytest.raises(ValueError, match=r"images must be \[b, 3, h, w\]"):
        encoder(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="smaller than one 8-pixel patch"):
        encoder(torch.randn(1, 3, 4, 32))


def test_several_images_per_sample_are_laid_out_one_after_another():
    torch.manual_seed(0)
    vision = VISION_PRESETS["tiny_clip"]
    encoder = ProjectedEncoder(build_vision_encoder(vision), build_projection("mlp", 48, 64))
    images = torch.randn(2, 3, 3, 32, 32)  # [b, n, c, h, w]
    with torch.no_grad():
        together = encoder(images)
        assert together.shape == (2, 3 * vision.seq_len, 64)
        for i in range(2):
            for j in range(3):
                alone = encoder(images[i, j][None])[0]
                torch.testing.assert_close(
                    together[i, j * vision.seq_len:(j + 1) * vision.seq_len], alone)


def test_an_encoder_mask_of_the_wrong_width_is_named():
    from fusesurgery.config import DECODER_PRESETS, FusionConfig
    from fusesurgery.modules import build_deep_fusion_model

    decoder, vision = DECODER_PRESETS["tiny"], VISION_PRESETS["tiny_clip"]
    fusion = FusionConfig.every(2, decoder.num_layers, encoder_dim=decoder.embed_dim)
    model = build_deep_fusion_model(decoder, vision, fusion)
    tokens = torch.zeros(1, 5, dtype=torch.long)
    images = torch.randn(1, 2, 3, 32, 32)  # two images: 2 * 17 encoder positions
    with torch.no_grad():
        good = torch.ones(1, 5, 2 * vision.seq_len, dtype=torch.bool)
        model(tokens, encoder_input={"images": images}, encoder_mask=good)
        with pytest.raises(ValueError, match=r"encoder_mask is \[1, 5, 17\], the inputs need "
                                             r"\[b, 5, 34\]"):
            model(tokens, encoder_input={"images": images}, encoder_mask=good[..., :17])
    # a cached model also takes a mask as wide as its cross-attention cache
    model.setup_caches(1, torch.float32, encoder_max_seq_len=40, decoder_max_seq_len=8)
    try:
        with torch.no_grad():
            wide = torch.ones(1, 5, 40, dtype=torch.bool)
            model(tokens, encoder_input={"images": images}, encoder_mask=wide)
            model(tokens[:, :1], encoder_mask=wide[:, :1])
            with pytest.raises(ValueError, match=r"the inputs need \[b, 1, 34\]"):
                model(tokens[:, :1], encoder_mask=wide[:, :1, :20])
    finally:
        model.teardown_caches()


# Every tower family, written by transformers: (config class, model class, extra settings).
TOWERS = {
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", {}),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel", {}),  # SigLIP2 fixed resolution too
    "dinov2": ("Dinov2Config", "Dinov2Model", {}),
    "dinov2-registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                         {"num_register_tokens": 2}),
    "dinov3": ("DINOv3ViTConfig", "DINOv3ViTModel", {"num_register_tokens": 2}),
}


@pytest.mark.parametrize("family", sorted(TOWERS))
def test_every_tower_takes_other_resolutions_and_several_images_through_load_fused(
        tmp_path: Path, family: str):
    """Issue 18 section 3: through the fused model, images at a resolution other than the
    tower's 32 x 32 and ``[b, n, c, h, w]`` work (each image's tokens those of the tower run
    on it alone, transformers' at that size), and bad shapes are one ValueError."""
    import transformers

    config_cls, model_cls, settings = TOWERS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        patch_size=8, image_size=32, **settings)
    hf = getattr(transformers, model_cls)(config).eval()
    hf.save_pretrained(tmp_path / family)
    fusesurgery.fuse(tmp_path / family, EXAMPLES / "tiny-llama", tmp_path / "fused", every=2,
                     encoder_tokens="all", encoder_layer=None)
    model = fusesurgery.load_fused(tmp_path / "fused").eval()
    images = torch.randn(2, 3, 3, 40, 24, generator=torch.Generator().manual_seed(1))
    tokens = torch.arange(6).repeat(2, 1)
    with torch.no_grad():
        together = model.encoder(images=images)  # [2, 3 * s_e, d]
        s_e = together.size(1) // 3
        tower = model.encoder.vision(images[0, 1][None])
        kw = {"interpolate_pos_encoding": True} if family in ("clip", "siglip") else {}
        expected = hf(pixel_values=images[0, 1][None], **kw).last_hidden_state
        torch.testing.assert_close(tower, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together[0, s_e:2 * s_e],
                                   model.encoder(images=images[0, 1][None])[0])
        mask = torch.ones(2, 6, 3 * s_e, dtype=torch.bool)
        mask[:, :2] = False  # text before the images
        logits = model(tokens, encoder_input={"images": images}, encoder_mask=mask)
        assert logits.shape == (2, 6, 512) and bool(torch.isfinite(logits).all())  # untied
        for bad, message in [
            (dict(encoder_input={"images": images}, encoder_mask=mask[..., :s_e]),
             r"encoder_mask is \[2, 6, \d+\], the inputs need \[b, 6, \d+\]"),
            (dict(encoder_input={"images": images[:, :, :2]}, encoder_mask=mask),
             r"images must be \[b, 3, h, w\]"),
            (dict(encoder_input={"images": images[..., :4, :4]}, encoder_mask=mask),
             "smaller than one 8-pixel patch"),
        ]:
            with pytest.raises(ValueError, match=message):
                model(tokens, **bad)

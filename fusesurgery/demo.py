"""A self-contained demonstration: fuse a tiny random ViT into a tiny random Llama-style
decoder and show that the fused model still computes exactly what the decoder computed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fusesurgery._arguments import SEED_LIMIT, check_int
from fusesurgery.config import DECODER_PRESETS, VISION_PRESETS, FusionConfig
from fusesurgery.modules import build_decoder, build_deep_fusion_model, fusion_summary
from fusesurgery.modules.summary import FusionSummary


@dataclass(frozen=True)
class DemoResult:
    """Attributes:
        summary: the fused model's fusion summary.
        text_only_equal: logits without an image are bitwise equal to the decoder's.
        with_image_equal: logits with an image (all gates 0) are bitwise equal too.
        gated_max_abs_diff: the largest logit change once every gate is opened to 0.5.
    """

    summary: FusionSummary
    text_only_equal: bool
    with_image_equal: bool
    gated_max_abs_diff: float


def run_demo(seed: int = 0, fusion_interval: int = 2) -> DemoResult:
    """Build, fuse and compare; everything in memory, a second or so on a CPU.

    Raises:
        ConfigError: a seed outside ``[0, 2**63)``, or an interval that is not positive or
            larger than the decoder's layers.
    """
    check_int("seed", seed, 0, SEED_LIMIT)
    torch.manual_seed(seed)
    decoder_cfg, vision_cfg = DECODER_PRESETS["tiny"], VISION_PRESETS["tiny_clip"]
    fusion = FusionConfig.every(fusion_interval, decoder_cfg.num_layers,
                                encoder_dim=decoder_cfg.embed_dim, fusion_vocab_size=1)
    original = build_decoder(decoder_cfg).eval()
    model = build_deep_fusion_model(decoder_cfg, vision_cfg, fusion, projection="mlp").eval()
    model.decoder.load_state_dict(original.state_dict(), strict=False)

    tokens = torch.randint(0, decoder_cfg.vocab_size, (2, 16))
    images = {"images": torch.randn(2, vision_cfg.num_channels, vision_cfg.image_size,
                                    vision_cfg.image_size)}
    with torch.no_grad():
        expected = original(tokens)
        text_only = torch.equal(model(tokens), expected)
        with_image = torch.equal(model(tokens, encoder_input=images), expected)
        summary = fusion_summary(model)
        for name, param in model.named_parameters():
            if name.endswith("_scale.scale"):
                param.fill_(0.5)
        gated = (model(tokens, encoder_input=images) - expected).abs().max().item()
    return DemoResult(summary, text_only, with_image, gated)

import pytest
import torch

from fusesurgery.config import DecoderConfig, FusionConfig, RopeScaling, VisionEncoderConfig


@pytest.fixture
def decoder_cfg() -> DecoderConfig:
    return DecoderConfig(
        vocab_size=96, embed_dim=32, num_layers=4, num_heads=4, num_kv_heads=2,
        intermediate_dim=64, max_seq_len=64, rope_base=500_000.0,
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16),
    )


@pytest.fixture
def vision_cfg() -> VisionEncoderConfig:
    return VisionEncoderConfig(
        image_size=16, patch_size=4, embed_dim=24, num_layers=2, num_heads=2,
        intermediate_dim=48,
    )


@pytest.fixture
def fusion_cfg(decoder_cfg) -> FusionConfig:
    # every 2nd layer, as in the issue: layers 1 and 3
    return FusionConfig.every(2, decoder_cfg.num_layers, encoder_dim=decoder_cfg.embed_dim,
                              fusion_vocab_size=4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

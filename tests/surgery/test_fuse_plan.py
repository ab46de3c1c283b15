"""fuse plans from metadata alone: an 8B-shaped Llama and a ViT-L/336 tower, no tensor data."""

import pytest
import torch

from fusesurgery.config import DECODER_PRESETS, VISION_PRESETS
from fusesurgery.convert import detect_model, plan_conversion
from fusesurgery.convert.configs import hf_config_dict
from fusesurgery.convert.plan import layout_tensor_infos
from fusesurgery.errors import ConfigError
from fusesurgery.surgery.fuse_plan import (
    DEFAULT,
    FuseOptions,
    check_fuse_inputs,
    native_key_of,
    plan_fuse,
    resolve_fusion_layers,
)

FUSION_LAYER_TEMPLATES = {  # SPEC.md section 3, written out
    "ca_norm.scale", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
    "attn.output_proj.weight", "attn.q_norm.scale", "attn.k_norm.scale", "ca_scale.scale",
    "mlp_norm.scale", "mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight", "mlp_scale.scale",
}


def _detected(config, kind):
    infos = layout_tensor_infos(config, "hf", kind=kind, dtype=torch.bfloat16)
    detected = detect_model(infos, hf_config_dict(config), "config.json")
    return detected, plan_conversion(infos, "hf", detected.config, kind=kind)


def _plan(decoder="llama3_1_8b", vision="clip_vit_l_14_336", **options):
    dec, dec_plan = _detected(DECODER_PRESETS[decoder], "decoder")
    enc, enc_plan = _detected(VISION_PRESETS[vision], "vision")
    return plan_fuse(dec, dec_plan, enc, enc_plan, FuseOptions(**options))


def test_8b_plan_defaults_follow_llama_3_2_vision():
    plan = _plan()
    config = plan.config
    assert config.fusion.fusion_layers == (3, 7, 11, 15, 19, 23, 27, 31)
    assert config.fusion.fusion_first
    assert [(t.token, t.id) for t in config.new_tokens] == [("<|image|>", 128256)]
    assert config.encoder.output_layer == -2  # CLIP: penultimate layer, as LLaVA
    assert config.projection == "mlp"
    # the decoder's epsilon for the fusion norms, as Meta's and transformers' Mllama
    assert config.fusion.ca_norm_eps == config.fusion.qk_norm_eps == config.decoder.norm_eps
    names = {t.name for t in plan.new_tensors}
    expected = {f"decoder.layers.{i}.fusion_layer.{t}" for i in config.fusion.fusion_layers
                for t in FUSION_LAYER_TEMPLATES}
    expected |= {"decoder.tok_embeddings.fusion_embedding.weight",
                 "encoder.projection.w1.weight", "encoder.projection.w1.bias",
                 "encoder.projection.w2.weight", "encoder.projection.w2.bias"}
    assert names == expected
    shapes = {t.name: t.shape for t in plan.new_tensors}
    assert shapes["decoder.layers.3.fusion_layer.attn.k_proj.weight"] == (1024, 4096)
    assert shapes["decoder.tok_embeddings.fusion_embedding.weight"] == (1, 4096)
    assert shapes["encoder.projection.w1.weight"] == (4096, 1024)  # encoder width -> decoder
    assert all(t.dtype == torch.bfloat16 for t in plan.new_tensors)
    gates = [t for t in plan.new_tensors if t.name.endswith(("ca_scale.scale", "mlp_scale.scale"))]
    assert len(gates) == 16 and all(t.init == ("zeros",) for t in gates)
    assert set(config.gates) == {t.name for t in gates}
    # every new tensor is the fusion's: none maps back to an original key
    assert all(native_key_of(t.name) is None for t in plan.new_tensors)
    # the largest new tensor is one fusion MLP matrix: what bounds fuse's memory
    assert plan.largest_new_tensor == 14336 * 4096 * 2
    assert plan.copied_bytes == plan.decoder_plan.total_bytes + plan.encoder_plan.total_bytes
    per_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096 + 2 * 4096 + 2 * 128 + 2
    head = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert plan.new_bytes == 2 * (8 * per_layer + 4096 + head)


def test_siglip_default_layer_and_options():
    plan = _plan(decoder="qwen2_0_5b", vision="siglip_so400m_384", fusion_layers=[0, 23],
                 new_tokens=("<image>", "<video>"), projection="linear", fusion_first=False,
                 encoder_layer=DEFAULT)
    config = plan.config
    assert config.encoder.output_layer is None  # SigLIP: final, post-normed hidden states
    assert config.fusion.fusion_layers == (0, 23) and not config.fusion.fusion_first
    assert [t.id for t in config.new_tokens] == [151936, 151937]  # rows, not tokenizer length
    assert config.decoder.tie_word_embeddings
    assert {t.name for t in plan.new_tensors if t.name.startswith("encoder.")} == {
        "encoder.projection.output.weight", "encoder.projection.output.bias"}


@pytest.mark.parametrize("options, message", [
    (dict(every=33), "larger than the decoder's 32 layers"),
    (dict(every=0), "must be positive"),
    (dict(fusion_layers=[32]), "fusion layer 32 is out of range for a 32-layer decoder"),
    (dict(fusion_layers=[-1]), "out of range"),
    (dict(fusion_layers=[3, 3]), "repeat"),
    (dict(fusion_layers=[]), "no fusion layers"),
    (dict(new_tokens=("<a>", "<a>")), "repeat"),
    (dict(new_tokens=("",)), "non-empty"),
    (dict(projection="conv"), "unknown projection"),
    (dict(embedding_init="xavier"), "unknown embedding init"),
    (dict(encoder_layer=30), "outside"),
])
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        _plan(**options)


def test_class_token_features_need_a_class_token():
    with pytest.raises(ConfigError, match="siglip tower has no class token"):
        _plan(vision="siglip_so400m_384", encoder_tokens="cls_and_patches")
    for tokens in ("all", "patches"):  # the same tokens, asked for as they are
        assert _plan(vision="siglip_so400m_384",
                     encoder_tokens=tokens).config.encoder.feature_tokens == tokens
    assert _plan(encoder_tokens="cls_and_patches").config.encoder.feature_tokens == (
        "cls_and_patches")  # CLIP has one


def test_every_must_fuse_something():
    assert resolve_fusion_layers(FuseOptions(every=4), 4) == (3,)
    with pytest.raises(ConfigError, match="no layer would get a fusion layer"):
        resolve_fusion_layers(FuseOptions(every=9), 4)


def test_swapped_and_fused_inputs():
    with pytest.raises(ConfigError, match="swapped"):
        check_fuse_inputs("vision", "decoder")
    with pytest.raises(ConfigError, match="already a fused"):
        check_fuse_inputs("fused", "vision")
    with pytest.raises(ConfigError, match="ENCODER holds a decoder"):
        check_fuse_inputs("decoder", "decoder")

from __future__ import annotations

import pytest
import torch

from fusesurgery.config import DECODER_PRESETS, VISION_PRESETS, DecoderConfig
from fusesurgery.convert.keymaps import from_native_key
from fusesurgery.convert.plan import (
    TIED_OUTPUT_REASON,
    apply_plan,
    apply_plan_entry,
    expected_native_shapes,
    layout_rope_style,
    layout_tensor_infos,
    plan_conversion,
)
from fusesurgery.errors import ConfigError, KeyMapError, ShapeError
from fusesurgery.io.tensor_info import TensorInfo

from .conftest import meta_state_dict, tensors_infos

LLAMA_405B = DECODER_PRESETS["llama3_1_405b"]


def run(plan, tensors):
    return dict(apply_plan(plan, tensors.__getitem__))


def test_layout_tensor_infos_spells_every_key_of_the_config():
    tiny = DECODER_PRESETS["tiny"]
    native = expected_native_shapes(tiny)
    hf = layout_tensor_infos(tiny, "hf", dtype=torch.float32)
    assert len(hf) == len(native) and all(info.name == key for key, info in hf.items())
    down = "model.layers.1.mlp.down_proj.weight"
    assert hf[down] == TensorInfo(down, native["layers.1.mlp.w2.weight"], torch.float32)
    assert list(layout_tensor_infos(tiny, kind="fused")) == ["decoder." + key for key in native]
    assert list(layout_tensor_infos(tiny, prefix="x.")) == ["x." + key for key in native]
    clip = VISION_PRESETS["tiny_clip"]
    assert list(layout_tensor_infos(clip)) == list(expected_native_shapes(clip))
    with pytest.raises(ConfigError, match="cannot describe a vision"):
        layout_tensor_infos(tiny, kind="vision")
    with pytest.raises(KeyMapError, match="no name in the meta layout"):
        layout_tensor_infos(DECODER_PRESETS["qwen2_0_5b"], "meta")


def test_405b_plan_from_metadata_alone():
    infos = layout_tensor_infos(LLAMA_405B, "hf")
    # Spot-check the metadata against Llama 3.1 405B's published shapes.
    assert infos["model.layers.125.self_attn.k_proj.weight"].shape == (1024, 16384)
    assert infos["model.layers.0.mlp.gate_proj.weight"].shape == (53248, 16384)
    assert infos["lm_head.weight"].shape == (128256, 16384)

    plan = plan_conversion(infos, "hf", LLAMA_405B)  # from metadata alone

    assert len(plan) == 126 * 9 + 3 == 1137
    assert plan.dropped == ()
    assert set(plan.target_keys) == set(expected_native_shapes(LLAMA_405B))
    q = plan.entry("layers.125.attn.q_proj.weight")
    assert q.source_key == "model.layers.125.self_attn.q_proj.weight"
    assert q.transform == ("permute_qk_to_native", 128, 128)
    assert q.shape == q.source_shape == (16384, 16384) and q.dtype == torch.bfloat16
    assert plan.entry("layers.0.attn.k_proj.weight").transform == ("permute_qk_to_native", 8, 128)
    assert plan.entry("layers.0.attn.v_proj.weight").transform == ("identity",)
    assert plan.entry("output.weight").source_key == "lm_head.weight"
    # ~405.8e9 parameters at 2 bytes each.
    assert plan.total_bytes == 2 * sum(info.numel for info in infos.values())
    assert 405e9 < plan.total_bytes / 2 < 406e9
    assert plan.target_infos()["norm.scale"] == TensorInfo("norm.scale", (16384,), torch.bfloat16)


def test_405b_meta_plans_to_native_without_transforms_and_to_hf_with_them():
    infos = layout_tensor_infos(LLAMA_405B, "meta")
    to_native = plan_conversion(infos, "meta", LLAMA_405B)
    assert {entry.transform for entry in to_native.entries} == {("identity",)}
    to_hf = plan_conversion(infos, "meta", LLAMA_405B, target_layout="hf", dtype=torch.float16)
    wk = to_hf.entry("model.layers.7.self_attn.k_proj.weight")
    assert wk.source_key == "layers.7.attention.wk.weight"
    assert wk.transform == ("permute_qk_from_native", 8, 128)
    assert wk.dtype == torch.float16 and wk.source_dtype == torch.bfloat16
    assert to_hf.total_bytes == to_native.total_bytes


def _hf_config(saved, family, tied=False, bias=False):
    c = saved.config
    return DecoderConfig(
        vocab_size=c["vocab_size"], embed_dim=c["hidden_size"],
        num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        num_kv_heads=c["num_key_value_heads"], intermediate_dim=c["intermediate_size"],
        tie_word_embeddings=tied, attn_bias=bias, family=family,
    )


@pytest.mark.parametrize(
    ("fixture", "family", "tied", "bias"),
    [("hf_llama", "llama", False, False), ("hf_mistral", "mistral", False, False),
     ("hf_qwen2", "qwen2", True, True)],
)
def test_hf_to_native_to_hf_is_bitwise(fixture, family, tied, bias, request):
    saved = request.getfixturevalue(fixture)
    config = _hf_config(saved, family, tied, bias)
    source = saved.tensors()

    to_native = plan_conversion(saved.infos, "hf", config)
    native = run(to_native, source)
    assert ("output.weight" in native) == (not tied)
    q_key = "layers.1.attn.q_proj.weight"
    # Llama and Mistral are permuted into interleaved order; Qwen2's native layout keeps
    # Hugging Face's rotate-half rows (torchtune's Qwen2 convention), so it only renames.
    permuted = family != "qwen2"
    assert torch.equal(native[q_key], source["model.layers.1.self_attn.q_proj.weight"]) != permuted
    expected_k = ("permute_qk_to_native", 2, 8) if permuted else ("identity",)
    assert to_native.entry("layers.1.attn.k_proj.weight").transform == expected_k
    if bias:
        assert to_native.entry("layers.1.attn.k_proj.bias").transform == expected_k
    if not permuted:
        assert {entry.transform for entry in to_native.entries} == {("identity",)}

    back_plan = plan_conversion(tensors_infos(native), "native", config, target_layout="hf")
    back = run(back_plan, native)
    assert back.keys() == source.keys()
    for key, tensor in source.items():
        assert torch.equal(back[key], tensor), key


QWEN2_NO_BIAS = DECODER_PRESETS["qwen2_0_5b"].replace(attn_bias=False)


@pytest.mark.parametrize(
    ("config", "source", "target", "expected"),
    [
        (LLAMA_405B, "hf", "native", "permute_qk_to_native"),
        (LLAMA_405B, "native", "hf", "permute_qk_from_native"),
        (LLAMA_405B, "meta", "native", "identity"),
        (LLAMA_405B, "native", "meta", "identity"),
        (LLAMA_405B, "hf", "meta", "permute_qk_to_native"),
        (LLAMA_405B, "native", "native", "identity"),
        (DECODER_PRESETS["mistral_7b"], "hf", "native", "permute_qk_to_native"),
        (DECODER_PRESETS["qwen2_0_5b"], "hf", "native", "identity"),
        (DECODER_PRESETS["qwen2_0_5b"], "native", "hf", "identity"),
        # A bias-free Qwen2-family config has Meta names; Meta is interleaved, native Qwen2 not.
        (QWEN2_NO_BIAS, "meta", "native", "permute_qk_from_native"),
        (QWEN2_NO_BIAS, "native", "meta", "permute_qk_to_native"),
        (QWEN2_NO_BIAS, "hf", "meta", "permute_qk_to_native"),
    ],
)
def test_qk_rows_are_permuted_only_between_different_rope_pairings(config, source, target,
                                                                   expected):
    infos = layout_tensor_infos(config, source)
    plan = plan_conversion(infos, source, config, target_layout=target)
    q, k, v = (plan.entry(from_native_key(f"layers.0.attn.{name}_proj.weight", target))
               for name in "qkv")
    assert q.transform[0] == k.transform[0] == expected
    if expected != "identity":
        assert q.transform[1:] == (config.num_heads, config.head_dim)
        assert k.transform[1:] == (config.num_kv_heads, config.head_dim)
    assert v.transform == ("identity",)
    assert layout_rope_style("native", config) == config.rope_style
    assert (layout_rope_style("hf", config), layout_rope_style("meta", config)) == (
        "half", "interleaved")


def test_meta_to_native_to_meta_is_bitwise():
    source = meta_state_dict()
    config = DecoderConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, intermediate_dim=96)
    native = run(plan_conversion(tensors_infos(source), "meta", config), source)
    assert native["layers.1.attn.q_proj.weight"] is source["layers.1.attention.wq.weight"]
    back = run(plan_conversion(tensors_infos(native), "native", config, target_layout="meta"),
               native)
    assert back.keys() == source.keys()
    assert all(torch.equal(back[key], source[key]) for key in source)
    assert all(back[key].dtype == torch.bfloat16 for key in back)


def test_meta_through_hf_and_back_is_bitwise():
    source = meta_state_dict(dtype=torch.float32)
    config = DecoderConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, intermediate_dim=96)
    hf = run(plan_conversion(tensors_infos(source), "meta", config, target_layout="hf"), source)
    assert "model.layers.0.self_attn.q_proj.weight" in hf
    back = run(plan_conversion(tensors_infos(hf), "hf", config, target_layout="meta"), hf)
    assert back.keys() == source.keys()
    assert all(torch.equal(back[key], source[key]) for key in source)


def test_rope_freqs_is_reported_as_dropped():
    source = meta_state_dict()
    source["rope.freqs"] = torch.zeros(4)
    config = DecoderConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, intermediate_dim=96)
    plan = plan_conversion(tensors_infos(source), "meta", config)
    assert plan.dropped == (("rope.freqs", "RoPE frequency buffer, recomputed"),)
    assert "rope.freqs" not in {entry.source_key for entry in plan.entries}


def test_a_stored_output_of_a_tied_model_is_dropped(hf_llama):
    config = _hf_config(hf_llama, "llama", tied=True)
    plan = plan_conversion(hf_llama.infos, "hf", config)
    assert dict(plan.dropped) == {"lm_head.weight": TIED_OUTPUT_REASON}
    assert "output.weight" not in plan.target_keys


def test_shapes_that_disagree_with_the_config_name_the_key(hf_llama):
    config = _hf_config(hf_llama, "llama").replace(num_kv_heads=4)
    with pytest.raises(ConfigError) as error:
        plan_conversion(hf_llama.infos, "hf", config)
    assert str(error.value) == (
        "checkpoint disagrees with the config: model.layers.0.self_attn.k_proj.weight has "
        "shape [16, 32], expected [32, 32] (and 3 more mismatches)"
    )


def test_missing_and_extra_layers_are_config_errors(hf_llama):
    config = _hf_config(hf_llama, "llama")
    with pytest.raises(ConfigError, match="lacks 9 keys .*model.layers.2.input_layernorm"):
        plan_conversion(hf_llama.infos, "hf", config.replace(num_layers=3))
    with pytest.raises(ConfigError, match="9 keys that the config does not account for"):
        plan_conversion(hf_llama.infos, "hf", config.replace(num_layers=1))
    with pytest.raises(ConfigError, match="lacks 6 keys .*q_proj.bias"):
        plan_conversion(hf_llama.infos, "hf", config.replace(attn_bias=True))


def test_keys_without_a_target_name_fail_the_plan(hf_qwen2):
    config = _hf_config(hf_qwen2, "qwen2", tied=True, bias=True)
    with pytest.raises(KeyMapError, match="no name in the meta layout"):
        plan_conversion(hf_qwen2.infos, "hf", config, target_layout="meta")


def test_apply_checks_the_tensor_against_the_plan():
    source = meta_state_dict()
    config = DecoderConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, intermediate_dim=96)
    plan = plan_conversion(tensors_infos(source), "meta", config, target_layout="hf",
                           dtype=torch.float32)
    entry = plan.entry("model.layers.0.self_attn.q_proj.weight")
    out = apply_plan_entry(entry, source["layers.0.attention.wq.weight"])
    assert out.dtype == torch.float32 and out.shape == (32, 32)
    with pytest.raises(ShapeError, match=r"layers.0.attention.wq.weight: planned for \[32, 32\]"):
        apply_plan_entry(entry, torch.zeros(32, 16, dtype=torch.bfloat16))
    with pytest.raises(ShapeError, match="got \\[32, 32\\] torch.float32"):
        apply_plan_entry(entry, torch.zeros(32, 32))


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_vision_plans_drop_the_rest_and_round_trip(name, hf_vision_models):
    import transformers

    saved = hf_vision_models[name]
    tower = getattr(transformers, saved.config["architectures"][0]).config_class(
        **saved.config
    ).vision_config
    base = VISION_PRESETS["tiny_clip"] if name == "clip" else VISION_PRESETS["siglip_so400m_384"]
    config = base.replace(
        image_size=tower.image_size, patch_size=tower.patch_size, embed_dim=tower.hidden_size,
        num_layers=tower.num_hidden_layers, num_heads=tower.num_attention_heads,
        intermediate_dim=tower.intermediate_size,
    )
    source = saved.tensors()
    plan = plan_conversion(saved.infos, "hf", config)
    assert plan.kind == "vision"
    assert any(key.startswith("text_model.") for key, _ in plan.dropped)
    native = run(plan, source)
    assert set(native) == set(expected_native_shapes(config))
    back = run(plan_conversion(tensors_infos(native), "native", config, target_layout="hf"),
               native)
    vision_keys = {key for key in source if key.startswith("vision_model.")
                   and not key.startswith("vision_model.head.")}
    assert back.keys() == vision_keys
    assert all(torch.equal(back[key], source[key]) for key in vision_keys)


def test_fused_plans_are_identity_and_check_the_decoder():
    decoder = DECODER_PRESETS["tiny"]
    infos = layout_tensor_infos(decoder, kind="fused", dtype=torch.float32)
    extra = {
        "decoder.tok_embeddings.fusion_embedding.weight": (8, 64),
        "decoder.layers.3.fusion_layer.attn.q_proj.weight": (64, 64),
        "encoder.projection.output.weight": (64, 48),
    }
    infos.update({k: TensorInfo(k, s, torch.float32) for k, s in extra.items()})
    plan = plan_conversion(infos, "native", decoder, kind="fused")
    assert {(e.source_key, e.transform) for e in plan.entries} == {
        (key, ("identity",)) for key in infos
    }
    wrong_width = r"decoder.tok_embeddings.weight has shape \[256, 64\], expected \[256, 32\]"
    with pytest.raises(ConfigError, match=wrong_width):
        plan_conversion(infos, "native", decoder.replace(embed_dim=32, head_dim=16), kind="fused")
    with pytest.raises(ConfigError, match="cannot describe a fused"):
        plan_conversion(infos, "native", VISION_PRESETS["tiny_clip"], kind="fused")


def test_library_casts_refuse_fp8_but_fp8_is_read(tmp_path):
    """A plain cast to fp8 (no scales) is refused by the library too, not only the CLI."""
    from pathlib import Path

    import fusesurgery
    from fusesurgery.errors import ConfigError

    examples = Path(__file__).resolve().parents[2] / "examples"
    with pytest.raises(ConfigError, match="cannot cast weights to torch.float8_e4m3fn"):
        fusesurgery.fuse(examples / "tiny-clip-vision", examples / "tiny-llama",
                         tmp_path / "out", dtype="f8_e4m3", every=2)
    assert not (tmp_path / "out").exists()

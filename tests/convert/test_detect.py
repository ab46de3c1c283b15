from __future__ import annotations

import dataclasses

import pytest
import torch

from fusesurgery.config import DECODER_PRESETS, VISION_PRESETS, RopeScaling, VisionEncoderConfig
from fusesurgery.convert.configs import (
    config_style,
    hf_config_dict,
    meta_intermediate_dim,
    read_hf_decoder_config,
    read_meta_decoder_config,
)
from fusesurgery.convert.detect import DECODER_FLAGS, VISION_FLAGS, detect_layout, detect_model
from fusesurgery.convert.plan import layout_tensor_infos
from fusesurgery.errors import ConfigError, KeyMapError, UnrecognizedFormatError
from fusesurgery.io.tensor_info import TensorInfo

from .conftest import LLAMA3_SCALING

LLAMA_405B = DECODER_PRESETS["llama3_1_405b"]
LLAMA3_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)


# ----------------------------------------------------------------------------- HF decoders


def test_transformers_5_llama_config_json(hf_llama):
    # What transformers 5 writes: rope settings live in rope_parameters, head_dim is stated.
    assert "rope_scaling" not in hf_llama.config
    assert hf_llama.config["rope_parameters"]["rope_theta"] == 500_000.0

    detected = detect_model(hf_llama.infos, hf_llama.config, "config.json")
    assert (detected.kind, detected.layout, detected.family) == ("decoder", "hf", "llama")
    config = detected.config
    assert (config.vocab_size, config.embed_dim, config.num_layers) == (64, 32, 2)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 8)
    assert config.intermediate_dim == 64 and config.max_seq_len == 16_384
    assert config.rope_base == 500_000.0 and config.rope_scaling == LLAMA3_ROPE
    assert config.norm_eps == 1e-5 and not config.tie_word_embeddings and not config.attn_bias
    assert set(detected.provenance) == {f.name for f in dataclasses.fields(config)}
    assert set(detected.fields_from("read")) == set(detected.provenance)
    assert detected.config_source == "config.json"
    assert "rope_scaling = RopeScaling(factor=8.0" in detected.summary()


def test_mistral_sliding_window_is_read_into_the_config(hf_mistral):
    detected = detect_model(hf_mistral.infos, hf_mistral.config, "config.json")
    assert detected.family == "mistral"
    config = detected.config
    assert config.max_seq_len == 131_072 and config.rope_scaling is None
    # MistralConfig's window (4096) on every layer, modelled: nothing to note
    assert config.sliding_window == 4096 and config.sliding_layers == (0, 1)
    assert detected.provenance["sliding_layers"] == "read"
    assert detected.notes == detected.differences == ()


def test_qwen2_biases_and_tied_embeddings(hf_qwen2):
    detected = detect_model(hf_qwen2.infos, hf_qwen2.config, "config.json")
    config = detected.config
    assert detected.family == "qwen2" and config.attn_bias and config.tie_word_embeddings
    # Qwen2's config.json states no attention_bias: the bias keys tell.
    assert detected.provenance["attn_bias"] == "inferred"
    assert detected.provenance["tie_word_embeddings"] == "read"
    # transformers 5 writes no head_dim for Qwen2: the q shape and the head count give it.
    assert detected.provenance["head_dim"] == "inferred" and config.head_dim == 8
    assert detected.notes == ()


def _v4_llama31_405b_config(**changes):
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
        "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": dict(LLAMA3_SCALING), "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
    }
    config.update(changes)
    return config


def test_transformers_4_config_on_405b_metadata():
    detected = detect_model(layout_tensor_infos(LLAMA_405B, "hf"), _v4_llama31_405b_config(),
                            "config.json")
    assert detected.config == LLAMA_405B
    assert detected.provenance["head_dim"] == "inferred"
    assert detected.provenance["rope_scaling"] == "read"


def test_transformers_4_older_type_spelling():
    rope = {k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"} | {"type": "llama3"}
    config = _v4_llama31_405b_config(rope_scaling=rope)
    assert read_hf_decoder_config(config).read["rope_scaling"] == LLAMA3_ROPE


def test_transformers_5_rope_parameters_by_hand():
    config = _v4_llama31_405b_config(rope_scaling=None)
    del config["rope_theta"], config["rope_scaling"]
    config["rope_parameters"] = dict(LLAMA3_SCALING, rope_theta=500000.0)
    reading = read_hf_decoder_config(config)
    assert reading.read["rope_base"] == 500_000.0 and reading.read["rope_scaling"] == LLAMA3_ROPE
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    reading = read_hf_decoder_config(config)
    assert reading.read["rope_base"] == 1e6 and reading.read["rope_scaling"] is None


def test_llama2_config_without_rope_settings_takes_transformers_defaults():
    config = _v4_llama31_405b_config()
    del config["rope_theta"], config["rope_scaling"], config["rms_norm_eps"]
    detected = detect_model(layout_tensor_infos(LLAMA_405B, "hf"), config, "config.json")
    assert detected.config.rope_base == 10_000.0 and detected.config.rope_scaling is None
    assert detected.config.norm_eps == 1e-6
    assert {detected.provenance[f] for f in ("rope_base", "rope_scaling", "norm_eps")} == {
        "default"
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not a supported decoder"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"mlp_bias": True}, "mlp_bias true is not supported"),
        ({"attention_bias": True}, "attention_bias true .* is not supported"),
        ({"rope_scaling": {"rope_type": "mrope", "factor": 4.0}},
         "rope_type 'mrope' is not supported; supported: default, linear, dynamic, yarn, "
         "longrope, llama3$"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor"),
        ({"rms_norm_eps": None}, "rms_norm_eps is null: transformers cannot run a model"),
    ],
)
def test_unsupported_hf_settings(change, message):
    with pytest.raises(ConfigError, match=message):
        read_hf_decoder_config(_v4_llama31_405b_config(**change))


def test_config_disagreeing_with_shapes_names_key_and_shapes():
    config = _v4_llama31_405b_config(num_key_value_heads=16)
    with pytest.raises(ConfigError) as error:
        detect_model(layout_tensor_infos(LLAMA_405B, "hf"), config, "config.json")
    assert str(error.value).startswith(
        "checkpoint disagrees with config.json: model.layers.0.self_attn.k_proj.weight has shape "
        "[1024, 16384], expected [2048, 16384]"
    )


def test_config_with_more_layers_than_the_checkpoint():
    with pytest.raises(ConfigError, match="config.json gives num_layers 127, but the "
                                          "checkpoint holds 126"):
        detect_model(layout_tensor_infos(LLAMA_405B, "hf"),
                     _v4_llama31_405b_config(num_hidden_layers=127), "config.json")


def test_tied_config_with_a_stored_lm_head_notes_the_drop(hf_llama):
    config = dict(hf_llama.config, tie_word_embeddings=True)
    detected = detect_model(hf_llama.infos, config, "config.json")
    assert detected.config.tie_word_embeddings
    assert detected.notes == (
        "lm_head.weight is present although the embeddings are tied; it is dropped",
    )


def test_untied_config_without_lm_head_is_an_error(hf_qwen2):
    with pytest.raises(ConfigError, match="no lm_head.weight and the embeddings are not tied"):
        detect_model(hf_qwen2.infos, dict(hf_qwen2.config, tie_word_embeddings=False),
                     "config.json")


# ----------------------------------------------------------------------------- Meta


PARAMS_405B = {
    "dim": 16384, "ffn_dim_multiplier": 1.2, "multiple_of": 4096, "n_heads": 128,
    "n_kv_heads": 8, "n_layers": 126, "norm_eps": 1e-05, "rope_theta": 500000.0,
    "use_scaled_rope": True, "vocab_size": 128256,
}


@pytest.mark.parametrize(
    ("dim", "multiple_of", "multiplier", "expected"),
    [(16384, 4096, 1.2, 53248), (4096, 1024, 1.3, 14336), (8192, 4096, 1.3, 28672),
     (4096, 256, None, 11008), (2048, 256, 1.5, 8192)],
)
def test_meta_intermediate_formula(dim, multiple_of, multiplier, expected):
    # Llama 3.1 405B, 3.1 8B, 3.1 70B, Llama 2 7B, Llama 3.2 1B.
    assert meta_intermediate_dim(dim, multiple_of, multiplier) == expected


def test_meta_params_on_405b_metadata():
    params = dict(PARAMS_405B, vocab_size=-1)
    detected = detect_model(layout_tensor_infos(LLAMA_405B, "meta"), params, "params.json")
    assert (detected.kind, detected.layout, detected.family) == ("decoder", "meta", "llama")
    assert detected.config == LLAMA_405B.replace(max_seq_len=4096)
    provenance = detected.provenance
    assert provenance["vocab_size"] == "inferred"
    assert provenance["intermediate_dim"] == "read"
    assert provenance["rope_scaling"] == "read" and provenance["max_seq_len"] == "default"
    assert provenance["tie_word_embeddings"] == "inferred"
    assert any("vocab_size -1" in note for note in detected.notes)
    assert any("factor 8 assumed" in note for note in detected.notes)


def test_meta_formula_is_cross_checked_against_w1():
    params = dict(PARAMS_405B, ffn_dim_multiplier=1.3)
    with pytest.raises(ConfigError) as error:
        detect_model(layout_tensor_infos(LLAMA_405B, "meta"), params, "params.json")
    assert str(error.value).startswith(
        "checkpoint disagrees with params.json: layers.0.feed_forward.w1.weight has shape "
        "[53248, 16384], expected [57344, 16384]"
    )


def test_meta_rope_scaling_factor_and_llama2_defaults():
    reading = read_meta_decoder_config(dict(PARAMS_405B, rope_scaling_factor=32))
    assert reading.read["rope_scaling"] == RopeScaling(factor=32.0)
    llama2 = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06,
              "vocab_size": -1}
    reading = read_meta_decoder_config(llama2)
    assert "rope_base" not in reading.read and reading.defaults["rope_base"] == 10_000.0
    assert reading.read["intermediate_dim"] == 11008


def test_mistral_params_json():
    mistral = DECODER_PRESETS["mistral_7b"]
    params = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
              "n_kv_heads": 8, "norm_eps": 1e-05, "sliding_window": 4096, "vocab_size": 32000,
              "rope_theta": 1000000.0}
    detected = detect_model(layout_tensor_infos(mistral, "meta"), params, "params.json")
    assert detected.family == "mistral"
    # Mistral's reference code applies its window to every layer: modelled so
    assert detected.config == mistral.replace(max_seq_len=4096, norm_eps=1e-5,
                                              sliding_window=4096,
                                              sliding_layers=tuple(range(32)))
    assert detected.differences == () and detected.notes == ()


# ----------------------------------------------------------------------------- no config


def test_head_count_without_a_config_names_the_flag():
    with pytest.raises(ConfigError) as error:
        detect_model(layout_tensor_infos(LLAMA_405B, "native"))
    assert error.value.flag == "--num-heads" == DECODER_FLAGS["num_heads"]
    assert str(error.value).endswith("(pass --num-heads)")


def test_overrides_complete_a_bare_native_checkpoint():
    tiny = DECODER_PRESETS["tiny"]
    detected = detect_model(layout_tensor_infos(tiny, "native"), overrides={
        "num_heads": 4, "rope_base": 500_000.0, "max_seq_len": 128, "num_kv_heads": None,
    })
    assert detected.config == tiny
    assert detected.provenance["num_heads"] == "given"
    assert detected.provenance["num_kv_heads"] == "inferred"
    assert detected.provenance["head_dim"] == "inferred"
    assert detected.provenance["norm_eps"] == "default"
    assert detected.provenance["family"] == "default"
    assert detected.config_source is None


def test_overrides_beat_the_config_file(hf_llama):
    detected = detect_model(hf_llama.infos, hf_llama.config, "config.json",
                            overrides={"max_seq_len": 2048, "rope_scaling": None})
    assert detected.config.max_seq_len == 2048 and detected.provenance["max_seq_len"] == "given"
    # None means "not given": the file's value stands.
    assert detected.config.rope_scaling == LLAMA3_ROPE
    with pytest.raises(ConfigError, match="unknown decoder setting 'heads'; valid: attn_bias"):
        detect_model(hf_llama.infos, overrides={"heads": 4})


def test_a_head_count_that_does_not_divide_q_is_an_error():
    with pytest.raises(ConfigError) as error:
        detect_model(layout_tensor_infos(DECODER_PRESETS["tiny"], "native"),
                     overrides={"num_heads": 3})
    assert str(error.value) == (
        "layers.0.attn.q_proj.weight has 64 rows, not a multiple of num_heads 3 (from "
        "--num-heads; give another --num-heads)"
    )


def test_a_shape_mismatch_names_the_option_that_caused_it():
    config = DECODER_PRESETS["tiny"]
    with pytest.raises(ConfigError, match="with --num-heads 8"):
        detect_model(layout_tensor_infos(config, "hf"), hf_config_dict(config), "config.json",
                     overrides={"num_heads": 8})


def test_native_qwen2_like_checkpoint_is_inferred_from_its_biases():
    qwen = DECODER_PRESETS["qwen2_0_5b"]
    detected = detect_model(layout_tensor_infos(qwen, "native"), overrides={"num_heads": 14})
    assert detected.family == "qwen2" and detected.provenance["family"] == "inferred"
    assert detected.config.attn_bias and detected.config.tie_word_embeddings
    assert detected.config.num_kv_heads == 2


def test_native_config_dict():
    tiny = DECODER_PRESETS["tiny"]
    fields = {f.name: getattr(tiny, f.name) for f in dataclasses.fields(tiny)}
    fields["rope_scaling"] = {"factor": 32.0}
    detected = detect_model(layout_tensor_infos(tiny, "native"), {"decoder": fields}, "config.json")
    assert detected.config == tiny.replace(rope_scaling=RopeScaling(factor=32.0))
    assert set(detected.fields_from("read")) == set(fields)


# ----------------------------------------------------------------------------- vision


VISION_EXPECTED = {
    "clip": dict(activation="quick_gelu", norm_eps=1e-5, class_token=True, patch_bias=False,
                 pre_norm=True, post_norm_hidden=False),
    "siglip": dict(activation="gelu_tanh", norm_eps=1e-6, class_token=False, patch_bias=True,
                   pre_norm=False, post_norm_hidden=True),
}


@pytest.mark.parametrize("name", ["clip_vision", "siglip_vision", "clip", "siglip"])
def test_vision_models_from_their_saved_dirs(name, hf_vision_models):
    saved = hf_vision_models[name]
    family = name.removesuffix("_vision")
    detected = detect_model(saved.infos, saved.config, "config.json")
    assert (detected.kind, detected.layout, detected.family) == ("vision", "hf", family)
    assert detected.config == VisionEncoderConfig(
        image_size=16, patch_size=8, embed_dim=32, num_layers=2, num_heads=4,
        intermediate_dim=64, family=family, **VISION_EXPECTED[family],
    )
    provenance = detected.provenance
    assert provenance["activation"] == provenance["norm_eps"] == provenance["num_heads"] == "read"
    assert provenance["class_token"] == provenance["patch_bias"] == "inferred"
    assert provenance["output_layer"] == "default"
    has_extra = name != "clip_vision"
    assert any("dropped" in note for note in detected.notes) == has_extra


def test_vision_without_config_asks_for_the_head_count(hf_vision_models):
    infos = hf_vision_models["siglip_vision"].infos
    with pytest.raises(ConfigError) as error:
        detect_model(infos)
    assert error.value.flag == "--encoder-num-heads" == VISION_FLAGS["num_heads"]
    detected = detect_model(infos, overrides={"num_heads": 4})
    assert detected.family == "siglip" and detected.provenance["family"] == "inferred"
    assert detected.config.image_size == 16 and detected.provenance["image_size"] == "inferred"
    assert detected.config.activation == "gelu_tanh"
    assert detected.provenance["activation"] == "default"


def test_vision_native_layout_so400m_shapes():
    so400m = VISION_PRESETS["siglip_so400m_384"]
    infos = layout_tensor_infos(so400m, "native", kind="vision")
    detected = detect_model(infos, overrides={"num_heads": 16, "image_size": 384})
    assert detected.config == so400m
    # Without the image size, the 27 x 27 grid gives 378 px: the same model.
    assert detect_model(infos, overrides={"num_heads": 16}).config.seq_len == 729


def test_vision_sizes_missing_from_config_come_from_shapes(hf_vision_models):
    saved = hf_vision_models["clip"]
    config = dict(saved.config)
    config["vision_config"] = {
        k: v for k, v in config["vision_config"].items()
        if k not in ("image_size", "hidden_size", "intermediate_size", "num_hidden_layers")
    }
    detected = detect_model(saved.infos, config, "config.json")
    assert (detected.config.image_size, detected.config.embed_dim) == (16, 32)
    assert (detected.config.intermediate_dim, detected.config.num_layers) == (64, 2)
    for name in ("image_size", "embed_dim", "intermediate_dim", "num_layers"):
        assert detected.provenance[name] == "inferred"


def test_vision_config_disagreeing_with_positions(hf_vision_models):
    saved = hf_vision_models["clip_vision"]
    with pytest.raises(ConfigError, match=r"position_embedding.weight has shape \[5, 32\], "
                                          r"expected \[17, 32\]"):
        detect_model(saved.infos, dict(saved.config, image_size=32), "config.json")


def test_unsupported_vision_config(hf_vision_models):
    saved = hf_vision_models["clip_vision"]
    with pytest.raises(ConfigError, match="hidden_act 'relu' is not supported"):
        detect_model(saved.infos, dict(saved.config, hidden_act="relu"), "config.json")
    with pytest.raises(ConfigError, match="model_type 'aimv2'"):
        detect_model(saved.infos, dict(saved.config, model_type="aimv2"), "config.json")
    # a supported type whose weights are another tower's: the shapes say so
    with pytest.raises(ConfigError, match="patch_embedding.weight has shape"):
        detect_model(saved.infos, dict(saved.config, model_type="siglip2"), "config.json")
    with pytest.raises(ConfigError, match="params.json, which describes no vision encoder"):
        detect_model(saved.infos, PARAMS_405B, "params.json")


# ----------------------------------------------------------------------------- fused


def _fused_infos(encoder_prefix="encoder.vision."):
    tiny = DECODER_PRESETS["tiny"]
    infos = layout_tensor_infos(tiny, "native", prefix="decoder.", dtype=torch.float32)
    fusion_shapes = {
        "ca_norm.scale": (64,), "attn.q_proj.weight": (64, 64), "attn.k_proj.weight": (32, 48),
        "attn.v_proj.weight": (32, 48), "attn.output_proj.weight": (64, 64),
        "attn.q_norm.scale": (16,), "attn.k_norm.scale": (16,), "ca_scale.scale": (1,),
        "mlp_norm.scale": (64,), "mlp.w1.weight": (128, 64), "mlp.w2.weight": (64, 128),
        "mlp.w3.weight": (128, 64), "mlp_scale.scale": (1,),
    }
    extra = {f"decoder.layers.{f}.fusion_layer.{k}": s
             for f in (1, 3) for k, s in fusion_shapes.items()}
    extra["decoder.tok_embeddings.fusion_embedding.weight"] = (8, 64)
    extra[encoder_prefix + "conv.weight"] = (48, 3, 8, 8)
    extra["encoder.projection.output.weight"] = (48, 48)
    infos.update({k: TensorInfo(k, s, torch.float32) for k, s in extra.items()})
    return infos


@pytest.mark.parametrize(("prefix", "style"),
                         [("encoder.vision.", "fusesurgery"), ("encoder.clip.", "torchtune")])
def test_fused_checkpoints(prefix, style):
    detected = detect_model(_fused_infos(prefix), overrides={"num_heads": 4,
                                                             "rope_base": 500_000.0})
    assert (detected.kind, detected.layout, detected.fused_style) == ("fused", "native", style)
    assert detected.config == DECODER_PRESETS["tiny"].replace(max_seq_len=4096)
    assert detected.fusion.fusion_layers == (1, 3)
    assert detected.fusion.fusion_vocab_size == 8 and detected.fusion.encoder_dim == 48
    assert "fusion layers [1, 3], fusion vocab 8, encoder dim 48" in detected.summary()


def test_fused_checkpoint_with_unknown_decoder_keys():
    infos = _fused_infos()
    infos["decoder.layers.1.cross_attn.weight"] = TensorInfo("x", (1,), torch.float32)
    with pytest.raises(KeyMapError, match="decoder.layers.1.cross_attn.weight"):
        detect_model(infos, overrides={"num_heads": 4})


# ----------------------------------------------------------------------------- layouts


def test_layout_detection_and_styles(hf_llama, hf_vision_models):
    assert detect_layout(hf_llama.infos) == ("decoder", "hf")
    assert detect_layout(layout_tensor_infos(LLAMA_405B, "meta")) == ("decoder", "meta")
    assert detect_layout(layout_tensor_infos(LLAMA_405B, "native")) == ("decoder", "native")
    assert detect_layout(hf_vision_models["clip_vision"].infos) == ("vision", "hf")
    assert detect_layout(hf_vision_models["siglip"].infos) == ("vision", "hf")
    assert detect_layout(["conv.weight", "layers.0.sa_norm.weight"]) == ("vision", "native")
    assert config_style(hf_llama.config) == "hf"
    assert config_style(PARAMS_405B) == "meta"
    assert config_style({"embed_dim": 4}) == "native"
    with pytest.raises(ConfigError, match="unrecognised config"):
        config_style({"foo": 1})


def test_unrecognised_keys():
    with pytest.raises(UnrecognizedFormatError, match="language_model"):
        detect_layout(["language_model.model.embed_tokens.weight"])
    with pytest.raises(UnrecognizedFormatError, match="no known .* layout: a.weight, b.weight"):
        detect_layout(["b.weight", "a.weight"])


def test_decoder_with_a_missing_layer():
    infos = layout_tensor_infos(DECODER_PRESETS["tiny"], "native")
    infos = {k: v for k, v in infos.items() if not k.startswith("layers.1.")}
    with pytest.raises(ConfigError, match=r"has layers up to 3 but lacks layers \[1\]"):
        detect_model(infos, overrides={"num_heads": 4})

"""RoPE scaling settings read from config.json (transformers 5's ``rope_parameters`` as
``save_pretrained`` writes it, transformers 4's ``rope_scaling``), written back in the file's
own spelling, in the native config, and refused with one line when out of their domain."""

from __future__ import annotations

import dataclasses

import pytest

from fusesurgery.cli.inspect_render import format_config_value
from fusesurgery.config import DecoderConfig, RopeScaling
from fusesurgery.convert.configs import (
    hf_config_dict,
    meta_config_dict,
    native_config_dict,
    read_hf_decoder_config,
    read_native_config,
)
from fusesurgery.errors import ConfigError

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
SHORT, LONG = [1.0, 1.5, 2.0, 3.0], [2.0, 4.0, 8.0, 16.0]
# rope_parameters given to transformers -> the RopeScaling it means
SCALINGS = {
    "linear": ({"rope_type": "linear", "factor": 4.0},
               RopeScaling(rope_type="linear", factor=4.0)),
    # dynamic NTK grows past max_position_embeddings
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0},
                RopeScaling(rope_type="dynamic", factor=2.0,
                            original_max_position_embeddings=64)),
    "yarn": ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
             RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
    "yarn-all-fields": (
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8,
         "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.8, "mscale_all_dim": 0.5,
         "truncate": False, "attention_factor": 1.2},
        RopeScaling(rope_type="yarn", factor=8.0, original_max_position_embeddings=8,
                    beta_fast=16.0, beta_slow=2.0, mscale=0.8, mscale_all_dim=0.5,
                    truncate=False, attention_factor=1.2)),
    # no factor stated: transformers takes max_position_embeddings / original
    "longrope": ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                  "original_max_position_embeddings": 16},
                 RopeScaling(rope_type="longrope", factor=4.0,
                             original_max_position_embeddings=16, short_factor=SHORT,
                             long_factor=LONG)),
    "llama3": ({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
               RopeScaling(factor=32.0, original_max_position_embeddings=8)),
}


def saved_config(family: str, rope: dict, tmp_path) -> dict:
    """config.json as transformers 5.25's save_pretrained writes it."""
    import json

    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config,
                  "mistral": transformers.MistralConfig}[family]
    head = {"head_dim": 8} if family == "qwen3" else {}  # Qwen3's default is 128
    config_cls(**SIZES, **head, rope_parameters={**rope, "rope_theta": 1e6}).save_pretrained(
        tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def decoder_config(reading) -> DecoderConfig:
    return DecoderConfig(**{**reading.defaults, **reading.read, "num_heads": 4})


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_save_pretrained_config_reads_and_writes_back(tmp_path, family, name):
    rope, expected = SCALINGS[name]
    document = saved_config(family, rope, tmp_path)
    assert "rope_parameters" in document and "rope_scaling" not in document  # 5.25 writes
    reading = read_hf_decoder_config(document)
    assert reading.read["rope_scaling"] == expected and reading.read["rope_base"] == 1e6
    config = decoder_config(reading)
    assert hf_config_dict(config, base=document) == document  # the file, kept as it is
    # written from scratch (transformers 4 spelling), it reads back as the same model
    fresh = hf_config_dict(config)
    assert read_hf_decoder_config(fresh).read["rope_scaling"] == expected
    assert fresh["max_position_embeddings"] == 64 and "rope_parameters" not in fresh
    # and transformers reads the written file as the same scaling
    reread = transformers.AutoConfig.for_model(**fresh).rope_parameters
    assert {k: v for k, v in reread.items() if k != "rope_theta"} == {
        k: v for k, v in expected.parameters().items()
        if k != "original_max_position_embeddings" or name != "dynamic"}


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_native_config_round_trip(name):
    config = DecoderConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                           intermediate_dim=48, max_seq_len=64, rope_scaling=SCALINGS[name][1])
    reading = read_native_config(native_config_dict(config), "decoder")
    assert DecoderConfig(**reading.read) == config


def test_a_native_config_of_before_rope_types_is_llama3():
    old = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
    reading = read_native_config({"decoder": {"rope_scaling": old}}, "decoder")
    assert reading.read["rope_scaling"] == RopeScaling(factor=8.0)


def test_native_and_option_spellings():
    from fusesurgery.convert.configs import coerce_rope_scaling

    assert coerce_rope_scaling({"rope_type": "default"}) is None
    assert coerce_rope_scaling(SCALINGS["yarn"][1].parameters()) == SCALINGS["yarn"][1]
    with pytest.raises(ConfigError, match="rope_type 'ntk' is not a supported RoPE scaling; "
                                          "supported: linear, dynamic, yarn, longrope, llama3"):
        coerce_rope_scaling({"rope_type": "ntk", "factor": 2.0})


def test_changed_scaling_is_written_in_the_bases_spelling(tmp_path):
    document = saved_config("llama", SCALINGS["linear"][0], tmp_path)
    config = decoder_config(read_hf_decoder_config(document))
    out = hf_config_dict(config.replace(rope_scaling=SCALINGS["yarn"][1]), base=document)
    assert out["rope_parameters"] == {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 16}
    out = hf_config_dict(config.replace(rope_scaling=None), base=document)
    assert out["rope_parameters"] == {"rope_theta": 1e6, "rope_type": "default"}


def test_yarn_over_a_stated_pre_yarn_context_extends_max_seq_len():
    """Qwen2.5's config.json: max_position_embeddings 32768 = original, factor 4."""
    rope = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    document = {"model_type": "qwen2", **SIZES, "max_position_embeddings": 32768,
                "rope_theta": 1e6, "rope_scaling": rope}
    reading = read_hf_decoder_config(document)
    assert reading.read["max_seq_len"] == 131_072
    assert any(note.startswith("max_seq_len 131072: YaRN's factor 4 times the 32768")
               for note in reading.notes), reading.notes
    config = decoder_config(reading)
    assert hf_config_dict(config, base=document) == document
    fresh = hf_config_dict(config)  # from scratch: the length YaRN is for, read back alike
    assert fresh["max_position_embeddings"] == 131_072
    assert decoder_config(read_hf_decoder_config(fresh)) == config
    # another length given: written as it is, and read back as it is
    huge = {**document, "rope_scaling": {**rope, "factor": 1e306}}  # no overflow, no error
    assert read_hf_decoder_config(huge).read["max_seq_len"] == 32768
    shorter = config.replace(max_seq_len=65_536)
    out = hf_config_dict(shorter, base=document)
    assert out["max_position_embeddings"] == 65_536
    assert decoder_config(read_hf_decoder_config(out)) == shorter


def test_dynamic_ntk_keeps_its_context_as_max_position_embeddings():
    """transformers grows dynamic NTK's base past max_position_embeddings: a native model
    given a longer max_seq_len still writes the context the scaling starts from."""
    scaling = SCALINGS["dynamic"][1]  # original 64
    config = DecoderConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                           intermediate_dim=48, max_seq_len=256, rope_scaling=scaling)
    out = hf_config_dict(config)
    assert out["max_position_embeddings"] == 64
    assert out["rope_scaling"] == {"rope_type": "dynamic", "factor": 2.0}


def test_transformers_top_level_original_context_wins():
    """A top-level original_max_position_embeddings (Phi-3's spelling) is the attribute
    transformers reads, over the one inside rope_scaling."""
    document = {"model_type": "llama", **SIZES, "original_max_position_embeddings": 8,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 16}}
    scaling = read_hf_decoder_config(document).read["rope_scaling"]
    assert scaling.original_max_position_embeddings == 8
    # a changed scaling is written where transformers reads it
    config = decoder_config(read_hf_decoder_config(document))
    changed = dataclasses.replace(scaling, original_max_position_embeddings=32)
    out = hf_config_dict(config.replace(rope_scaling=changed), base=document)
    assert read_hf_decoder_config(out).read["rope_scaling"] == changed


def test_keys_the_type_does_not_read_are_noted():
    document = {"model_type": "qwen2", **SIZES,
                "rope_scaling": {"rope_type": "dynamic", "factor": 2.0,
                                 "original_max_position_embeddings": 16}}
    reading = read_hf_decoder_config(document)
    assert reading.read["rope_scaling"].original_max_position_embeddings == 64
    assert any("original_max_position_embeddings not read: dynamic scaling does not use"
               in note for note in reading.notes), reading.notes


@pytest.mark.parametrize(("rope", "message"), [
    ({"rope_type": "mrope"}, "rope_type 'mrope' is not supported; supported: default, "
                             "linear, dynamic, yarn, longrope, llama3$"),
    ({"rope_type": "linear"}, "linear rope scaling lacks factor$"),
    ({"rope_type": "linear", "factor": 0}, "RopeScaling.factor must be a positive finite "
                                           "number, got 0.0$"),
    ({"rope_type": "dynamic", "factor": -2.0}, "factor must be a positive finite number"),
    ({"rope_type": "yarn", "factor": "4"}, "factor must be a positive finite number, got '4'"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 0},
     "beta_fast must be a positive finite number"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": "yes"}, "truncate must be true, false"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1.5},
     "original_max_position_embeddings must be a positive integer, got 1.5"),
    ({"rope_type": "longrope", "short_factor": SHORT}, "longrope rope scaling lacks "
                                                       "long_factor$"),
    ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG[:3]},
     "long_factor has 3 values and short_factor 4"),
    ({"rope_type": "longrope", "short_factor": [1.0, None, 2.0, 3.0], "long_factor": LONG},
     "short_factor must hold positive finite numbers only, got None"),
    ({"rope_type": "longrope", "short_factor": "1 2 3 4", "long_factor": LONG},
     "short_factor must be a non-empty list"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
     "high_freq_factor must be above low_freq_factor 4.0, got 1.0"),
    ({"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5},
     "partial_rotary_factor 0.5 is not supported"),
])
def test_bad_rope_settings_are_refused_in_one_line(rope, message):
    document = {"model_type": "llama", **SIZES, "rope_scaling": rope}
    with pytest.raises(ConfigError, match=message) as error:
        read_hf_decoder_config(document, "cfg/config.json")
    assert str(error.value).startswith("cfg/config.json: ") and "\n" not in str(error.value)


def test_rope_parameters_must_be_an_object():
    with pytest.raises(ConfigError, match="rope_parameters must be an object, got 3"):
        read_hf_decoder_config({"model_type": "llama", "rope_parameters": 3})


def test_longrope_factors_must_cover_the_head():
    with pytest.raises(ConfigError, match="longrope scaling has 4 factors per list, head_dim "
                                          "16 needs 8"):
        DecoderConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=2,
                      intermediate_dim=48, rope_scaling=SCALINGS["longrope"][1])


def test_a_field_another_type_reads_is_refused():
    with pytest.raises(ConfigError, match="RopeScaling.low_freq_factor must be null for yarn"):
        dataclasses.replace(SCALINGS["yarn"][1], low_freq_factor=1.0)


def test_meta_params_cannot_state_other_scalings():
    config = DecoderConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                           intermediate_dim=48, rope_scaling=SCALINGS["yarn"][1])
    with pytest.raises(ConfigError, match=r"cannot express this RoPE scaling \(yarn x4 "
                                          r"\(orig 16\)\): only Llama 3.1's"):
        meta_config_dict(config)


def test_inspect_shows_the_type_and_its_parameters():
    assert format_config_value(SCALINGS["yarn-all-fields"][1]) == (
        "yarn x8 (orig 8, attention_factor 1.2, beta_fast 16, beta_slow 2, mscale 0.8, "
        "mscale_all_dim 0.5, truncate False)")
    assert format_config_value(SCALINGS["longrope"][1]) == (
        "longrope x4 (orig 16, short_factor [4 values], long_factor [4 values])")
    assert format_config_value(SCALINGS["linear"][1]) == "linear x4"
    assert format_config_value(RopeScaling(factor=8.0)) == (
        "llama3 x8 (low 1, high 4, orig 8192)")


def test_rope_scaling_beside_rope_parameters_is_what_transformers_reads(tmp_path):
    """A config.json with both spellings (a transformers 5 file a user added rope_scaling to):
    transformers reads the non-empty rope_scaling; so does fusesurgery, and writes it there."""
    document = saved_config("llama", {"rope_type": "default"}, tmp_path)
    document["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    theirs = transformers.AutoConfig.for_model(**document).rope_parameters
    reading = read_hf_decoder_config(document)
    assert reading.read["rope_scaling"] == RopeScaling(rope_type="linear", factor=4.0)
    assert theirs["rope_type"] == "linear" and theirs["factor"] == 4.0
    assert reading.read.get("rope_base", 10_000.0) == theirs["rope_theta"]
    config = decoder_config(reading)
    changed = RopeScaling(rope_type="linear", factor=2.0)
    out = hf_config_dict(config.replace(rope_scaling=changed), base=document)
    assert read_hf_decoder_config(out).read["rope_scaling"] == changed
    assert transformers.AutoConfig.for_model(**out).rope_parameters["factor"] == 2.0
    document["rope_scaling"] = {"rope_type": "linear", "factor": float("nan")}
    with pytest.raises(ConfigError, match="factor"):
        read_hf_decoder_config(document)

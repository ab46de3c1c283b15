"""hf_config_dict over a decoder's own config.json, sliding windows as transformers applies
them, and dtype spellings."""

from __future__ import annotations

import pytest

from fusesurgery.config import DecoderConfig, RopeScaling
from fusesurgery.convert.configs import (
    hf_config_dict,
    hf_sliding_window,
    read_hf_decoder_config,
    set_hf_dtype,
)
from fusesurgery.errors import ConfigError

LLAMA = DecoderConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                      intermediate_dim=64, num_kv_heads=2, max_seq_len=2048, norm_eps=1e-6)
# transformers 4's spelling: rope_theta beside rope_scaling, torch_dtype; head_dim left out
V4_BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
           "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 64, "rope_theta": 10000.0,
           "rope_scaling": None, "torch_dtype": "bfloat16", "bos_token_id": 3,
           "hidden_act": "swish"}


def test_a_base_that_means_the_model_comes_back_unchanged():
    assert hf_config_dict(LLAMA, base=V4_BASE) == V4_BASE  # head_dim, eps, ... as defaulted


def test_changed_fields_are_written_in_the_bases_spelling():
    scaled = LLAMA.replace(rope_base=500_000.0, rope_scaling=RopeScaling(factor=32.0),
                           num_layers=3)
    out = hf_config_dict(scaled, base=V4_BASE)
    assert out == {**V4_BASE, "num_hidden_layers": 3, "rope_theta": 500_000.0,
                   "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}}
    assert "rope_parameters" not in out
    # and it reads back as the model
    reading = read_hf_decoder_config(out)
    assert reading.read["rope_scaling"] == RopeScaling(factor=32.0)
    v5 = {k: v for k, v in V4_BASE.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}
    out = hf_config_dict(scaled, base=v5)
    assert out["rope_parameters"] == {"rope_theta": 500_000.0, "rope_type": "llama3",
                                      "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}
    assert "rope_theta" not in out and "rope_scaling" not in out


def test_a_base_of_another_family_is_not_used():
    out = hf_config_dict(LLAMA.replace(family="mistral"), base=V4_BASE)
    assert out["model_type"] == "mistral" and "bos_token_id" not in out
    assert out["sliding_window"] is None and out["hidden_act"] == "silu"


@pytest.mark.parametrize(("config", "family", "window"), [
    ({}, "mistral", 4096),  # transformers' default window
    ({"sliding_window": None}, "mistral", None),
    ({"sliding_window": 8}, "mistral", 8),
    ({"sliding_window": 8}, "llama", None),
    ({"sliding_window": 8}, "qwen2", None),  # use_sliding_window false
    ({"sliding_window": 8, "use_sliding_window": True, "num_hidden_layers": 2}, "qwen2", None),
    ({"sliding_window": 8, "use_sliding_window": True, "num_hidden_layers": 2,
      "max_window_layers": 1}, "qwen2", 8),
    ({"sliding_window": 8, "use_sliding_window": True,
      "layer_types": ["full_attention", "sliding_attention"]}, "qwen2", 8),
    ({"sliding_window": 8, "use_sliding_window": True, "num_hidden_layers": 40,
      "layer_types": ["full_attention"] * 40}, "qwen2", None),
])
def test_sliding_window_as_transformers_applies_it(config, family, window):
    assert hf_sliding_window(config, family) == window


@pytest.mark.parametrize("window", ["8", 0, True, 2.5])
def test_a_malformed_window_is_refused(window):
    with pytest.raises(ConfigError, match="config.json: sliding_window must be"):
        read_hf_decoder_config({"model_type": "mistral", "sliding_window": window})


def test_window_notes_only_where_the_window_is_shorter_than_the_positions():
    short = read_hf_decoder_config({"model_type": "mistral", "sliding_window": 8,
                                    "max_position_embeddings": 64})
    assert len(short.differences) == 1 and short.differences[0] in short.notes
    wide = read_hf_decoder_config({"model_type": "mistral", "sliding_window": 64,
                                   "max_position_embeddings": 64})
    assert wide.differences == [] and len(wide.notes) == 1


def test_dtype_keeps_the_files_spelling():
    v4, v5, bare = {"torch_dtype": "float32"}, {"dtype": "float32"}, {}
    for document in (v4, v5, bare):
        set_hf_dtype(document, "bfloat16")
    assert (v4, v5, bare) == ({"torch_dtype": "bfloat16"}, {"dtype": "bfloat16"},
                              {"torch_dtype": "bfloat16"})

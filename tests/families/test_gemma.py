"""Gemma 3 text and Gemma 2 as native decoders, against transformers' own Gemma3ForCausalLM
and Gemma2ForCausalLM: logits at 8 tokens and past the sliding window, cached decoding past
the window, padded batches, soft-capped scores, and what their config.json says read as
transformers reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusesurgery import load_decoder
from fusesurgery.config import DecoderConfig
from fusesurgery.convert.configs import hf_config_dict, read_hf_decoder_config
from fusesurgery.errors import ConfigError

transformers = pytest.importorskip("transformers")

WINDOW = 4
# 5 layers, every 3rd global: layers 0, 1, 3, 4 slide, layer 2 attends to everything
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=5,
             num_attention_heads=4, num_key_value_heads=2, head_dim=12,
             max_position_embeddings=64, sliding_window=WINDOW, sliding_window_pattern=3,
             query_pre_attn_scalar=20, rope_local_base_freq=500.0, rope_theta=30_000.0)


def save_gemma3(directory: Path, dtype: torch.dtype = torch.float32, **settings) -> Path:
    """A tiny Gemma3ForCausalLM, every norm weight drawn at random (transformers starts them
    at zero, where a misplaced (1 + w) norm would not show)."""
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**{**SIZES,
                                                                             **settings}))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0, 0.5)
    model.to(dtype).save_pretrained(directory)
    return directory


def _tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, SIZES["vocab_size"], (batch, length),
                         generator=torch.Generator().manual_seed(length))


@pytest.mark.parametrize("settings", [
    {},
    # a scaled global RoPE (the sliding layers keep plain RoPE) and capped logits
    {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "final_logit_softcapping": 3.0},
], ids=["plain", "scaled-capped"])
def test_logits_equal_transformers_past_the_window(tmp_path, settings):
    source = save_gemma3(tmp_path / "hf", **settings)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32).eval()
    decoder = load_decoder(source).eval()
    windows = [layer.attn.sliding_window for layer in decoder.layers]
    assert windows == [WINDOW, WINDOW, None, WINDOW, WINDOW]
    bases = [layer.attn.pos_embeddings.base for layer in decoder.layers]
    assert bases == [500.0, 500.0, 30_000.0, 500.0, 500.0]
    for length in (8, 3 * WINDOW + 5):
        tokens = _tokens(2, length)
        with torch.no_grad():
            ours, theirs = decoder(tokens), reference(tokens).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        # the same kernels in the same order (rotate-half RoPE, fp32 norms, SDPA)
        assert torch.equal(ours, theirs)
    # a window of 4 that is not applied differs past it: the check above can fail
    unwindowed = load_decoder(source).eval()
    for layer in unwindowed.layers:
        layer.attn.sliding_window = None
    with torch.no_grad():
        assert not torch.allclose(unwindowed(_tokens(2, 17)), decoder(_tokens(2, 17)))


def test_cached_decoding_past_the_window_equals_transformers(tmp_path):
    source = save_gemma3(tmp_path / "hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32).eval()
    decoder = load_decoder(source).eval()
    tokens = _tokens(2, 3 * WINDOW + 2)
    with torch.no_grad():
        theirs = reference(tokens).logits
        decoder.setup_caches(2, torch.float32, decoder_max_seq_len=32)
        steps = [decoder(tokens[:, :3])]  # a prefill shorter than the window, then one a step
        for position in range(3, tokens.size(1)):
            steps.append(decoder(tokens[:, position:position + 1]))
    torch.testing.assert_close(torch.cat(steps, dim=1), theirs, rtol=0, atol=1e-5)


def test_padded_batch_equals_transformers(tmp_path):
    """Left padding: the window counts slots in the sequence, pads included, as
    transformers' sliding masks do."""
    source = save_gemma3(tmp_path / "hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32).eval()
    decoder = load_decoder(source).eval()
    length = 2 * WINDOW + 3
    tokens = _tokens(2, length)
    keep = torch.ones(2, length, dtype=torch.bool)
    keep[1, :3] = False  # the second row starts with three pads
    with torch.no_grad():
        theirs = reference(tokens, attention_mask=keep.long()).logits
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        mask = causal[None] & keep[:, None, :]
        mask = mask | torch.eye(length, dtype=torch.bool)[None]  # pad rows see themselves
        ours = decoder(tokens, mask=mask)
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=0, atol=1e-5)


def test_bf16_checkpoint_close_to_transformers(tmp_path):
    source = save_gemma3(tmp_path / "hf", dtype=torch.bfloat16)
    reference = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    decoder = load_decoder(source).eval()
    assert decoder.tok_embeddings.weight.dtype == torch.bfloat16
    tokens = _tokens(1, 12)
    with torch.no_grad():
        ours, theirs = decoder(tokens), reference(tokens).logits.float()
    # sqrt(32) rounded to bf16 (5.65625, not 5.657) as transformers rounds it: the
    # embedding scale matches to the bit, the rest to bf16's precision
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0.1)


def test_config_reading(tmp_path):
    source = save_gemma3(tmp_path / "hf")
    config = json.loads((source / "config.json").read_text())
    read = read_hf_decoder_config(config).read
    assert read["sliding_layers"] == (0, 1, 3, 4) and read["sliding_window"] == WINDOW
    assert (read["rope_base"], read["local_rope_base"]) == (30_000.0, 500.0)
    assert (read["norm_unit_offset"], read["post_norms"], read["embed_scale"]) == (True,) * 3
    assert read["mlp_activation"] == "gelu_tanh" and read["query_pre_attn_scalar"] == 20
    # transformers 4's spelling: rope_theta, rope_local_base_freq, sliding_window_pattern
    legacy = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
    legacy.update(rope_theta=30_000.0, rope_local_base_freq=500.0, sliding_window_pattern=3)
    again = read_hf_decoder_config(legacy).read
    for name in ("rope_base", "local_rope_base", "sliding_layers"):
        assert again[name] == read[name], name


@pytest.mark.parametrize(("change", "message"), [
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping 50.0 is not supported"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention true"),
    ({"layer_types": ["sliding_attention"]}, "layer_types has 1 entries for 5 layers"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0},
                          "full_attention": {"rope_type": "default"}}},
     "a RoPE scaling on the sliding layers is not supported"),
])
def test_what_is_not_modelled_is_refused(tmp_path, change, message):
    config = json.loads((save_gemma3(tmp_path / "hf") / "config.json").read_text())
    with pytest.raises(ConfigError, match=message):
        read_hf_decoder_config({**config, **change})


def test_written_config_loads_in_transformers_as_the_same_model(tmp_path):
    """A config.json written from the native config alone (no base to keep) describes the
    same model to transformers."""
    source = save_gemma3(tmp_path / "hf", final_logit_softcapping=3.0)
    reading = read_hf_decoder_config(json.loads((source / "config.json").read_text()))
    cfg = DecoderConfig(**{**reading.defaults, **reading.read})
    written = transformers.Gemma3TextConfig(**hf_config_dict(cfg))
    original = transformers.AutoConfig.from_pretrained(source)
    for name in ("layer_types", "sliding_window", "query_pre_attn_scalar", "rope_parameters",
                 "final_logit_softcapping", "hidden_activation", "head_dim", "rms_norm_eps",
                 "tie_word_embeddings"):
        assert getattr(written, name) == getattr(original, name), name


def test_gemma_names_read_with_its_own_table_and_llamas_with_theirs(tmp_path):
    """post_attention_layernorm is Gemma's post-attention norm and Llama's MLP-input norm:
    the whole key set tells which, both ways."""
    from safetensors import safe_open  # noqa: PLC0415

    from fusesurgery.convert.keymaps import (  # noqa: PLC0415
        from_native_key,
        hf_decoder_family_of,
        keys_to_native,
    )
    from tests.tiny_models import save_tiny_hf_decoder  # noqa: PLC0415

    def keys(directory: Path) -> list[str]:
        with safe_open(directory / "model.safetensors", "pt") as file:
            return list(file.keys())

    gemma = keys(save_gemma3(tmp_path / "gemma"))
    llama = keys(save_tiny_hf_decoder("llama", tmp_path / "llama"))
    assert hf_decoder_family_of(gemma) == "gemma3" and hf_decoder_family_of(llama) is None
    post = "model.layers.1.post_attention_layernorm.weight"
    assert keys_to_native(gemma, "hf").mapping[post] == "layers.1.sa_scale.scale"
    assert keys_to_native(llama, "hf").mapping[post] == "layers.1.mlp_norm.scale"
    mapping = keys_to_native(gemma, "hf").mapping
    assert {from_native_key(native, "hf", "decoder", "gemma3")
            for native in mapping.values()} == set(gemma)
    assert from_native_key("layers.1.mlp_norm.scale", "hf", "decoder", "gemma3") == (
        "model.layers.1.pre_feedforward_layernorm.weight")


def _save_clip(directory: Path) -> Path:
    torch.manual_seed(1)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        image_size=16, patch_size=8)).save_pretrained(directory)
    return directory


def test_fuse_is_native_and_the_transformers_export_keeps_its_norms(tmp_path):
    from typer.testing import CliRunner  # noqa: PLC0415

    from fusesurgery import load_fused  # noqa: PLC0415
    from fusesurgery.cli.app import app  # noqa: PLC0415

    runner = CliRunner()
    decoder, tower = save_gemma3(tmp_path / "gemma"), _save_clip(tmp_path / "clip")
    fused = tmp_path / "fused"
    result = runner.invoke(app, ["fuse", str(tower), str(decoder), "-o", str(fused),
                                 "--every", "2"])
    assert result.exit_code == 0, result.output
    config = json.loads((fused / "fusion_config.json").read_text())  # native, not exported
    assert config["fusion"]["norm_unit_offset"] is True
    model = load_fused(fused).eval()
    norm = model.decoder.layers[1].fusion_layer.ca_norm
    assert norm.unit_offset and torch.equal(norm.scale, torch.zeros_like(norm.scale))
    # cached greedy decoding past the window through the fused model equals transformers'
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        decoder, dtype=torch.float32).eval()
    tokens = _tokens(1, 3)
    with torch.no_grad():
        theirs = reference.generate(tokens, max_new_tokens=2 * WINDOW, do_sample=False)
        model.decoder.setup_caches(1, torch.float32, encoder_max_seq_len=4,
                                   decoder_max_seq_len=32)
        ours, step = [tokens], tokens
        for _ in range(2 * WINDOW):
            step = model.decoder(step)[:, -1:].argmax(-1)
            ours.append(step)
    assert torch.equal(torch.cat(ours, dim=1), theirs)

    exported = tmp_path / "exported"
    result = runner.invoke(app, ["convert", str(fused), "-o", str(exported),
                                 "--to", "transformers"])
    assert result.exit_code == 0, result.output  # (tests/hf/test_export_families.py: its maths)
    assert json.loads((exported / "config.json").read_text())["fusion_norm_unit_offset"] is True


def test_gemma2_capped_scores_equal_transformers_eager_attention(tmp_path):
    """Gemma 2's score cap (transformers computes it in eager attention only): small
    ``query_pre_attn_scalar`` and cap, so the cap changes the logits far beyond the
    tolerance; alternating sliding layers; interleaved RoPE (torchtune's q/k rows)."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
        sliding_window=WINDOW, attn_logit_softcapping=0.5, final_logit_softcapping=5.0,
        query_pre_attn_scalar=1)
    model = transformers.Gemma2ForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path / "gemma2")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "gemma2", dtype=torch.float32).eval()
    decoder = load_decoder(tmp_path / "gemma2").eval()
    assert [layer.attn.sliding_window for layer in decoder.layers] == [WINDOW, None, WINDOW]
    assert decoder.layers[0].attn.pos_embeddings.style == "interleaved"
    tokens = _tokens(2, 3 * WINDOW + 1)
    with torch.no_grad():
        theirs = reference(tokens).logits
        torch.testing.assert_close(decoder(tokens), theirs, rtol=0, atol=1e-5)
        decoder.setup_caches(2, torch.float32, decoder_max_seq_len=32)
        steps = [decoder(tokens[:, :2])]
        steps += [decoder(tokens[:, p:p + 1]) for p in range(2, tokens.size(1))]
        torch.testing.assert_close(torch.cat(steps, dim=1), theirs, rtol=0, atol=1e-5)
        decoder.teardown_caches()
        for layer in decoder.layers:  # the cap matters: without it the logits move
            layer.attn.softcap = None
        assert (decoder(tokens) - theirs).abs().max() > 1e-4  # ten times the tolerance


def test_a_stated_null_is_not_replaced_by_the_default(tmp_path):
    """Gemma 2's config class caps logits at 30 and scores at 50 by default; a config.json
    stating null for them means no cap, as transformers reads it."""
    torch.manual_seed(0)
    transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        final_logit_softcapping=None, attn_logit_softcapping=None)).save_pretrained(tmp_path)
    decoder = load_decoder(tmp_path)
    assert decoder.final_softcap is None and decoder.layers[0].attn.softcap is None
    config = json.loads((tmp_path / "config.json").read_text())
    del config["final_logit_softcapping"]  # left out: the class default
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_decoder(tmp_path).final_softcap == 30.0

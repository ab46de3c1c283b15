"""HF -> native -> HF and HF -> meta -> HF give back the transformers model itself: the same
config.json (token ids, sliding window, activation spelling, dtype, RoPE spelling, ...) and,
with transformers as the reference, the same logits. Sliding windows are part of the native
model: it computes transformers' windowed model past the window, and says nothing about it."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fusesurgery import load_decoder
from fusesurgery.cli.app import app
from fusesurgery.write import convert_checkpoint
from fusesurgery.write.side_files import HF_CONFIG_SIDE_FILE
from tests.fusion_inputs import save_encoder
from tests.tiny_models import LLAMA3_SCALING, save_tiny_hf_decoder

transformers = pytest.importorskip("transformers")

# Sliding windows of 8 tokens under 64 positions, run on 16 tokens, so that they matter.
CASES = {
    "mistral-window": ("mistral", dict(sliding_window=8, max_position_embeddings=64,
                                       bos_token_id=7, eos_token_id=9)),
    "llama-ids-swish": ("llama", dict(bos_token_id=11, eos_token_id=[12, 13], pad_token_id=0,
                                      hidden_act="swish", rms_norm_eps=1e-5,
                                      max_position_embeddings=64,
                                      rope_parameters={"rope_theta": 500_000.0,
                                                       **LLAMA3_SCALING})),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                   max_position_embeddings=64, tie_word_embeddings=True,
                                   bos_token_id=5, eos_token_id=6)),
    # head_dim 12, not hidden_size / heads = 8: Mistral NeMo's and Qwen3's kind of config
    "mistral-nemo-head-dim": ("mistral", dict(head_dim=12, sliding_window=None)),
    "qwen3-head-dim": ("qwen3", dict(head_dim=12, tie_word_embeddings=True, rope_theta=1e6)),
}
WINDOWED = {"mistral-window", "qwen2-window"}
TOKENS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def _config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def _logits(directory, tokens=TOKENS) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(tokens).logits


@pytest.fixture(params=sorted(CASES))
def original(request, tmp_path):
    family, settings = CASES[request.param]
    return request.param, save_tiny_hf_decoder(family, tmp_path / "hf", **settings)


# (a Meta params.json cannot express Qwen2's q/k/v biases nor Qwen3's q/k norms)
@pytest.mark.parametrize(("case", "via"), [(case, via) for case in sorted(CASES)
                                           for via in ("native", "meta")
                                           if not (via == "meta" and case.startswith("qwen"))])
def test_round_trip_gives_back_the_transformers_model(case, via, tmp_path):
    family, settings = CASES[case]
    hf = save_tiny_hf_decoder(family, tmp_path / "hf", **settings)
    there = convert_checkpoint(hf, tmp_path / via, to=via)
    kept = (tmp_path / via / HF_CONFIG_SIDE_FILE).read_bytes()
    assert kept == (hf / "config.json").read_bytes()  # the source's own file, unchanged
    back = convert_checkpoint(tmp_path / via, tmp_path / "back", to="hf")

    assert _config(tmp_path / "back") == _config(hf)
    assert torch.equal(_logits(tmp_path / "back"), _logits(hf))

    # the window is modelled: nothing to say about it either way
    assert [note for note in (*there.notes, *back.notes) if "sliding_window" in note] == []


def test_the_native_model_is_transformers_past_the_window(original, tmp_path):
    """The native model is transformers' on all 16 tokens, twice the window where there is
    one (the windowed layers' keys before p - 7 are out of sight)."""
    case, hf = original
    convert_checkpoint(hf, tmp_path / "native")
    native = load_decoder(tmp_path / "native", dtype=torch.float32).eval()
    windows = {layer.attn.sliding_window for layer in native.layers}
    assert windows == ({8} if case in WINDOWED and case.startswith("mistral") else
                       {None, 8} if case in WINDOWED else {None})
    with torch.no_grad():
        ours = native(TOKENS)
    torch.testing.assert_close(ours, _logits(hf), rtol=0, atol=1e-5)
    if case in WINDOWED:  # and the window matters on these tokens
        for layer in native.layers:
            layer.attn.sliding_window = None
        with torch.no_grad():
            assert not torch.allclose(native(TOKENS)[:, 8:], ours[:, 8:], rtol=0, atol=1e-3)


def test_without_the_kept_file_the_config_is_the_native_models(original, tmp_path):
    """A native checkpoint with no hf_config.json gets a config that makes transformers
    compute the native model: its window as the family spells it (a Mistral without one says
    sliding_window null, where transformers would otherwise apply 4096), and hidden_act is
    stated."""
    case, hf = original
    convert_checkpoint(hf, tmp_path / "native")
    (tmp_path / "native" / HF_CONFIG_SIDE_FILE).unlink()
    back = convert_checkpoint(tmp_path / "native", tmp_path / "back", to="hf")
    assert not [note for note in back.notes if "sliding_window" in note]
    config = _config(tmp_path / "back")
    assert config["hidden_act"] == "silu"
    if CASES[case][0] == "mistral":
        assert config["sliding_window"] == (8 if case in WINDOWED else None)
    if case == "qwen2-window":
        assert config["use_sliding_window"] is True and config["layer_types"] == [
            "full_attention", "sliding_attention"]
    native = load_decoder(tmp_path / "native", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(_logits(tmp_path / "back"), native(TOKENS), rtol=0,
                                   atol=1e-5)


def test_what_the_native_side_changes_is_written_in_the_bases_spelling(tmp_path):
    """An override (here the RoPE base) and a cast reach the kept config: transformers 5's
    rope_parameters and dtype keep their spelling, nothing else moves."""
    family, settings = CASES["mistral-window"]
    hf = save_tiny_hf_decoder(family, tmp_path / "hf", **settings)
    convert_checkpoint(hf, tmp_path / "native", overrides={"rope_base": 20_000.0},
                       dtype=torch.bfloat16)
    kept = json.loads((tmp_path / "native" / HF_CONFIG_SIDE_FILE).read_text())
    assert kept == {**_config(hf), "dtype": "bfloat16"}
    convert_checkpoint(tmp_path / "native", tmp_path / "meta", to="meta")
    convert_checkpoint(tmp_path / "meta", tmp_path / "back", to="hf")
    expected = _config(hf)
    expected["dtype"] = "bfloat16"
    expected["rope_parameters"] = {**expected["rope_parameters"], "rope_theta": 20_000.0}
    assert _config(tmp_path / "back") == expected
    assert "rope_theta" not in expected and "torch_dtype" not in expected


def test_fuse_keeps_the_window(tmp_path):
    """The fused model carries the window (recorded in fusion_config.json) and says nothing
    about it; validate --against passes."""
    family, settings = CASES["mistral-window"]
    hf = save_tiny_hf_decoder(family, tmp_path / "hf", **settings)
    encoder = save_encoder("clip", tmp_path)
    runner = CliRunner()
    text = runner.invoke(app, ["fuse", str(encoder), str(hf), "-o", str(tmp_path / "a"),
                                "--every", "2"])
    assert text.exit_code == 0, text.output
    assert [line for line in text.stderr.splitlines() if "sliding_window" in line] == []
    decoder = json.loads((tmp_path / "a" / "fusion_config.json").read_text())["decoder"]
    assert (decoder["sliding_window"], decoder["sliding_layers"]) == (8, [0, 1])
    result = runner.invoke(app, ["validate", str(tmp_path / "a"), "--against", str(hf),
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["identity"] is True

"""HF -> native -> HF and HF -> meta -> HF give back the transformers model itself: the same
config.json (token ids, sliding window, activation spelling, dtype, RoPE spelling, ...) and,
with transformers as the reference, the same logits. Settings the native model cannot compute
are reported, once, by convert and by fuse."""

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

    window_notes = [note for note in (*there.notes, *back.notes) if "sliding_window" in note]
    if case in WINDOWED:
        # one line each way: the native model is not the windowed one
        assert window_notes == [
            "sliding_window 8 is not modelled: transformers applies it, the native model "
            "attends to every earlier token, so the two agree only on sequences of at most 8 "
            "tokens"] * 2
    else:
        assert window_notes == []


def test_the_window_note_is_true(original, tmp_path):
    """The native model is transformers' on 8 tokens and, where a window is used, not on 16."""
    case, hf = original
    convert_checkpoint(hf, tmp_path / "native")
    native = load_decoder(tmp_path / "native", dtype=torch.float32).eval()
    with torch.no_grad():
        ours = native(TOKENS)
    theirs = _logits(hf)
    torch.testing.assert_close(ours[:, :8], theirs[:, :8], rtol=0, atol=1e-5)
    differs = not torch.allclose(ours[:, 8:], theirs[:, 8:], rtol=0, atol=1e-3)
    assert differs == (case in WINDOWED)


def test_without_the_kept_file_the_config_is_the_native_models(original, tmp_path):
    """A native checkpoint with no hf_config.json gets a config that makes transformers
    compute the native model: a Mistral's says sliding_window null (transformers would
    otherwise apply 4096), and hidden_act is stated."""
    case, hf = original
    convert_checkpoint(hf, tmp_path / "native")
    (tmp_path / "native" / HF_CONFIG_SIDE_FILE).unlink()
    back = convert_checkpoint(tmp_path / "native", tmp_path / "back", to="hf")
    assert not [note for note in back.notes if "sliding_window" in note]
    config = _config(tmp_path / "back")
    assert config["hidden_act"] == "silu"
    assert ("sliding_window" in config and config["sliding_window"] is None) == (
        CASES[case][0] == "mistral")
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


def test_fuse_notes_a_window_it_drops(tmp_path):
    family, settings = CASES["mistral-window"]
    hf = save_tiny_hf_decoder(family, tmp_path / "hf", **settings)
    encoder = save_encoder("clip", tmp_path)
    runner = CliRunner()
    text = runner.invoke(app, ["fuse", str(encoder), str(hf), "-o", str(tmp_path / "a"),
                                "--every", "2"])
    assert text.exit_code == 0, text.output
    notes = [line for line in text.stderr.splitlines() if "sliding_window" in line]
    assert notes == ["note: sliding_window 8 is not modelled: transformers applies it, the "
                     "native model attends to every earlier token, so the two agree only on "
                     "sequences of at most 8 tokens"]
    as_json = runner.invoke(app, ["fuse", str(encoder), str(hf), "-o", str(tmp_path / "b"),
                                  "--every", "2", "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["notes"] == [notes[0].removeprefix("note: ")]

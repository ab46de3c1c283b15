"""SmolLM3, the family added as one file (fusesurgery/families/smollm3.py) plus the native
option it needs: no RoPE in the layers ``no_rope_layers`` names (every 4th by default).

Sources are written by transformers' own ``SmolLM3ForCausalLM``. ``load_decoder`` equals it
(float32, at most 1e-5, at 8 and 40 tokens); ``fuse`` -> ``validate --against`` (every row
passes, identity) -> ``unfuse`` bitwise -> ``diff --values`` identical; ``convert --to
native`` renames only (torchtune has no SmolLM3: the native layout keeps transformers'
rotate-half rows) and back to hf bitwise with the same config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusesurgery import detect_checkpoint, load_decoder
from fusesurgery.config import DECODER_PRESETS
from fusesurgery.convert.configs import hf_config_dict, meta_config_dict
from fusesurgery.errors import ConfigError
from fusesurgery.families.smollm3 import read_no_rope_layers
from tests.cli.test_family_lifecycle import _assert_bitwise, _tensors, cli, save_clip
from tests.tiny_models import torchtune_state_dict

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)

# name -> (config settings, dtype, max shard size, layers without RoPE)
CASES = {
    "default-interval-tied-f32": (dict(), torch.float32, None, (3,)),
    "interval-2-untied-bf16-sharded": (dict(no_rope_layer_interval=2, tie_word_embeddings=False),
                                       torch.bfloat16, "8KB", (1, 3)),
    "explicit-flags-f32": (dict(no_rope_layers=[0, 1, 1, 0]), torch.float32, None, (0, 3)),
}


def save_smollm3(case: str, directory: Path) -> Path:
    settings, dtype, shard, _ = CASES[case]
    torch.manual_seed(0)
    model = transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(**SIZES, **settings))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.5)
    model.to(dtype).save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    return directory


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_decoder_equals_transformers(tmp_path, case):
    hf = save_smollm3(case, tmp_path / "hf")
    *_, no_rope = CASES[case]
    detected = detect_checkpoint(hf)
    assert (detected.family, detected.config.no_rope_layers) == ("smollm3", no_rope)
    assert detected.provenance["no_rope_layers"] == "read"
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    decoder = load_decoder(hf, dtype=torch.float32).eval()
    assert [i for i, layer in enumerate(decoder.layers)
            if layer.attn.pos_embeddings is None] == list(no_rope)
    for length in (8, 40):
        tokens = torch.randint(0, SIZES["vocab_size"], (2, length),
                               generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            ours, theirs = decoder(tokens), reference(tokens).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fuse_validate_unfuse_diff_convert(tmp_path, case):
    decoder = save_smollm3(case, tmp_path / "hf")
    encoder = save_clip(tmp_path / "clip")
    fused = tmp_path / "fused"
    result = cli("fuse", encoder, decoder, "-o", fused, "--every", "2")
    assert result.exit_code == 0, result.output
    config = json.loads((fused / "fusion_config.json").read_text())
    assert config["decoder"]["family"] == "smollm3"
    assert tuple(config["decoder"]["no_rope_layers"]) == CASES[case][3]

    result = cli("validate", fused, "--against", decoder, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["identity"], report
    assert {check["status"] for check in report["checks"]} == {"pass"}

    unfused = tmp_path / "unfused"
    result = cli("unfuse", fused, "-o", unfused)
    assert result.exit_code == 0, result.output
    original = _tensors(decoder)
    _assert_bitwise(_tensors(unfused), original)
    assert (unfused / "config.json").read_bytes() == (decoder / "config.json").read_bytes()
    assert cli("diff", "--values", decoder, unfused).exit_code == 0

    native = tmp_path / "native"
    result = cli("convert", decoder, "-o", native, "--to", "native")
    assert result.exit_code == 0, result.output
    # renamed as torchtune renames every family, rows not permuted (as its Qwen2/Qwen3)
    reference_config = transformers.AutoConfig.from_pretrained(decoder)
    _assert_bitwise(_tensors(native), torchtune_state_dict(original, "qwen3", reference_config))
    assert cli("diff", "--values", decoder, native).exit_code == 0
    back = tmp_path / "back"
    result = cli("convert", native, "-o", back, "--to", "hf")
    assert result.exit_code == 0, result.output
    _assert_bitwise(_tensors(back), original)
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (decoder / "config.json").read_text())


def test_a_config_json_written_from_scratch_loads_in_transformers(tmp_path):
    """Without the source's config.json to start from, the flags are written as SmolLM3
    spells them and transformers builds the same layers without RoPE."""
    config = DECODER_PRESETS["tiny"].replace(family="smollm3", no_rope_layers=(1, 3))
    document = hf_config_dict(config)
    assert document["no_rope_layers"] == [1, 0, 1, 0]
    loaded = transformers.AutoConfig.for_model(**document)
    assert loaded.no_rope_layers == [1, 0, 1, 0]
    assert read_no_rope_layers(document, "config.json") == (1, 3)


def test_layers_without_rope_only_where_a_config_can_say_so():
    tiny = DECODER_PRESETS["tiny"]
    with pytest.raises(ConfigError, match="a llama config.json cannot express no_rope_layers"):
        hf_config_dict(tiny.replace(no_rope_layers=(3,)))
    with pytest.raises(ConfigError, match="cannot express layers without RoPE"):
        meta_config_dict(tiny.replace(no_rope_layers=(3,)))
    with pytest.raises(ConfigError, match="no_rope_layers must be ascending distinct layer"):
        tiny.replace(no_rope_layers=(4,))
    with pytest.raises(ConfigError, match="no_rope_layers has 3 flags for 4 layers"):
        read_no_rope_layers({"no_rope_layers": [1, 1, 0], "num_hidden_layers": 4}, "config.json")
    with pytest.raises(ConfigError, match="states neither no_rope_layers nor num_hidden_layers"):
        read_no_rope_layers({}, "config.json")


def test_the_transformers_export_computes_the_source(tmp_path):
    """The fused SmolLM3 exported for transformers: with zero gates its text logits are the
    source SmolLM3ForCausalLM's, bit for bit (its layers without RoPE included)."""
    from fusesurgery import export_transformers, fuse

    decoder = save_smollm3("default-interval-tied-f32", tmp_path / "hf")
    fuse(save_clip(tmp_path / "clip"), decoder, tmp_path / "fused", every=2)
    export_transformers(tmp_path / "fused", tmp_path / "export")
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        tmp_path / "export", trust_remote_code=True, dtype=torch.float32).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        decoder, dtype=torch.float32).eval()
    tokens = torch.randint(3, SIZES["vocab_size"], (2, 12),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, reference(tokens).logits)

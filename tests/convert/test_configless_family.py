"""A native (torchtune-layout) decoder without a config: Llama's, SmolLM3's and Phi-3's native
key sets are the same, but Llama's q/k rows are interleaved and the other two's rotate halves,
so nothing in the weights tells them apart. Taken as Llama, a note says which families share
the layout and how to name one; named (``family`` in the overrides, ``--family``), the family
is checked against the registry, a config that states another and the weights' shapes, and a
SmolLM3 computes transformers' logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusesurgery import load_decoder
from fusesurgery.convert.detect import detect_model
from fusesurgery.errors import ConfigError
from fusesurgery.write import convert_checkpoint
from tests.convert.conftest import safetensors_infos
from tests.hardening.conftest import assert_one_line_error, cli

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# every 2nd layer without RoPE (layers 1 and 3), its own RoPE base and epsilon
SMOLLM3 = dict(no_rope_layer_interval=2, rope_theta=50_000.0, rms_norm_eps=1e-5,
               pad_token_id=0, bos_token_id=None, eos_token_id=None)
# what a user who knows the model states for it
GIVEN = dict(family="smollm3", num_heads=4, num_kv_heads=2, no_rope_layers=(1, 3),
             rope_base=50_000.0, norm_eps=1e-5)


def configless_native_smollm3(tmp_path: Path) -> tuple[Path, Path]:
    """(the transformers source, its native weights alone: no config.json beside them)."""
    torch.manual_seed(0)
    model = transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(**SIZES, **SMOLLM3))
    with torch.no_grad():  # random q/k rows and norms: a wrong row order shows in the logits
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.5)
    source = tmp_path / "hf"
    model.save_pretrained(source)
    convert_checkpoint(source, tmp_path / "native", to="native")
    bare = tmp_path / "weights.safetensors"
    (tmp_path / "native" / "model.safetensors").rename(bare)
    return source, bare


def test_a_named_family_computes_transformers_logits(tmp_path):
    source, bare = configless_native_smollm3(tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32).eval()
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = reference(tokens).logits
        ours = load_decoder(bare, overrides=GIVEN).eval()(tokens)
        as_llama = load_decoder(bare, overrides={k: v for k, v in GIVEN.items()
                                                  if k != "family"}).eval()(tokens)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # what the note warns of: read as Llama, the q/k rows pair the wrong dimensions
    assert (as_llama - theirs).abs().max() > 1e-3


def test_taken_as_llama_the_note_names_the_families_that_share_the_layout(tmp_path):
    _, bare = configless_native_smollm3(tmp_path)
    detected = detect_model(safetensors_infos(bare), overrides={"num_heads": 4})
    assert (detected.family, detected.provenance["family"]) == ("llama", "default")
    note = next(n for n in detected.notes if n.startswith("no config names the family"))
    for name in ("SmolLM3", "Phi-3", "Mistral", "rotate-half", "--family", "family="):
        assert name in note, note
    named = detect_model(safetensors_infos(bare), overrides={"num_heads": 4,
                                                              "family": "smollm3"})
    assert (named.family, named.provenance["family"]) == ("smollm3", "given")
    assert not any(n.startswith("no config names the family") for n in named.notes)
    result = cli("inspect", bare, "--num-heads", "4")
    assert result.exit_code == 0, result.output
    assert "no config names the family" in " ".join(result.output.split())


@pytest.mark.parametrize(("family", "message"), [
    ("nope", "--family 'nope' is not a decoder family; valid: "),
    ("qwen3", "--family qwen3: these weights are no Qwen3 decoder: they lack "
              "layers.0.attn.q_norm.scale"),
    ("gemma3", "--family gemma3: these weights are no Gemma 3 decoder"),
])
def test_a_family_the_weights_are_not_is_refused_in_one_line(tmp_path, family, message):
    _, bare = configless_native_smollm3(tmp_path)
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        detect_model(safetensors_infos(bare), overrides={"num_heads": 4, "family": family})
    result = cli("convert", bare, "-o", tmp_path / "out", "--to", "hf", "--num-heads", "4",
                 "--family", family)
    assert_one_line_error(result, message, code=2)
    assert not (tmp_path / "out").exists()


def test_a_family_the_config_contradicts_is_refused(tmp_path):
    source, _ = configless_native_smollm3(tmp_path)
    with pytest.raises(ConfigError, match="--family llama contradicts config.json, which "
                                          "states smollm3"):
        load_decoder(source, overrides={"family": "llama"})


def test_diff_takes_family_and_checks_it_as_the_other_commands(tmp_path):
    source, bare_native = configless_native_smollm3(tmp_path)
    bare_hf = tmp_path / "hf-weights.safetensors"
    (source / "model.safetensors").rename(bare_hf)  # transformers' names, no config either
    heads = ("--values", "--num-heads", "4", "--num-kv-heads", "2")
    # taken as Llama, transformers' rotate-half q/k rows are permuted into pairs: not equal
    as_llama = cli("diff", bare_hf, bare_native, *heads)
    assert as_llama.exit_code == 1, as_llama.output
    assert "q_proj" in as_llama.stdout
    named = cli("diff", bare_hf, bare_native, *heads, "--family", "smollm3")
    assert named.exit_code == 0, named.output
    assert "identical" in named.stdout
    for family, message in [
        ("nope", "--family 'nope' is not a decoder family; valid: "),
        ("qwen3", "--family qwen3: these weights are no Qwen3 decoder: they lack "
                  "layers.0.attn.q_norm.scale"),
    ]:  # refused without a value compared or a head count given, as by the others
        assert_one_line_error(cli("diff", bare_hf, bare_native, "--no-values", "--family",
                                  family), message, code=2)

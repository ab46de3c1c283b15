"""A bare transformers decoder (``LlamaModel``, ``Qwen2Model`` saved on their own): the same
Hugging Face names without the ``model.`` prefix."""

import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

from fusesurgery import load_decoder
from fusesurgery.cli.app import app
from fusesurgery.convert.detect import detect_layout
from fusesurgery.convert.keymaps import keys_to_native
from fusesurgery.errors import ConfigError
from fusesurgery.io import open_checkpoint
from fusesurgery.write import convert_checkpoint
from tests.tiny_models import TINY_DECODER

FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
}


def save_bare(tmp_path, family: str, tied: bool = True):
    """Save the inner model of a tied ``*ForCausalLM``; return the wrapper as the reference."""
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY_DECODER, tie_word_embeddings=tied)).eval()
    model.model.save_pretrained(tmp_path / "bare")
    return model, tmp_path / "bare"


def test_bare_keys_are_hf_decoder_keys():
    bare = ["embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "norm.weight"]
    assert detect_layout(bare) == ("decoder", "hf")
    assert detect_layout(["layers.0.self_attn.q_proj.weight"]) == ("decoder", "hf")
    # the native layout also has layers.*, but not self_attn
    assert detect_layout(["layers.0.attn.q_proj.weight", "layers.0.sa_norm.scale"]) == (
        "decoder", "native")
    assert keys_to_native(bare, "hf").mapping == {
        "embed_tokens.weight": "tok_embeddings.weight",
        "layers.0.self_attn.q_proj.weight": "layers.0.attn.q_proj.weight",
        "norm.weight": "norm.scale",
    }


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_bare_tied_decoder_loads_and_converts(tmp_path, family):
    model, bare = save_bare(tmp_path, family)
    with open_checkpoint(bare) as source:
        assert not any(key.startswith("model.") for key in source.keys())
    tokens = torch.randint(0, TINY_DECODER["vocab_size"], (1, 9))
    with torch.no_grad():
        expected = model(tokens).logits
        torch.testing.assert_close(load_decoder(bare)(tokens), expected, rtol=0, atol=1e-5)
    # written back in the prefixed spelling, which the *ForCausalLM class loads
    convert_checkpoint(bare, tmp_path / "hf", to="hf")
    with open_checkpoint(tmp_path / "hf") as written:
        assert all(key.startswith("model.") for key in written.keys())
    reloaded = FAMILIES[family][1].from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, expected)


def test_a_bare_untied_decoder_has_no_head(tmp_path):
    _, bare = save_bare(tmp_path, "llama", tied=False)
    with pytest.raises(ConfigError, match="bare transformers decoder"):
        load_decoder(bare)
    result = CliRunner().invoke(app, ["inspect", str(bare)])
    assert result.exit_code == 2
    assert "no lm_head.weight" in result.stderr and "Traceback" not in result.output

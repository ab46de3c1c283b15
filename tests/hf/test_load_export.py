"""``fusesurgery.load_fused(EXPORT)``: a transformers export (``convert --to transformers``)
loads in memory as the native ``DeepFusionModel`` that ``load_fused`` of the fused checkpoint
returns: the same config, the same logits bitwise, its tensors read lazily (views of the
file wherever no row has to move), and the refusals ``convert DIR --to native`` gives.

Sources are the bundled examples (written by transformers' own classes) fused, their gates
opened, and exported (``tests/hf/conftest.py``); the other families' exports are checked in
``test_export.py``, ``test_export_families.py`` and ``test_export_dino.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import fusesurgery
from fusesurgery.errors import FuseSurgeryError
from tests.hf.conftest import mapped_keys

transformers = pytest.importorskip("transformers")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _logits(model, image_id: int) -> torch.Tensor:
    """``[2, 6, v]`` logits on tokens with an image (text before it sees none)."""
    ids = torch.tensor([[1, 5, image_id, 7, 3, 11], [2, image_id, 6, 8, 10, 12]])
    encoder = model.fused_config.encoder
    pixels = torch.randn(2, 3, encoder.image_size, encoder.image_size,
                         generator=torch.Generator().manual_seed(3))
    seen = (ids == image_id).cumsum(dim=1) > 0
    with torch.no_grad():
        return model(ids, encoder_input={"images": pixels},
                     encoder_mask=seen[:, :, None].expand(-1, -1, encoder.seq_len))


def test_an_export_loads_as_the_native_model_bitwise(gated_example, gated_export):
    native = fusesurgery.load_fused(gated_example)
    exported = fusesurgery.load_fused(gated_export)
    assert type(exported) is type(native)
    assert exported.fused_config == native.fused_config
    assert exported.fused_config.trained and any(exported.fused_config.gates.values())
    assert exported.fused_path == gated_export
    image_id = native.fused_config.new_tokens[0].id
    logits = _logits(exported, image_id)
    assert torch.equal(logits, _logits(native, image_id))
    # the gates act: the same model with them shut computes something else
    with torch.no_grad():
        for key, tensor in exported.state_dict(keep_vars=True).items():
            if key.endswith(("ca_scale.scale", "mlp_scale.scale")) and "fusion_layer" in key:
                tensor.zero_()
    assert not torch.equal(_logits(exported, image_id), logits)


def test_trainable_parameters_are_load_fuseds(gated_example, gated_export):
    for flags in ({}, {"decoder_trainable": True, "fusion_trainable": False}):
        native = fusesurgery.load_fused(gated_example, **flags)
        exported = fusesurgery.load_fused(gated_export, **flags)
        assert ({n for n, p in exported.named_parameters() if p.requires_grad}
                == {n for n, p in native.named_parameters() if p.requires_grad})


def test_parameters_are_views_of_the_file_where_no_row_moves(gated_example, gated_export):
    native = fusesurgery.load_fused(gated_example)
    exported = fusesurgery.load_fused(gated_export)
    keys = set(native.state_dict())
    assert mapped_keys(native, gated_example) == keys  # the native load copies nothing
    copied = keys - mapped_keys(exported, gated_export)
    # Llama's q/k rows are stored in transformers' rotary order: those alone are rewritten
    assert copied == {key for key in keys if key.startswith("decoder.layers.")
                      and ".fusion_layer." not in key
                      and key.endswith(("attn.q_proj.weight", "attn.k_proj.weight"))}
    assert copied


def test_dtype_device_and_the_decoder_alone(gated_example, gated_export):
    native = fusesurgery.load_fused(gated_example, dtype=torch.bfloat16)
    exported = fusesurgery.load_fused(gated_export, dtype=torch.bfloat16, device="cpu")
    assert {t.dtype for t in exported.state_dict().values()} == {torch.bfloat16}
    assert exported.fused_config == native.fused_config
    image_id = native.fused_config.new_tokens[0].id
    assert torch.equal(_logits(exported, image_id), _logits(native, image_id))

    decoder = fusesurgery.load_fused(gated_export, part="decoder")
    expected = fusesurgery.load_fused(gated_example, part="decoder")
    tokens = torch.tensor([[1, 5, 9, 7, 3]])
    with torch.no_grad():
        assert torch.equal(decoder(tokens), expected(tokens))


@pytest.mark.parametrize(("arguments", "fragment"), [
    ({"dtype": "fp16"}, "dtype"),
    ({"device": "tpu:9"}, "device"),
    ({"part": "tower"}, "unknown part"),
    ({"fusion_trainable": 1}, "fusion_trainable must be True or False"),
])
def test_bad_arguments_are_refused_as_for_a_native_checkpoint(gated_export, arguments,
                                                               fragment):
    with pytest.raises(FuseSurgeryError, match=fragment):
        fusesurgery.load_fused(gated_export, **arguments)


def _edited(directory: Path, edit) -> None:
    document = json.loads((directory / "config.json").read_text())
    edit(document)
    (directory / "config.json").write_text(json.dumps(document))


@pytest.mark.parametrize("damage", ["modeling file", "sizes", "unit offset", "shard"])
def test_half_an_export_gets_convert_to_natives_one_line(gated_export, damage, tmp_path):
    from typer.testing import CliRunner

    from fusesurgery.cli.app import app

    copy = tmp_path / "copy"
    shutil.copytree(gated_export, copy)
    if damage == "modeling file":
        (copy / "modeling_fusesurgery_fused.py").unlink()
    elif damage == "sizes":
        _edited(copy, lambda c: c["fusesurgery_fusion_config"]["decoder"].update(
            intermediate_size=40))
    elif damage == "unit offset":
        _edited(copy, lambda c: c.update(fusion_norm_unit_offset=True))
    else:
        sorted(copy.glob("*.safetensors"))[-1].unlink()
    result = CliRunner().invoke(app, ["convert", str(copy), "--to", "native",
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    with pytest.raises(FuseSurgeryError) as caught:
        fusesurgery.load_fused(copy)
    assert str(caught.value) in line
    assert "\n" not in str(caught.value)


def test_an_export_fused_straight_into_the_layout_names_what_loads_it(tmp_path):
    torch.manual_seed(0)
    transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64)).save_pretrained(tmp_path / "olmo2")
    for decoder, family in ((tmp_path / "olmo2", "family 'olmo2'"),
                            (EXAMPLES / "tiny-llama", "fuse the sources without --format")):
        out = tmp_path / f"{decoder.name}-fused"
        fusesurgery.fuse(EXAMPLES / "tiny-clip-vision", decoder, out, format="transformers",
                         every=2)
        with pytest.raises(FuseSurgeryError) as caught:
            fusesurgery.load_fused(out)
        message = str(caught.value)
        assert family in message and "\n" not in message
        assert f"AutoModelForImageTextToText.from_pretrained({str(out)!r})" in message


def test_save_fused_of_an_exports_model_is_the_native_checkpoint(gated_example, gated_export,
                                                                  tmp_path):
    """``save_fused`` reopens the export the model came from: unchanged tensors are shown
    unchanged (no false ``trained_originals``), the export's own processor file stays
    behind, and what training changed is recorded."""
    from fusesurgery.io import open_checkpoint

    model = fusesurgery.load_fused(gated_export)
    fusesurgery.save_fused(model, tmp_path / "saved")
    assert (fusesurgery.read_fused_config(tmp_path / "saved")
            == fusesurgery.read_fused_config(gated_example))
    assert not (tmp_path / "saved" / "processor_config.json").exists()
    assert (tmp_path / "saved" / "preprocessor_config.json").read_bytes() == (
        gated_example / "preprocessor_config.json").read_bytes()
    with open_checkpoint(tmp_path / "saved") as saved, open_checkpoint(gated_example) as fused:
        assert set(saved.keys()) == set(fused.keys())
        assert all(torch.equal(saved.get_tensor(k), fused.get_tensor(k)) for k in fused.keys())

    with torch.no_grad():
        model.decoder.norm.scale.add_(1.0)
    fusesurgery.save_fused(model, tmp_path / "trained")
    config = fusesurgery.read_fused_config(tmp_path / "trained")
    assert config.trained_originals == ("decoder.norm.scale",)


def test_the_processor_and_generate_take_an_exports_model(gated_example, gated_export):
    """The model's directory is the export: its tokenizer and image preprocessing prepare
    the inputs, and greedy tokens are the native model's."""
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(4))
    tokens = []
    for directory in (gated_export, gated_example):
        model = fusesurgery.load_fused(directory)
        inputs = fusesurgery.prepare_inputs(model, "hello <|image|> there", [image])
        tokens.append(fusesurgery.generate(model, inputs, max_new_tokens=4).tokens)
    assert torch.equal(*tokens)

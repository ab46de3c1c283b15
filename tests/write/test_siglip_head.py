"""SigLIP's attention-pooling head through ``convert``: transformers must agree with what was
written. An HF -> native -> HF round trip gives back the head (``pooler_output`` bitwise the
original's); a native tower without one gets ``vision_use_head: false``, so transformers builds
no head rather than a random one. The native weights file stays strict-loadable (no head keys
among the native ones), and fuse / unfuse are not disturbed by the head file."""

import json

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from fusesurgery import load_encoder
from fusesurgery.cli.app import app
from fusesurgery.convert import NATIVE_VISION_KEYS
from fusesurgery.convert.keymaps import split_layer_index
from fusesurgery.convert.pooling_head import HEAD_FILE, HEAD_PREFIX
from fusesurgery.errors import ConfigError
from fusesurgery.io import open_checkpoint
from fusesurgery.write import convert_checkpoint
from tests.fusion_inputs import save_decoder
from tests.tiny_models import TINY_TEXT, TINY_VISION

HEAD_TENSORS = 11  # probe, in_proj w/b, out_proj w/b, layernorm w/b, fc1 w/b, fc2 w/b


def _cli(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def _save(tmp_path, kind: str = "vision"):
    """A seeded SiglipVisionModel (saved bare by transformers 5) or a whole SiglipModel
    (``vision_model.*`` keys), and the vision tower to compare against."""
    torch.manual_seed(0)
    if kind == "vision":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY_VISION)).eval()
        tower = model
    else:
        model = tf.SiglipModel(tf.SiglipConfig(vision_config=TINY_VISION,
                                               text_config=TINY_TEXT)).eval()
        tower = model.vision_model
    model.save_pretrained(tmp_path / "hf")
    return tower, tmp_path / "hf"


def _pixels():
    generator = torch.Generator().manual_seed(1)
    size = TINY_VISION["image_size"]
    return torch.randn(2, 3, size, size, generator=generator)


def _load(directory):
    model, info = tf.SiglipVisionModel.from_pretrained(directory, output_loading_info=True)
    return model.eval(), info


@pytest.mark.parametrize("kind", ["vision", "two-tower"])
def test_hf_native_hf_keeps_the_pooling_head(tmp_path, kind):
    tower, hf = _save(tmp_path, kind)
    to_native = convert_checkpoint(hf, tmp_path / "native")
    native = tmp_path / "native"
    assert not any("pooling head" in reason for _, reason in to_native.plan.dropped)
    assert len(to_native.notes) == 1 and HEAD_FILE in to_native.notes[0]
    # the native weights hold native keys only (a strict loader takes them); the head is
    # in its own file, under transformers' names
    with open_checkpoint(native) as weights:
        assert {split_layer_index(key)[0] for key in weights.keys()} <= set(NATIVE_VISION_KEYS)
    with safe_open(native / HEAD_FILE, "pt") as head:
        assert len(head.keys()) == HEAD_TENSORS
        assert all(key.startswith(HEAD_PREFIX) for key in head.keys())
    load_encoder(native)  # strict load of the native tower is unaffected

    back = convert_checkpoint(native, tmp_path / "hf2", to="hf")
    assert len(back.plan) == len(to_native.plan) + HEAD_TENSORS
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["vision_use_head"] is True
    reloaded, info = _load(tmp_path / "hf2")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        ours, theirs = reloaded(_pixels()), tower(_pixels())
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)
    assert torch.equal(ours.pooler_output, theirs.pooler_output)


def test_native_without_head_says_so_to_transformers(tmp_path):
    tower, hf = _save(tmp_path)
    convert_checkpoint(hf, tmp_path / "native")
    (tmp_path / "native" / HEAD_FILE).unlink()  # a native tower from elsewhere: no head
    result = _cli("convert", tmp_path / "native", "-o", tmp_path / "hf2", "--to", "hf")
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "vision_use_head: false" in lines[0]
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert config["vision_use_head"] is False
    reloaded, info = _load(tmp_path / "hf2")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not [name for name, _ in reloaded.named_parameters() if "head." in name]
    with torch.no_grad():
        ours, theirs = reloaded(_pixels()), tower(_pixels())
    assert ours.pooler_output is None
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)


def test_cli_prints_one_line_for_the_head(tmp_path):
    _, hf = _save(tmp_path)
    result = _cli("convert", hf, "-o", tmp_path / "native")
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and HEAD_FILE in lines[0], lines
    result = _cli("convert", tmp_path / "native", "-o", tmp_path / "hf2", "--to", "hf", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["dropped"] == {} and len(payload["notes"]) == 1
    # patch conv w/b, positions, post-norm w/b, 16 a layer, the head
    assert payload["tensors"] == 2 + 1 + 2 + TINY_VISION["num_hidden_layers"] * 16 + HEAD_TENSORS


def test_hf_to_hf_and_dtype_carry_the_head(tmp_path):
    tower, hf = _save(tmp_path)
    direct = convert_checkpoint(hf, tmp_path / "hf2", to="hf")
    assert not direct.plan.dropped and not direct.notes
    reloaded, info = _load(tmp_path / "hf2")
    assert not info["missing_keys"]
    with torch.no_grad():
        assert torch.equal(reloaded(_pixels()).pooler_output, tower(_pixels()).pooler_output)

    convert_checkpoint(hf, tmp_path / "native", dtype=torch.bfloat16)
    with safe_open(tmp_path / "native" / HEAD_FILE, "pt") as head:
        assert {head.get_tensor(key).dtype for key in head.keys()} == {torch.bfloat16}
    convert_checkpoint(tmp_path / "native", tmp_path / "hf3", to="hf")
    with safe_open(tmp_path / "hf3" / "model.safetensors", "pt") as out, \
            safe_open(hf / "model.safetensors", "pt") as original:
        probe = out.get_tensor(HEAD_PREFIX + "probe")
        assert torch.equal(probe, original.get_tensor("head.probe").to(torch.bfloat16))


def test_damaged_head_file_is_one_line_and_writes_nothing(tmp_path):
    _, hf = _save(tmp_path)
    convert_checkpoint(hf, tmp_path / "native")
    head_path = tmp_path / "native" / HEAD_FILE
    with safe_open(head_path, "pt") as head:
        tensors = {key: head.get_tensor(key) for key in head.keys()}
    tensors[HEAD_PREFIX + "probe"] = torch.zeros(1, 1, 7)
    save_file(tensors, head_path)
    with pytest.raises(ConfigError, match=r"probe has shape \[1, 1, 7\], expected \[1, 1, 32\]"):
        convert_checkpoint(tmp_path / "native", tmp_path / "hf2", to="hf")
    del tensors[HEAD_PREFIX + "probe"]
    save_file(tensors, head_path)
    result = _cli("convert", tmp_path / "native", "-o", tmp_path / "hf2", "--to", "hf")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "lacks" in result.stderr
    assert not (tmp_path / "hf2").exists()


def test_clip_gets_no_head_field(tmp_path):
    torch.manual_seed(0)
    tf.CLIPVisionModel(tf.CLIPVisionConfig(**TINY_VISION)).save_pretrained(tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "native")
    assert not (tmp_path / "native" / HEAD_FILE).exists()
    back = convert_checkpoint(tmp_path / "native", tmp_path / "hf2", to="hf")
    assert not back.notes
    assert "vision_use_head" not in json.loads((tmp_path / "hf2" / "config.json").read_text())


@pytest.mark.parametrize("encoder_form", ["hf", "native"])
def test_fuse_and_unfuse_with_a_siglip_encoder(tmp_path, encoder_form):
    tower, hf = _save(tmp_path)
    encoder = hf
    if encoder_form == "native":
        convert_checkpoint(hf, tmp_path / "native")
        encoder = tmp_path / "native"
    decoder, _ = save_decoder("llama", tmp_path)
    fused = tmp_path / "fused"
    result = _cli("fuse", encoder, decoder, "-o", fused, "--every", "1")
    assert result.exit_code == 0, result.output
    with open_checkpoint(fused) as out:
        assert not [key for key in out.keys() if ".head." in key]
    result = _cli("validate", fused, "--against", decoder)
    assert result.exit_code == 0, result.output
    result = _cli("unfuse", fused, "-o", tmp_path / "back", "--part", "encoder")
    assert result.exit_code == 0, result.output
    with open_checkpoint(tmp_path / "back") as back, open_checkpoint(encoder) as original:
        assert set(back.keys()) == {key for key in original.keys() if not key.startswith(
            ("head.", HEAD_PREFIX))}
        for key in back.keys():
            assert torch.equal(back.get_tensor(key), original.get_tensor(key)), key
    assert sum("dropped by fuse" in line for line in result.stderr.splitlines()) == (
        encoder_form == "hf")  # the head's 11 keys in one note
    if encoder_form == "hf":  # fuse kept no head, and the config says so to transformers
        reloaded, info = _load(tmp_path / "back")
        assert not info["missing_keys"] and not info["unexpected_keys"]
        with torch.no_grad():
            ours, theirs = reloaded(_pixels()), tower(_pixels())
        assert ours.pooler_output is None
        assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)

"""DINOv2 and DINOv2 with registers as native towers, with sources written by transformers'
own ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (every parameter drawn at random, the
LayerScales, registers and mask token included, so a misplaced or dropped one shows).

``load_encoder`` against transformers at the native image size and others (its own
position-table resize, antialiased for the registers model); ``fuse`` -> ``validate
--against`` -> ``unfuse --part encoder`` bitwise; ``convert --to native`` and back bitwise;
which tokens feed the fusion, recorded; ``prepare_inputs`` / ``generate`` with an image at
another resolution than the tower's; config.json checked against the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fusesurgery
from fusesurgery import load_encoder
from fusesurgery.cli.app import app
from fusesurgery.convert.keymaps import (
    HF_VISION_FAMILY_FROM_NATIVE,
    HF_VISION_FAMILY_TO_NATIVE,
    keys_from_native,
    keys_to_native,
)
from fusesurgery.errors import ConfigError
from fusesurgery.io import open_checkpoint

transformers = pytest.importorskip("transformers")
runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
             image_size=28, patch_size=7)
REGISTERS = 3


def cli(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def save_dinov2(directory: Path, registers: bool, **settings) -> Path:
    if registers:
        config = transformers.Dinov2WithRegistersConfig(
            **SIZES, num_register_tokens=REGISTERS, **settings)
        model = transformers.Dinov2WithRegistersModel(config)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**SIZES, **settings))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5
                            + (1.0 if parameter.dim() == 1 else 0.0))
    model.save_pretrained(directory)
    return directory


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as source:
        return {key: source.get_tensor(key).clone() for key in source.keys()}


def _assert_bitwise(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for key, tensor in ours.items():
        assert tensor.dtype == theirs[key].dtype and tensor.shape == theirs[key].shape, key
        assert torch.equal(tensor.view(torch.uint8), theirs[key].view(torch.uint8)), key


@pytest.mark.parametrize("registers", [False, True], ids=["dinov2", "registers"])
def test_load_encoder_equals_transformers(tmp_path, registers):
    source = save_dinov2(tmp_path / "dino", registers)
    reference = transformers.AutoModel.from_pretrained(source).eval()
    encoder = load_encoder(source).eval()
    penultimate = load_encoder(source, output_layer=-2).eval()
    prefix = 1 + (REGISTERS if registers else 0)
    # native size, a larger square, a non-square grid, and a size that floors to the native
    # grid while not square in pixels (transformers resizes it all the same)
    for height, width in ((28, 28), (42, 42), (42, 35), (30, 28)):
        images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            theirs = reference(pixel_values=images, output_hidden_states=True)
            ours = encoder(images)
            ours_penultimate = penultimate(images)
        grid = (height // 7) * (width // 7)
        assert ours.shape == (2, prefix + grid, 32)
        torch.testing.assert_close(ours, theirs.last_hidden_state, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours_penultimate, theirs.hidden_states[-2], rtol=0,
                                   atol=1e-5)

    # the tokens that feed the fusion: class token + patches, registers left out; or patches
    images = torch.randn(1, 3, 42, 35, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = reference(pixel_values=images).last_hidden_state
        cls_patches = load_encoder(
            source, overrides={"feature_tokens": "cls_and_patches"}).eval()(images)
        patches = load_encoder(source, overrides={"feature_tokens": "patches"}).eval()(images)
    torch.testing.assert_close(cls_patches, torch.cat([full[:, :1], full[:, prefix:]], 1),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(patches, full[:, prefix:], rtol=0, atol=1e-5)


def test_the_registers_resize_is_antialiased(tmp_path):
    """The two model types differ in the position resize alone: the same weights read as a
    plain dinov2 would not match Dinov2WithRegistersModel at a smaller grid."""
    source = save_dinov2(tmp_path / "dino", registers=True)
    assert load_encoder(source).token_pos_embedding.antialias
    plain = load_encoder(source, overrides={"position_antialias": False}).eval()
    reference = transformers.AutoModel.from_pretrained(source).eval()
    images = torch.randn(1, 3, 14, 14, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        difference = (plain(images) - reference(pixel_values=images).last_hidden_state).abs()
    assert difference.max() > 1e-3


def test_key_maps_are_one_to_one_and_complete(tmp_path):
    table = HF_VISION_FAMILY_TO_NATIVE["dinov2"]
    assert {v: k for k, v in table.items()} == HF_VISION_FAMILY_FROM_NATIVE["dinov2"]
    source = save_dinov2(tmp_path / "dino", registers=True)
    keys = list(_tensors(source))
    native = keys_to_native(keys, "hf", "vision")
    assert not native.dropped and len(native.mapping) == len(keys)
    back = keys_from_native(native.mapping.values(), "hf", "vision", family="dinov2")
    assert sorted(back.mapping.values()) == sorted(keys)


@pytest.mark.parametrize("registers", [False, True], ids=["dinov2", "registers"])
def test_convert_to_native_and_back_is_bitwise(tmp_path, registers):
    source = save_dinov2(tmp_path / "dino", registers)
    native, back = tmp_path / "native", tmp_path / "back"
    result = cli("convert", source, "-o", native, "--to", "native")
    assert result.exit_code == 0, result.output
    assert json.loads((native / "config.json").read_text())["encoder"]["family"] == "dinov2"
    result = cli("convert", native, "-o", back, "--to", "hf")
    assert result.exit_code == 0, result.output
    _assert_bitwise(_tensors(back), _tensors(source))
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == ("dinov2_with_registers" if registers else "dinov2")
    # transformers builds the same tower from what was written
    images = torch.randn(1, 3, 35, 42, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = transformers.AutoModel.from_pretrained(source).eval()(pixel_values=images)
        got = transformers.AutoModel.from_pretrained(back).eval()(pixel_values=images)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)


@pytest.fixture(scope="module")
def fused_dinov2(tmp_path_factory) -> tuple[Path, Path]:
    """DINOv2 with registers fused into the bundled tiny Llama, with a preprocessor that
    gives the tower 42 x 35 images (6 x 5 patches; the tower was trained on 4 x 4)."""
    root = tmp_path_factory.mktemp("dinov2")
    source = save_dinov2(root / "dino", registers=True)
    transformers.BitImageProcessorPil(
        size={"height": 42, "width": 35}, do_center_crop=False,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(source)
    fused = root / "fused"
    result = cli("fuse", source, EXAMPLES / "tiny-llama", "-o", fused, "--every", "1")
    assert result.exit_code == 0, result.output
    return source, fused


def test_fuse_validate_unfuse(tmp_path, fused_dinov2):
    source, fused = fused_dinov2
    config = json.loads((fused / "fusion_config.json").read_text())
    assert config["encoder_tokens"] == "cls_and_patches"
    assert config["encoder"]["feature_tokens"] == "cls_and_patches"
    assert config["encoder"]["num_register_tokens"] == REGISTERS
    assert config["encoder"]["layer_scale"] and config["encoder"]["position_antialias"]

    result = cli("validate", fused, "--against", EXAMPLES / "tiny-llama", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["identity"], report
    assert {check["status"] for check in report["checks"]} == {"pass"}

    # the transformers export carries it (registers left out as here), validated through it
    result = cli("convert", fused, "--to", "transformers", "-o", tmp_path / "export")
    assert result.exit_code == 0, result.output
    result = cli("validate", tmp_path / "export", "--against", EXAMPLES / "tiny-llama", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["identity"] is True

    unfused = tmp_path / "encoder"
    result = cli("unfuse", fused, "--part", "encoder", "-o", unfused)
    assert result.exit_code == 0, result.output
    _assert_bitwise(_tensors(unfused), _tensors(source))
    result = cli("diff", "--values", source, unfused)
    assert result.exit_code == 0, result.output


def test_encoder_tokens_option_is_recorded(tmp_path):
    source = save_dinov2(tmp_path / "dino", registers=True)
    transformers.BitImageProcessorPil(
        size={"height": 42, "width": 35}, do_center_crop=False).save_pretrained(source)
    fused = tmp_path / "fused"
    result = cli("fuse", source, EXAMPLES / "tiny-llama", "-o", fused, "--encoder-tokens",
                 "all", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["encoder_tokens"] == "all"
    model = fusesurgery.load_fused(fused, dtype=torch.float32).eval()
    assert model.encoder.vision.feature_tokens == "all"
    assert model.fused_config.encoder.seq_len == 1 + REGISTERS + 16
    result = cli("validate", fused, "--against", EXAMPLES / "tiny-llama", "--json")
    assert result.exit_code == 0, result.output
    # the encoder mask has a column for every token the tower returns, registers included
    inputs = fusesurgery.load_processor(fused)("<|image|> hi", torch.rand(3, 40, 40))
    with torch.no_grad():
        tokens = model.encoder(inputs.encoder_input["images"])
        model(inputs.tokens, encoder_input=inputs.encoder_input,
              encoder_mask=inputs.encoder_mask)
    assert tokens.shape[1] == 1 + REGISTERS + 30 == inputs.encoder_mask.shape[-1]
    # two images in one sample: one block of columns each
    two = fusesurgery.load_processor(fused)("<|image|> a <|image|> b",
                                            [torch.rand(3, 40, 40), torch.rand(3, 20, 30)])
    with torch.no_grad():
        both = model.encoder(two.encoder_input["images"])
        model(two.tokens, encoder_input=two.encoder_input, encoder_mask=two.encoder_mask)
    assert both.shape[1] == 2 * (1 + REGISTERS + 30) == two.encoder_mask.shape[-1]
    result = cli("fuse", source, EXAMPLES / "tiny-llama", "-o", tmp_path / "bad",
                 "--encoder-tokens", "registers")
    assert result.exit_code == 2 and "registers" in result.output


def test_prepare_inputs_and_generate_at_another_resolution(fused_dinov2):
    _, fused = fused_dinov2
    model = fusesurgery.load_fused(fused, dtype=torch.float32).eval()
    processor = fusesurgery.load_processor(fused)
    image = torch.rand(3, 50, 60, generator=torch.Generator().manual_seed(5))
    inputs = processor(["<|image|> a photo", "<|image|> two"], [[image], [image]])
    assert inputs.encoder_input["images"].shape[-2:] == (42, 35)
    with torch.no_grad():
        tokens = model.encoder(inputs.encoder_input["images"])
    # class token + 6 x 5 patches; registers left out
    assert tokens.shape[1] == 1 + 30 == inputs.encoder_mask.shape[-1]
    output = fusesurgery.generate(model, inputs, max_new_tokens=3)
    assert output.tokens.shape[0] == 2


def test_config_is_checked_against_the_weights(tmp_path):
    source = save_dinov2(tmp_path / "dino", registers=True)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "num_register_tokens": 5}))
    with pytest.raises(ConfigError, match="register_tokens"):
        load_encoder(source)
    (source / "config.json").write_text(json.dumps({**config, "mlp_ratio": 3}))
    with pytest.raises(ConfigError, match="fc1"):
        load_encoder(source)
    (source / "config.json").write_text(json.dumps({**config, "use_swiglu_ffn": True}))
    result = cli("fuse", source, EXAMPLES / "tiny-llama", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "use_swiglu_ffn" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()

"""DINOv3 ViT (``dinov3_vit``) as a native tower, with sources written by transformers' own
``DINOv3ViTModel`` (every parameter drawn at random: LayerScales, registers, mask token).

``load_encoder`` against transformers at the native image size and others (its 2-D RoPE over
the patch centres, the class token and registers unrotated); ``fuse`` -> ``validate
--against`` -> ``unfuse --part encoder`` bitwise; ``convert --to native`` and back bitwise;
``prepare_inputs`` at another resolution; config.json checked against the weights.
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
from fusesurgery.errors import ConfigError
from fusesurgery.io import open_checkpoint

transformers = pytest.importorskip("transformers")
runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             image_size=32, patch_size=8, num_register_tokens=2)
REGISTERS = 2


def cli(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def save_dinov3(directory: Path, **settings) -> Path:
    model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**{**SIZES, **settings}))
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


def test_load_encoder_equals_transformers(tmp_path):
    source = save_dinov3(tmp_path / "dino")
    reference = transformers.AutoModel.from_pretrained(source).eval()
    encoder = load_encoder(source).eval()
    assert encoder.token_pos_embedding is None and encoder.patch_rope is not None
    penultimate = load_encoder(source, output_layer=-2).eval()
    prefix = 1 + REGISTERS
    for height, width in ((32, 32), (48, 40), (16, 24)):
        images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            theirs = reference(pixel_values=images, output_hidden_states=True)
            ours = encoder(images)
            ours_penultimate = penultimate(images)
        assert ours.shape == (2, prefix + (height // 8) * (width // 8), 32)
        torch.testing.assert_close(ours, theirs.last_hidden_state, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours_penultimate, theirs.hidden_states[-2], rtol=0,
                                   atol=1e-5)
    with torch.no_grad():
        full = reference(pixel_values=images).last_hidden_state
        fed = load_encoder(source, overrides={"feature_tokens": "cls_and_patches"})(images)
    torch.testing.assert_close(fed, torch.cat([full[:, :1], full[:, prefix:]], 1), rtol=0,
                               atol=1e-5)


def test_convert_to_native_and_back_is_bitwise(tmp_path):
    source = save_dinov3(tmp_path / "dino")
    native, back = tmp_path / "native", tmp_path / "back"
    result = cli("convert", source, "-o", native, "--to", "native")
    assert result.exit_code == 0, result.output
    encoder = json.loads((native / "config.json").read_text())["encoder"]
    assert (encoder["family"], encoder["patch_rope_base"], encoder["key_bias"]) == (
        "dinov3", 100.0, False)
    result = cli("convert", native, "-o", back, "--to", "hf")
    assert result.exit_code == 0, result.output
    _assert_bitwise(_tensors(back), _tensors(source))
    images = torch.randn(1, 3, 40, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = transformers.AutoModel.from_pretrained(source).eval()(pixel_values=images)
        got = transformers.AutoModel.from_pretrained(back).eval()(pixel_values=images)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)


def test_fuse_validate_unfuse_and_inputs(tmp_path):
    source = save_dinov3(tmp_path / "dino")
    transformers.BitImageProcessorPil(
        size={"height": 48, "width": 40}, do_center_crop=False).save_pretrained(source)
    fused = tmp_path / "fused"
    result = cli("fuse", source, EXAMPLES / "tiny-llama", "-o", fused, "--every", "2")
    assert result.exit_code == 0, result.output
    config = json.loads((fused / "fusion_config.json").read_text())
    assert config["encoder_tokens"] == "cls_and_patches"
    assert config["encoder"]["patch_rope_base"] == 100.0

    result = cli("validate", fused, "--against", EXAMPLES / "tiny-llama", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["identity"], report
    assert {check["status"] for check in report["checks"]} == {"pass"}

    unfused = tmp_path / "encoder"
    result = cli("unfuse", fused, "--part", "encoder", "-o", unfused)
    assert result.exit_code == 0, result.output
    _assert_bitwise(_tensors(unfused), _tensors(source))
    # the transformers export carries it (registers left out as here), validated through it
    result = cli("convert", fused, "--to", "transformers", "-o", tmp_path / "export")
    assert result.exit_code == 0, result.output
    result = cli("validate", tmp_path / "export", "--against", EXAMPLES / "tiny-llama", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["identity"] is True

    # an image at another resolution than the tower's 32 x 32: 6 x 5 patches
    model = fusesurgery.load_fused(fused, dtype=torch.float32).eval()
    inputs = fusesurgery.load_processor(fused)("<|image|> a photo", torch.rand(3, 50, 60))
    with torch.no_grad():
        tokens = model.encoder(inputs.encoder_input["images"])
        model(inputs.tokens, encoder_input=inputs.encoder_input,
              encoder_mask=inputs.encoder_mask)
    assert tokens.shape[1] == 1 + 30 == inputs.encoder_mask.shape[-1]


def test_config_is_checked(tmp_path):
    source = save_dinov3(tmp_path / "dino")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "num_register_tokens": 4}))
    with pytest.raises(ConfigError, match="register_tokens"):
        load_encoder(source)
    (source / "config.json").write_text(json.dumps({**config, "key_bias": True}))
    with pytest.raises(ConfigError, match="key_bias"):
        load_encoder(source)
    (source / "config.json").write_text(json.dumps({**config, "use_gated_mlp": True}))
    result = cli("fuse", source, EXAMPLES / "tiny-llama", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "use_gated_mlp" in result.output
    assert not (tmp_path / "out").exists()

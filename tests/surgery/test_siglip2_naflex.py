"""SigLIP2 NaFlex (``siglip2``) as a native tower, with sources written by transformers' own
``Siglip2VisionModel`` / ``Siglip2Model`` (every parameter drawn at random) and inputs cut by
its own ``Siglip2ImageProcessor``.

``load_encoder`` against transformers on images of several aspect ratios and patch budgets
(a variable number of real patches per image, the position table resized per
``spatial_shapes``); ``fuse`` -> ``validate --against`` -> ``unfuse --part encoder`` bitwise;
``convert --to native`` and back bitwise (the pooling head carried); padding patches change no
text logit; ``prepare_inputs`` cuts patches as transformers does and ``generate`` runs. The
transformers export of such a fusion: tests/hf/test_export_naflex.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fusesurgery
from fusesurgery import load_encoder
from fusesurgery.cli.app import app
from fusesurgery.errors import InputError
from fusesurgery.io import open_checkpoint
from fusesurgery.modules.norms import TanhGate
from tests.tiny_models import TINY_TEXT

transformers = pytest.importorskip("transformers")
runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_patches=16, patch_size=4)  # a 4 x 4 position grid of 4-px patches
BUDGET = 24


def cli(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def _randomize(model) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5
                            + (1.0 if parameter.dim() == 1 else 0.0))


def processor(budget: int = BUDGET):
    return transformers.Siglip2ImageProcessorPil(patch_size=4, max_num_patches=budget)


def save_naflex(directory: Path) -> Path:
    model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**VISION))
    _randomize(model)
    model.save_pretrained(directory)
    processor().save_pretrained(directory)
    return directory


def _images(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, size, dtype=torch.uint8, generator=generator)
            for size in ((3, 30, 50), (3, 40, 20), (3, 16, 16))]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as source:
        return {key: source.get_tensor(key).clone() for key in source.keys()}


def _assert_bitwise(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for key, tensor in ours.items():
        assert tensor.dtype == theirs[key].dtype and tensor.shape == theirs[key].shape, key
        assert torch.equal(tensor.view(torch.uint8), theirs[key].view(torch.uint8)), key


@pytest.mark.parametrize("budget", [16, BUDGET, 40])
def test_load_encoder_equals_transformers(tmp_path, budget):
    source = save_naflex(tmp_path / "naflex")
    reference = transformers.Siglip2VisionModel.from_pretrained(source).eval()
    encoder = load_encoder(source).eval()
    penultimate = load_encoder(source, output_layer=-2).eval()
    inputs = processor(budget)(images=_images(), return_tensors="pt")
    # several grids in one batch, some padded: the tokens per image vary
    assert len({tuple(shape) for shape in inputs["spatial_shapes"].tolist()}) == 3
    real = inputs["pixel_attention_mask"].bool()
    assert not bool(real.all())
    with torch.no_grad():
        theirs = reference(**inputs, output_hidden_states=True)
        ours = encoder(**inputs)
        ours_penultimate = penultimate(**inputs)
    torch.testing.assert_close(ours[real], theirs.last_hidden_state[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_penultimate[real], theirs.hidden_states[-2][real], rtol=0,
                               atol=1e-5)


def test_two_tower_siglip2_model_reads_its_vision_half(tmp_path):
    model = transformers.Siglip2Model(transformers.Siglip2Config(
        vision_config=VISION, text_config=TINY_TEXT))
    _randomize(model)
    model.save_pretrained(tmp_path / "full")
    encoder = load_encoder(tmp_path / "full").eval()
    inputs = processor()(images=_images(1), return_tensors="pt")
    real = inputs["pixel_attention_mask"].bool()
    with torch.no_grad():
        theirs = model.vision_model.eval()(**inputs).last_hidden_state
        ours = encoder(**inputs)
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)


def test_convert_to_native_and_back_is_bitwise(tmp_path):
    source = save_naflex(tmp_path / "naflex")
    native, back = tmp_path / "native", tmp_path / "back"
    result = cli("convert", source, "-o", native, "--to", "native")
    assert result.exit_code == 0, result.output
    assert json.loads((native / "config.json").read_text())["encoder"]["family"] == "siglip2"
    result = cli("convert", native, "-o", back, "--to", "hf")
    assert result.exit_code == 0, result.output
    _assert_bitwise(_tensors(back), {key if key.startswith("vision_model.") else
                                     "vision_model." + key: tensor
                                     for key, tensor in _tensors(source).items()})
    config = json.loads((back / "config.json").read_text())
    assert (config["model_type"], config["num_patches"]) == ("siglip2_vision_model", 16)
    inputs = processor()(images=_images(2), return_tensors="pt")
    with torch.no_grad():
        expected = transformers.AutoModel.from_pretrained(source).eval()(**inputs)
        got = transformers.AutoModel.from_pretrained(back).eval()(**inputs)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)


@pytest.fixture(scope="module")
def fused_naflex(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("naflex")
    source = save_naflex(root / "naflex")
    fused = root / "fused"
    result = cli("fuse", source, EXAMPLES / "tiny-llama", "-o", fused, "--every", "2")
    assert result.exit_code == 0, result.output
    return source, fused


def test_fuse_validate_unfuse(tmp_path, fused_naflex):
    source, fused = fused_naflex
    config = json.loads((fused / "fusion_config.json").read_text())
    assert config["encoder"]["family"] == "siglip2" and config["encoder_tokens"] == "all"
    result = cli("validate", fused, "--against", EXAMPLES / "tiny-llama", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["identity"], report
    assert {check["status"] for check in report["checks"]} == {"pass"}

    unfused = tmp_path / "encoder"
    result = cli("unfuse", fused, "--part", "encoder", "-o", unfused)
    assert result.exit_code == 0, result.output
    # fuse keeps no pooling head: the rest comes back bit for bit, under the source's names
    kept = {key: tensor for key, tensor in _tensors(source).items()
            if not key.startswith("head.")}
    _assert_bitwise(_tensors(unfused), kept)


def _open_gates(model) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TanhGate):
                module.scale.fill_(1.0)


def test_padding_patches_change_no_text_logit(fused_naflex):
    """The same sample alone (its patches only) and in a batch padded to a larger image's
    patch count, with open gates and an encoder mask that claims every column: the padding
    patches (random values, not zeros) are masked out of the cross-attention."""
    _, fused = fused_naflex
    model = fusesurgery.load_fused(fused, dtype=torch.float32).eval()
    _open_gates(model)
    inputs = processor()(images=_images(3)[:2], return_tensors="pt")
    real = inputs["pixel_attention_mask"].bool()
    count = int(real[1].sum())
    assert count < BUDGET  # sample 1 is padded
    values = inputs["pixel_values"].clone()
    values[~real] = torch.randn(int((~real).sum()), values.size(-1),
                                generator=torch.Generator().manual_seed(4))
    tokens = torch.randint(0, 500, (2, 6), generator=torch.Generator().manual_seed(5))
    tokens[:, 1] = 512  # <|image|>
    claim_all = torch.ones(2, 6, BUDGET, dtype=torch.bool)
    alone = {"pixel_values": values[1:, :count], "spatial_shapes": inputs["spatial_shapes"][1:],
             "pixel_attention_mask": inputs["pixel_attention_mask"][1:, :count]}
    batch = {"pixel_values": values, "spatial_shapes": inputs["spatial_shapes"],
             "pixel_attention_mask": inputs["pixel_attention_mask"]}
    with torch.no_grad():
        padded = model(tokens, encoder_input=batch, encoder_mask=claim_all)
        single = model(tokens[1:], encoder_input=alone, encoder_mask=claim_all[1:, :, :count])
        closed = model(tokens[1:])
    torch.testing.assert_close(padded[1:], single, rtol=0, atol=1e-5)
    assert (single - closed).abs().max() > 1e-3  # the image does reach the logits


def test_prepare_inputs_and_generate(fused_naflex):
    _, fused = fused_naflex
    model = fusesurgery.load_fused(fused, dtype=torch.float32).eval()
    fused_processor = fusesurgery.load_processor(fused)
    images = _images(6)[:2]
    inputs = fused_processor(["<|image|> a cat", "<|image|> a long dog here"],
                             [[images[0]], [images[1]]])
    expected = processor()(images=images, return_tensors="pt")
    for key, value in expected.items():
        torch.testing.assert_close(inputs.encoder_input[key].to(value.dtype), value, rtol=0,
                                   atol=1e-6)
    # the encoder mask never points at padding patches
    padding = ~expected["pixel_attention_mask"].bool()
    assert not bool((inputs.encoder_mask & padding[:, None, :]).any())
    _open_gates(model)  # the image now changes what is generated
    output = fusesurgery.generate(model, inputs, max_new_tokens=4)
    assert output.tokens.shape == (2, 4)
    # no encoder mask at all: generation builds one from pixel_attention_mask (padding
    # patches out) and sizes the cross-attention caches by it
    again = fusesurgery.generate(model, dataclasses.replace(inputs, encoder_mask=None),
                                 max_new_tokens=4)
    assert again.tokens.shape == (2, 4)
    with pytest.raises(InputError, match="one image per sample"):
        fused_processor("<|image|><|image|> two", [images[0], images[1]])
    with pytest.raises(ValueError, match="NaFlex"):
        model.encoder(images=torch.zeros(1, 3, 16, 16))

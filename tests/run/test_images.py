"""Image preprocessing from a tower's preprocessor_config.json, checked against transformers'
own image processors (PIL backends) within 1e-5 (float32 rounding of the same arithmetic)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest
import torch

from fusesurgery.errors import InputError
from fusesurgery.run.images import ImagePreprocessor, load_image

PIL = pytest.importorskip("PIL.Image")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CLIP_CONFIG = json.loads((EXAMPLES / "tiny-clip-vision" / "preprocessor_config.json").read_text())
SIGLIP_CONFIG = {
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3,
    "image_processor_type": "SiglipImageProcessor", "image_std": [0.5] * 3, "resample": 3,
    "rescale_factor": 1 / 255, "size": {"height": 24, "width": 24},
}
TOLERANCE = dict(atol=1e-5, rtol=0)


def _picture(height: int, width: int, seed: int) -> PIL.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    return PIL.fromarray(pixels.numpy())


@pytest.mark.parametrize("size", [(40, 50), (64, 33), (32, 32), (17, 90)])
def test_clip_matches_transformers(size: tuple[int, int]):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = _picture(*size, seed=size[0])
    expected = CLIPImageProcessorPil(**CLIP_CONFIG)(image, return_tensors="pt")["pixel_values"]
    ours = ImagePreprocessor.from_dict(CLIP_CONFIG)(image)
    assert ours.shape == (3, 32, 32) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected[0], **TOLERANCE)
    # a uint8 tensor is the same pixels as the PIL image
    tensor = torch.from_numpy(numpy.array(image)).permute(2, 0, 1)
    assert torch.equal(ImagePreprocessor.from_dict(CLIP_CONFIG)(tensor), ours)


@pytest.mark.parametrize("size", [(40, 50), (24, 24), (10, 70)])
def test_siglip_matches_transformers(size: tuple[int, int]):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image = _picture(*size, seed=size[1])
    expected = SiglipImageProcessorPil(**SIGLIP_CONFIG)(image, return_tensors="pt")
    ours = ImagePreprocessor.from_dict(SIGLIP_CONFIG)(image)
    assert ours.shape == (3, 24, 24)
    torch.testing.assert_close(ours, expected["pixel_values"][0], **TOLERANCE)


def test_grey_and_float_images():
    processor = ImagePreprocessor.from_dict(CLIP_CONFIG)
    grey = _picture(40, 40, 1).convert("L")
    assert processor(grey).shape == (3, 32, 32)  # converted to RGB first, as transformers does
    for channels in (1, 4):  # uint8 tensors: grey and RGBA pixels, as the same PIL images
        assert processor(torch.zeros(channels, 40, 40, dtype=torch.uint8)).shape == (3, 32, 32)
    floats = torch.rand(3, 48, 64)  # values in [0, 1]: resized by torch, not rescaled again
    out = processor(floats)
    assert out.shape == (3, 32, 32)
    mean = torch.tensor(CLIP_CONFIG["image_mean"])[:, None, None]
    std = torch.tensor(CLIP_CONFIG["image_std"])[:, None, None]
    pixels = out * std + mean
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0 + 1e-6


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 3, 8, 8), r"\[c, h, w\]"),
    (torch.zeros(3, 8, 8, dtype=torch.int32), "uint8"),
    ("cat.jpg", "not an image: str"),
    (torch.full((3, 8, 8), 255.0), r"values in \[0, 1\], got 255\.\.255"),
    (torch.full((3, 8, 8), -0.5), r"values in \[0, 1\], got -0\.5"),
    (torch.full((3, 8, 8), float("nan")), r"values in \[0, 1\]"),
])
def test_bad_images_are_named(bad, message):
    with pytest.raises(InputError, match=message):
        ImagePreprocessor.from_dict(CLIP_CONFIG)(bad)


def test_bad_config_is_named():
    with pytest.raises(InputError, match="image_std"):
        ImagePreprocessor.from_dict({**CLIP_CONFIG, "image_std": [0, 1, 1]})
    with pytest.raises(InputError, match="crop_size"):
        ImagePreprocessor.from_dict({**CLIP_CONFIG, "crop_size": {"height": 32}})


def test_load_image_errors(tmp_path: Path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputError, match="not an image Pillow can read"):
        load_image(tmp_path / "text.png")
    _picture(8, 8, 0).convert("L").save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").mode == "RGB"

"""Image preprocessing as a vision tower's saved ``preprocessor_config.json`` describes it.

CLIP: resize the shortest edge, center crop, rescale, normalise; SigLIP: resize to a fixed
size, rescale, normalise. A PIL image (or a ``uint8`` tensor, the same pixels) is resized by
Pillow with the configured filter, as transformers' PIL image processors do, so the pixel
values agree with ``CLIPImageProcessor`` / ``SiglipImageProcessor`` to float32 rounding.

Shape notation:
    c: channels, h/w: image side in pixels, n: images.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fusesurgery.errors import InputError

PREPROCESSOR_FILE = "preprocessor_config.json"
# Pillow's filter numbers (PIL.Image.Resampling), as preprocessor configs store them.
_TORCH_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class ImagePreprocessor:
    """What a tower's ``preprocessor_config.json`` asks of every image.

    Args:
        size: ``{"shortest_edge": s}`` (CLIP) or ``{"height": h, "width": w}`` (SigLIP).
        crop_size: ``(h, w)`` of the center crop, or None for no crop.
        resample: Pillow filter number (3 = bicubic).
        rescale_factor: pixel scale (1/255), or None for no rescaling.
        mean: per-channel mean, or None for no normalisation.
        std: per-channel std.
        do_resize: resize to ``size``.
        convert_rgb: convert PIL images to RGB first.
        max_num_patches: SigLIP2 NaFlex: resize each image, keeping its aspect ratio, to the
            largest multiple of ``patch_size`` on each side that gives at most this many
            patches (``size`` is then unused); None for a fixed-size tower.
        patch_size: NaFlex's patch side.
    """

    size: Mapping[str, int]
    crop_size: tuple[int, int] | None = None
    resample: int = 3
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    do_resize: bool = True
    convert_rgb: bool = True
    max_num_patches: int | None = None
    patch_size: int | None = None

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], origin: str = PREPROCESSOR_FILE
                  ) -> ImagePreprocessor:
        """Read a ``preprocessor_config.json`` document.

        Raises:
            InputError: a size, crop, mean or std that is missing or malformed.
        """
        def ints(value: Any, keys: Sequence[str], name: str) -> dict[str, int]:
            if not isinstance(value, Mapping) or not all(
                    type(value.get(k)) is int and value[k] > 0 for k in keys):
                raise InputError(f"{origin}: {name} must be {{{', '.join(map(repr, keys))}}} "
                                 f"positive integers, got {value!r}")
            return {k: value[k] for k in keys}

        naflex = None
        if "max_num_patches" in doc:  # SigLIP2 NaFlex: sizes follow from the patch budget
            naflex = ints(doc, ("max_num_patches", "patch_size"), "a NaFlex preprocessor")
            size = {}
        else:
            size_doc = doc.get("size")
            keys = ("shortest_edge",) if isinstance(size_doc, Mapping) and (
                "shortest_edge" in size_doc) else ("height", "width")
            size = ints(size_doc, keys, "size")
        crop = None
        if doc.get("do_center_crop", False):
            crop_doc = ints(doc.get("crop_size"), ("height", "width"), "crop_size")
            crop = (crop_doc["height"], crop_doc["width"])
        mean = std = None
        if doc.get("do_normalize", True):
            mean, std = doc.get("image_mean"), doc.get("image_std")
            for name, values in (("image_mean", mean), ("image_std", std)):
                if (not isinstance(values, list) or not values or not all(
                        isinstance(v, int | float) and math.isfinite(v) for v in values)):
                    raise InputError(f"{origin}: {name} must be a list of numbers, got "
                                     f"{values!r}")
            if any(v <= 0 for v in std):
                raise InputError(f"{origin}: image_std must be positive, got {std}")
            mean, std = tuple(map(float, mean)), tuple(map(float, std))
        rescale = float(doc.get("rescale_factor", 1 / 255)) if doc.get("do_rescale",
                                                                        True) else None
        resample = doc.get("resample", 3)
        if type(resample) is not int or resample not in (0, 1, 2, 3, 4, 5):
            raise InputError(f"{origin}: resample must be a Pillow filter number, got "
                             f"{resample!r}")
        return cls(size=size, crop_size=crop, resample=resample, rescale_factor=rescale,
                   mean=mean, std=std, do_resize=bool(doc.get("do_resize", True)),
                   convert_rgb=bool(doc.get("do_convert_rgb", True)),
                   **(naflex or {}))

    @classmethod
    def from_directory(cls, directory: str | Path) -> ImagePreprocessor:
        """The preprocessor of a fused checkpoint (or tower) directory.

        Raises:
            InputError: no ``preprocessor_config.json`` there, or a malformed one.
        """
        path = Path(directory) / PREPROCESSOR_FILE
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{directory} has no {PREPROCESSOR_FILE}: the image "
                             "preprocessing of its vision tower is unknown") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"{path} cannot be read: {error}") from None
        if not isinstance(doc, Mapping):
            raise InputError(f"{path} is not a JSON object")
        return cls.from_dict(doc, str(path))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of an image of ``height x width`` pixels after resize and crop."""
        if self.do_resize:
            height, width = self._resized_size(height, width)
        return self.crop_size if self.crop_size is not None else (height, width)

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.max_num_patches is not None:
            return naflex_size(height, width, self.patch_size, self.max_num_patches)
        if "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        short, long = sorted((height, width))
        new_short, new_long = self.size["shortest_edge"], int(
            self.size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, image: Any) -> torch.Tensor:
        """One image as the tower's input, ``[c, h, w]`` float32.

        Args:
            image: a PIL image; a ``uint8`` tensor ``[c, h, w]`` (pixel values 0..255, treated
                exactly as the same PIL image); or a floating-point tensor ``[c, h, w]`` with
                values in ``[0, 1]`` (resized with torch's antialiased interpolation, and not
                rescaled again).

        Raises:
            InputError: not an image, a tensor that is not ``[c, h, w]``, or a float tensor
                with values outside ``[0, 1]`` (or NaN).
        """
        if isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.size(0) not in (1, 3, 4) or 0 in image.shape:
                raise InputError(f"an image tensor must be [c, h, w] with 1, 3 or 4 channels, "
                                 f"got {list(image.shape)}")
            if image.dtype == torch.uint8:
                return self(_pil_from_uint8(image))
            if not image.is_floating_point():
                raise InputError(f"an image tensor must be uint8 (0..255) or floating point "
                                 f"(0..1), got {image.dtype}")
            pixels = image.float()[:3] if image.size(0) == 4 else image.float()
            # a float image of 0..255 pixels (or already normalised ones) would otherwise be
            # scaled and normalised once more: garbage the encoder takes without complaint
            low, high = float(pixels.min()), float(pixels.max())
            if not (0.0 <= low and high <= 1.0):
                raise InputError(f"a floating-point image tensor must hold values in [0, 1], "
                                 f"got {low:g}..{high:g}; divide 0..255 pixels by 255 or pass "
                                 "them as a uint8 tensor")
            if pixels.size(0) == 1:
                pixels = pixels.expand(3, -1, -1)
            return self._finish(self._resize_tensor(pixels), rescale=False)
        try:
            from PIL import Image  # noqa: PLC0415 - the [run] extra
        except ImportError:  # pragma: no cover - without Pillow only tensors work
            raise InputError("PIL images need Pillow: pip install 'fusesurgery[run]'") from None
        if not isinstance(image, Image.Image):
            raise InputError(f"not an image: {type(image).__name__} (give a PIL image or a "
                             "[c, h, w] tensor)")
        if self.convert_rgb and image.mode != "RGB":
            image = image.convert("RGB")
        if self.do_resize:
            height, width = self._resized_size(image.height, image.width)
            image = image.resize((width, height), resample=self.resample)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(image.height, image.width, -1).permute(2, 0, 1)  # [c, h, w]
        return self._finish(pixels.to(torch.float64), rescale=True)

    def _resize_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.do_resize:
            return pixels
        size = self._resized_size(pixels.size(1), pixels.size(2))
        mode = _TORCH_MODES.get(self.resample, "bicubic")
        resized = F.interpolate(pixels[None], size=size, mode=mode,
                                antialias=mode != "nearest",
                                **({} if mode == "nearest" else {"align_corners": False}))
        return resized[0].clamp(0.0, 1.0)

    def _finish(self, pixels: torch.Tensor, rescale: bool) -> torch.Tensor:
        """Center crop (zero-padding an image smaller than the crop), rescale, normalise."""
        if self.crop_size is not None:
            pixels = _center_crop(pixels, *self.crop_size)
        if rescale and self.rescale_factor is not None:
            pixels = pixels * self.rescale_factor
        pixels = pixels.float()
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
            std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
            pixels = (pixels - mean) / std
        return pixels


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int
                ) -> tuple[int, int]:
    """The ``(h, w)`` SigLIP2's NaFlex preprocessing resizes an image to: one scale for both
    sides, each rounded up to a multiple of ``patch_size`` (at least one patch), the largest
    scale whose grid has at most ``max_num_patches`` patches, found by bisection on the scale
    to a tolerance of 1e-5 as transformers' ``Siglip2ImageProcessor`` searches it."""
    def side(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    low, high = 1e-6, 100.0
    while high - low >= 1e-5:
        scale = (low + high) / 2
        if side(scale, height) / patch_size * (side(scale, width) / patch_size) <= (
                max_num_patches):
            low = scale
        else:
            high = scale
    return side(low, height), side(low, width)


def to_patches(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[c, h, w] -> [h/p * w/p, p * p * c]``: the patches in row-major order, each flattened
    as (row, column, channel), NaFlex's ``pixel_values`` layout."""
    c, h, w = pixels.shape
    grid = pixels.reshape(c, h // patch_size, patch_size, w // patch_size, patch_size)
    return grid.permute(1, 3, 2, 4, 0).reshape((h // patch_size) * (w // patch_size), -1)


def _pil_from_uint8(image: torch.Tensor) -> Any:
    from PIL import Image  # noqa: PLC0415 - the [run] extra

    array = image.permute(1, 2, 0).contiguous().numpy()  # [h, w, c]: L, RGB or RGBA
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def _center_crop(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[c, h, w] -> [c, height, width]`` around the center (top/left offsets floor)."""
    pad_h, pad_w = max(height - pixels.size(1), 0), max(width - pixels.size(2), 0)
    if pad_h or pad_w:  # smaller than the crop: zeros around it, the extra one after
        top, left = math.ceil(pad_h / 2), math.ceil(pad_w / 2)
        pixels = F.pad(pixels, (left, pad_w - left, top, pad_h - top))
    top = (pixels.size(1) - height) // 2
    left = (pixels.size(2) - width) // 2
    return pixels[:, top:top + height, left:left + width]


def load_image(path: str | Path) -> Any:
    """An image file as an RGB PIL image.

    Raises:
        InputError: the file is missing, unreadable or not an image Pillow knows.
    """
    try:
        from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 - the [run] extra
    except ImportError:  # pragma: no cover
        raise InputError("reading image files needs Pillow: pip install "
                         "'fusesurgery[run]'") from None
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"image {path} not found") from None
    except IsADirectoryError:
        raise InputError(f"image {path} is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image Pillow can read") from None
    except OSError as error:
        raise InputError(f"image {path} cannot be read: {error}") from None


__all__ = ["PREPROCESSOR_FILE", "ImagePreprocessor", "load_image", "naflex_size", "to_patches"]

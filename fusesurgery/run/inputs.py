"""Model inputs from text and images: token ids, pixel values, the cross-attention mask and
training labels, for a fused checkpoint.

The text is tokenized with the fused directory's ``tokenizer.json`` (the ``tokenizers``
package; transformers is not needed), where the new tokens (``<|image|>``) are special tokens
at their embedding ids. Images go through the tower's ``preprocessor_config.json``
(:mod:`fusesurgery.run.images`). The cross-attention mask follows torchtune's Llama 3.2 Vision
semantics (``VisionCrossAttentionMask``): an image token starts its image's span, which runs
to the next image token that does not directly follow it (or to the end), so consecutive image
tokens share one span; text sees the images whose span it lies in, and text before the first
image sees none (its fusion layers leave it untouched).

Shape notation:
    b: batch size, s: token sequence length, n: images per sample (the most in the batch),
    c/h/w: image channels and side, s_e: encoder tokens per image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from fusesurgery.errors import InputError
from fusesurgery.modules import DeepFusionModel
from fusesurgery.run.images import ImagePreprocessor, to_patches
from fusesurgery.surgery.exported import read_any_fused_config
from fusesurgery.surgery.fused_config import SOURCE_FILES_DIR, FusedConfig

IGNORE_INDEX = -100
TOKENIZER_FILE = "tokenizer.json"
GENERATION_CONFIG_FILE = "generation_config.json"
PaddingSide = Literal["left", "right"]


@dataclass(frozen=True)
class ModelInputs:
    """What a fused model takes for a batch, and the training labels.

    Attributes:
        tokens: ``[b, s]`` token ids, padded with the pad id.
        labels: ``[b, s]`` the token ids, with ``IGNORE_INDEX`` (-100) at padding and at new
            tokens (``<|image|>``, which the output projection has no row for). Not shifted:
            the loss of position ``i`` compares ``logits[:, i]`` with ``labels[:, i + 1]``.
        padding_mask: ``[b, s]`` bool, True at real tokens.
        encoder_input: ``{"images": [b, n, c, h, w]}``, or None without images. A sample
            with fewer than ``n`` images gets zero images that no token attends to.
        encoder_mask: ``[b, s, n * s_e]`` bool, True = the token attends to that image token,
            or None without images.
        mask: ``[b, s, s]`` bool self-attention mask (causal, padding masked out; a padding
            row attends to itself alone), or None when no sample is left-padded (causal
            attention is then exact).
        input_pos: ``[b, s]`` positions counted from each sample's first real token, or None
            when no sample is left-padded.
        prepended_image_tokens: per sample, how many image tokens were put in front of its
            text because it had images and no image token (as chat templates place them).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    padding_mask: torch.Tensor
    encoder_input: dict[str, torch.Tensor] | None = None
    encoder_mask: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    input_pos: torch.Tensor | None = None
    prepended_image_tokens: tuple[int, ...] = field(default=())

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``DeepFusionModel.forward``: ``model(**inputs.model_kwargs())``."""
        return {"tokens": self.tokens, "mask": self.mask, "encoder_input": self.encoder_input,
                "encoder_mask": self.encoder_mask, "input_pos": self.input_pos}

    def to(self, device: torch.device | str) -> ModelInputs:
        """The same inputs on ``device``."""
        def move(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            return value

        return replace(self, **{f: move(getattr(self, f)) for f in (
            "tokens", "labels", "padding_mask", "encoder_input", "encoder_mask", "mask",
            "input_pos")})


def image_spans(tokens: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the text each image token's image is seen by, one per image token
    in order: from the token to the next image token that does not directly follow it, or to
    the end (torchtune's ``VisionCrossAttentionMask`` intervals)."""
    positions = [i for i, token in enumerate(tokens) if token == image_token_id]
    # the first image token of each run of consecutive ones; a run's images share its end
    group_starts = [p for k, p in enumerate(positions) if k == 0 or positions[k - 1] != p - 1]
    spans = []
    for start in positions:
        end = next((g for g in group_starts if g > start), len(tokens))
        spans.append((start, end))
    return spans


@dataclass(frozen=True)
class FusedProcessor:
    """Tokenizer, image preprocessing and special ids of one fused checkpoint.

    Build it with :func:`load_processor`; call it to get :class:`ModelInputs`.

    Attributes:
        tokenizer: the fused ``tokenizers.Tokenizer``.
        config: the checkpoint's fusion config.
        image_token: the image token's text (the first new token, ``<|image|>``).
        image_token_id: its id.
        preprocessor: the tower's image preprocessing, or None (no vision tower, or no
            ``preprocessor_config.json``).
        eos_ids: the ids generation stops at (``generation_config.json``'s
            ``eos_token_id``, else the source decoder config's).
        pad_id: the id padding uses (``pad_token_id``, else the first eos id, else 0).
    """

    tokenizer: Any = field(repr=False)
    config: FusedConfig = field(repr=False)
    image_token: str
    image_token_id: int
    preprocessor: ImagePreprocessor | None
    eos_ids: tuple[int, ...]
    pad_id: int
    directory: Path

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with the tokenizer's own special tokens (a BOS where its
        post-processor adds one)."""
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens (eos, the image token)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def __call__(
        self,
        text: str | Sequence[str],
        images: Any = None,
        *,
        padding_side: PaddingSide = "left",
    ) -> ModelInputs:
        """Tokens, images, cross-attention mask and labels of a sample or a batch.

        Args:
            text: a string, or a list of strings (a batch). ``<|image|>`` marks where each
                image goes; a text with images and no image token gets one per image in
                front (as chat templates place them; ``prepended_image_tokens`` says so).
            images: for a string: None, an image, or a list of images (a tensor
                ``[n, c, h, w]`` is ``n`` images). For a batch: None, or one such entry per
                text. An image is a PIL image or a ``[c, h, w]`` tensor (``uint8`` pixels,
                or floats in ``[0, 1]``).
            padding_side: where shorter samples are padded: ``left`` (what ``generate``
                needs) or ``right``.

        Returns:
            :class:`ModelInputs`.

        Raises:
            InputError: a text whose image tokens do not match its images, images for a
                checkpoint without a vision tower, images of different sizes in one batch,
                or malformed arguments.
        """
        if padding_side not in ("left", "right"):
            raise InputError(f"unknown padding_side {padding_side!r}; valid: left, right")
        texts, per_sample = _batch(text, images)
        token_lists, pixel_lists, prepended = [], [], []
        for index, (sample_text, sample_images) in enumerate(zip(texts, per_sample,
                                                                 strict=True)):
            pixels = [self._pixels(image) for image in sample_images]
            ids = self.encode(sample_text)
            count = ids.count(self.image_token_id)
            added = 0
            if pixels and count == 0:
                added = len(pixels)
                ids = self.encode(self.image_token * added + sample_text)
                count = ids.count(self.image_token_id)
            if count != len(pixels):
                where = "the text" if isinstance(text, str) else f"text {index}"
                raise InputError(f"{where} has {count} {self.image_token} token(s) and "
                                 f"{len(pixels)} image(s); give one image per image token")
            token_lists.append(ids)
            pixel_lists.append(pixels)
            prepended.append(added)
        return self._collate(token_lists, pixel_lists, padding_side, tuple(prepended))

    def _pixels(self, image: Any) -> torch.Tensor:
        if self.config.encoder is None:
            raise InputError(f"{self.directory} has no native vision tower (an Mllama "
                             "checkpoint's tiled encoder): it runs on text alone")
        if self.preprocessor is None:
            raise InputError(f"{self.directory} has no preprocessor_config.json: the image "
                             "preprocessing of its vision tower is unknown")
        return self.preprocessor(image)

    def _naflex(self, token_lists: list[list[int]], pixel_lists: list[list[torch.Tensor]],
                offsets: list[int], s: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """SigLIP2 NaFlex inputs: each sample's image cut into patches and padded to the
        preprocessor's ``max_num_patches``; the encoder mask's columns of padding patches
        stay False. A sample without an image gets one zero patch nobody attends to.

        Raises:
            InputError: a sample with several images, or a preprocessor that is not NaFlex's.
        """
        patch, budget = self.preprocessor.patch_size, self.preprocessor.max_num_patches
        encoder = self.config.encoder
        if budget is None or patch != encoder.patch_size:
            raise InputError(f"{self.directory}: the tower is SigLIP2 NaFlex with "
                             f"{encoder.patch_size}-px patches, but preprocessor_config.json "
                             "is no NaFlex preprocessor of that patch size (it needs "
                             "max_num_patches and patch_size)")
        if any(len(pixels) > 1 for pixels in pixel_lists):
            raise InputError("a SigLIP2 NaFlex tower takes one image per sample; give each "
                             "sample at most one image")
        b = len(token_lists)
        width = encoder.num_channels * patch * patch
        values = torch.zeros(b, budget, width)
        real = torch.zeros(b, budget, dtype=torch.long)
        shapes = torch.ones(b, 2, dtype=torch.long)
        encoder_mask = torch.zeros(b, s, budget, dtype=torch.bool)
        for i, (ids, pixels) in enumerate(zip(token_lists, pixel_lists, strict=True)):
            if not pixels:
                real[i, 0] = 1  # a zero patch, so the tower's attention has a key
                continue
            (image,) = pixels
            patches = to_patches(image, patch)
            count = patches.size(0)
            values[i, :count] = patches
            real[i, :count] = 1
            shapes[i] = torch.tensor([image.size(1) // patch, image.size(2) // patch])
            for start, end in image_spans(ids, self.image_token_id):
                encoder_mask[i, offsets[i] + start:offsets[i] + end, :count] = True
        return ({"pixel_values": values, "pixel_attention_mask": real,
                 "spatial_shapes": shapes}, encoder_mask)

    def _collate(self, token_lists: list[list[int]], pixel_lists: list[list[torch.Tensor]],
                 padding_side: PaddingSide, prepended: tuple[int, ...]) -> ModelInputs:
        b, s = len(token_lists), max(len(ids) for ids in token_lists)
        if s == 0:
            raise InputError("the text is empty: it encodes to no tokens")
        tokens = torch.full((b, s), self.pad_id, dtype=torch.long)
        padding_mask = torch.zeros(b, s, dtype=torch.bool)
        offsets = []
        for i, ids in enumerate(token_lists):
            offset = s - len(ids) if padding_side == "left" else 0
            tokens[i, offset:offset + len(ids)] = torch.tensor(ids, dtype=torch.long)
            padding_mask[i, offset:offset + len(ids)] = True
            offsets.append(offset)
        labels = tokens.masked_fill(~padding_mask | (tokens >= self.config.decoder.vocab_size),
                                    IGNORE_INDEX)

        encoder_input = encoder_mask = None
        n = max(len(pixels) for pixels in pixel_lists)
        if n and self.config.encoder.naflex:
            encoder_input, encoder_mask = self._naflex(token_lists, pixel_lists, offsets, s)
        elif n:
            shapes = {tuple(p.shape) for pixels in pixel_lists for p in pixels}
            if len(shapes) > 1:
                raise InputError(f"images of different sizes after preprocessing {sorted(shapes)}"
                                 ": resize them to one size first")
            (c, h, w), = shapes
            encoder = self.config.encoder
            s_e = encoder.tokens_for(h, w)  # what the tower returns for this size
            images = torch.zeros(b, n, c, h, w)
            encoder_mask = torch.zeros(b, s, n * s_e, dtype=torch.bool)
            for i, (ids, pixels) in enumerate(zip(token_lists, pixel_lists, strict=True)):
                for j, pixel in enumerate(pixels):
                    images[i, j] = pixel
                for j, (start, end) in enumerate(image_spans(ids, self.image_token_id)):
                    rows = slice(offsets[i] + start, offsets[i] + end)
                    encoder_mask[i, rows, j * s_e:(j + 1) * s_e] = True
            encoder_input = {"images": images}

        mask = input_pos = None
        if not bool(padding_mask[:, 0].all()):  # some sample is left-padded
            mask, input_pos = padded_attention(padding_mask)
        return ModelInputs(tokens=tokens, labels=labels, padding_mask=padding_mask,
                           encoder_input=encoder_input, encoder_mask=encoder_mask, mask=mask,
                           input_pos=input_pos, prepended_image_tokens=prepended)


def padded_attention(padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal self-attention mask and positions for left-padded samples.

    Args:
        padding_mask: ``[b, s]`` bool, True at real tokens.

    Returns:
        ``mask`` ``[b, s, s]`` (a real token attends to the real tokens up to itself; a
        padding position to itself alone, so no softmax row is empty) and ``input_pos``
        ``[b, s]`` (0 at each sample's first real token).
    """
    s = padding_mask.size(1)
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool, device=padding_mask.device))
    mask = causal[None] & padding_mask[:, None, :]
    mask |= torch.eye(s, dtype=torch.bool, device=padding_mask.device)[None]
    input_pos = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)
    return mask, input_pos


def _is_image(value: Any) -> bool:
    return (isinstance(value, torch.Tensor) and value.dim() == 3) or hasattr(value, "getbands")


def _sample_images(value: Any, index: int) -> list[Any]:
    """One sample's images as a list: None, an image, a list of images, or ``[n, c, h, w]``."""
    if value is None:
        return []
    if _is_image(value):
        return [value]
    if isinstance(value, torch.Tensor):
        if value.dim() == 4:
            return list(value.unbind(0))
        raise InputError(f"images of text {index}: a tensor must be [c, h, w] or "
                         f"[n, c, h, w], got {list(value.shape)}")
    if isinstance(value, list | tuple):
        for item in value:
            if not _is_image(item):
                raise InputError(f"images of text {index}: {type(item).__name__} is not an "
                                 "image (a PIL image or a [c, h, w] tensor)")
        return list(value)
    raise InputError(f"images of text {index}: {type(value).__name__} is not an image (a PIL "
                     "image or a [c, h, w] tensor)")


def _batch(text: Any, images: Any) -> tuple[list[str], list[list[Any]]]:
    if isinstance(text, str):
        return [text], [_sample_images(images, 0)]
    if not isinstance(text, list | tuple) or not text or not all(
            isinstance(t, str) for t in text):
        raise InputError("text must be a string or a non-empty list of strings")
    if images is None:
        return list(text), [[] for _ in text]
    if not isinstance(images, list | tuple) or len(images) != len(text):
        raise InputError(f"a batch of {len(text)} texts needs a list of {len(text)} image "
                         "entries (None, an image, or a list of images each)")
    return list(text), [_sample_images(value, i) for i, value in enumerate(images)]


def _json_file(path: Path) -> Mapping[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} cannot be read: {error}") from None
    if not isinstance(doc, Mapping):
        raise InputError(f"{path} is not a JSON object")
    return doc


def _token_ids(value: Any, path: Path, name: str) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(type(v) is int and v >= 0 for v in values):
        raise InputError(f"{path}: {name} must be a token id or a list of them, got {value!r}")
    return tuple(values)


def generation_ids(directory: str | os.PathLike[str]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(eos ids, pad ids)`` of a fused checkpoint: from its ``generation_config.json``, else
    from the decoder's own ``config.json`` that fuse kept under ``source/decoder/`` (empty
    where neither has the field).

    Raises:
        InputError: a malformed file or id.
    """
    found: dict[str, tuple[int, ...]] = {}
    for path in (Path(directory) / GENERATION_CONFIG_FILE,
                 Path(directory) / SOURCE_FILES_DIR / "decoder" / "config.json"):
        doc = _json_file(path) or {}
        for name in ("eos_token_id", "pad_token_id"):
            if name not in found and doc.get(name) is not None:
                found[name] = _token_ids(doc[name], path, name)
    return found.get("eos_token_id", ()), found.get("pad_token_id", ())


def _directory_of(source: Any) -> Path:
    fused_path = getattr(source, "fused_path", None)
    if fused_path is not None:
        return Path(fused_path)
    if not isinstance(source, str | os.PathLike):
        raise InputError(f"expected a fused checkpoint directory or a model from load_fused, "
                         f"got {type(source).__name__}")
    path = Path(source)
    if not path.is_dir():
        raise InputError(f"{path} is not a fused checkpoint directory")
    return path


def load_processor(source: str | os.PathLike[str] | Any) -> FusedProcessor:
    """The tokenizer, image preprocessing and special ids of a fused checkpoint.

    Args:
        source: a fused checkpoint directory (or a transformers export of one), or a model
            ``load_fused`` returned (its directory is used).

    Returns:
        A :class:`FusedProcessor`.

    Raises:
        InputError: no ``tokenizer.json`` (or no ``tokenizers`` package), a tokenizer that
            does not know the image token at its id, or malformed side files.
        FuseSurgeryError: the directory is no fused checkpoint.
    """
    directory = _directory_of(source)
    # fusesurgery's layout, Mllama's or a transformers export
    config = getattr(source, "fused_config", None) or read_any_fused_config(directory)
    if not config.new_tokens:
        raise InputError(f"{directory} adds no new tokens: there is no image token")
    image = config.new_tokens[0]
    tokenizer_path = directory / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise InputError(f"{directory} has no {TOKENIZER_FILE}: running the model needs the "
                         "fused tokenizer (fuse writes it when the decoder has one)")
    try:
        from tokenizers import Tokenizer  # noqa: PLC0415 - the [run] extra
    except ImportError:  # pragma: no cover
        raise InputError("tokenizing needs the tokenizers package: pip install "
                         "'fusesurgery[run]'") from None
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise InputError(f"{tokenizer_path} cannot be loaded: {error}") from None
    if tokenizer.token_to_id(image.token) != image.id:
        raise InputError(f"{tokenizer_path} gives {image.token} the id "
                         f"{tokenizer.token_to_id(image.token)}, not {image.id} as "
                         "fusion_config.json says")
    # ids the model's embedding has no row for would fail inside the forward (pad) or never
    # stop generation (eos): refuse them here, naming the file
    rows = config.decoder.vocab_size + config.fusion.fusion_vocab_size
    tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    if tokens > rows:
        raise InputError(f"{tokenizer_path} holds {tokens} tokens, more than the model's "
                         f"{rows} embedding rows: it is not this model's tokenizer")
    eos_ids, pad = generation_ids(directory)
    beyond = sorted({i for i in (*eos_ids, *pad) if not 0 <= i < rows})
    if beyond:
        raise InputError(f"{directory}: eos/pad token ids {beyond} have no embedding row (the "
                         f"model has {rows})")
    preprocessor = None
    if config.encoder is not None and (directory / "preprocessor_config.json").is_file():
        preprocessor = ImagePreprocessor.from_directory(directory)
    return FusedProcessor(
        tokenizer=tokenizer, config=config, image_token=image.token, image_token_id=image.id,
        preprocessor=preprocessor, eos_ids=eos_ids,
        pad_id=pad[0] if pad else eos_ids[0] if eos_ids else 0, directory=directory)


def prepare_inputs(
    source: str | os.PathLike[str] | Any,
    text: str | Sequence[str],
    images: Any = None,
    *,
    padding_side: PaddingSide = "left",
) -> ModelInputs:
    """Text with image tokens plus images as a fused model's inputs and labels.

    Shorthand for ``load_processor(source)(text, images, padding_side=...)``; keep a
    :class:`FusedProcessor` to prepare many batches.

    Args:
        source: a fused checkpoint directory or a model from ``load_fused``.
        text: a string or a list of strings with ``<|image|>`` where the images go.
        images: see :meth:`FusedProcessor.__call__`.
        padding_side: ``left`` (for ``generate``) or ``right``.

    Returns:
        :class:`ModelInputs`: ``model(**inputs.model_kwargs())`` runs the model.

    Raises:
        InputError: see :func:`load_processor` and :meth:`FusedProcessor.__call__`; images
            for a model that is not a whole ``DeepFusionModel`` (``part="decoder"``).
    """
    inputs = load_processor(source)(text, images, padding_side=padding_side)
    if (inputs.encoder_input is not None and isinstance(source, torch.nn.Module)
            and not isinstance(source, DeepFusionModel)):
        # a bare fused decoder has no encoder: its forward would choke on the image dict
        raise InputError(f"images need the whole fused model (load_fused(path)), not "
                         f"{type(source).__name__} alone")
    return inputs


__all__ = [
    "IGNORE_INDEX",
    "FusedProcessor",
    "ModelInputs",
    "generation_ids",
    "image_spans",
    "load_processor",
    "padded_attention",
    "prepare_inputs",
]

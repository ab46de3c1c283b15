"""Text generation with a fused model: greedy or sampled, KV caches set up and torn down.

The prompt runs once (prefill): the encoder sees the images once, and each fusion layer's
cross-attention cache keeps their keys and values for every later step, which passes one
token and no encoder input. The caches are torn down however generation ends, so the model
trains (or runs a full forward) straight after.

Shape notation:
    b: batch size, s: prompt length, v: vocabulary size, n_new: new tokens.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusesurgery.errors import InputError
from fusesurgery.modules import DeepFusionModel, TransformerDecoder
from fusesurgery.modules.fusion import mask_padding_tokens
from fusesurgery.run.images import load_image
from fusesurgery.run.inputs import (
    ModelInputs,
    generation_ids,
    load_processor,
    padded_attention,
)
from fusesurgery.surgery.export_layout import local_export_path
from fusesurgery.surgery.exported import fused_opener
from fusesurgery.surgery.fused import load_fused_from


@dataclass(frozen=True)
class GenerationOutput:
    """New tokens of each sample.

    Attributes:
        tokens: ``[b, n_new]`` new token ids; after a sample's eos token (which is kept),
            the pad id.
        lengths: new tokens of each sample, its eos token included.
    """

    tokens: torch.Tensor
    lengths: tuple[int, ...]

    def sequences(self) -> list[list[int]]:
        """Each sample's new token ids, without the padding after its eos."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


def _check_options(max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any,
                   seed: Any) -> None:
    if type(max_new_tokens) is not int or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, int | float)
            or not math.isfinite(temperature) or temperature < 0):
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                         f"{temperature!r}")
    if top_k is not None and (type(top_k) is not int or top_k < 1):
        raise InputError(f"top_k must be a positive integer, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, int | float)
                              or not 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and (type(seed) is not int or not 0 <= seed < 2**64):
        raise InputError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
    # greedy decoding ignores them: taking them silently would hand back greedy text to a
    # caller who asked for samples
    sampling = [name for name, value in (("top_k", top_k), ("top_p", top_p), ("seed", seed))
                if value is not None]
    if temperature == 0 and sampling:
        raise InputError(f"{', '.join(sampling)} only apply to sampling, and temperature 0 is "
                         "greedy decoding: give a temperature > 0 (1.0 samples from the model's "
                         "own distribution)")


def next_token(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """One token per row from ``[b, v]`` logits: the argmax when ``temperature`` is 0, else a
    draw from the softmax of ``logits / temperature`` restricted to the ``top_k`` largest
    and to the smallest set whose probability reaches ``top_p``. Returns ``[b]``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before them reached top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, -math.inf))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: DeepFusionModel | TransformerDecoder,
    inputs: ModelInputs | torch.Tensor,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    KV caches are set up for the prompt plus ``max_new_tokens`` and torn down on the way out
    (also on an error); the images run through the encoder once, at prefill.

    Args:
        model: a fused ``DeepFusionModel`` (``load_fused``), or a fused or plain
            ``TransformerDecoder`` for text alone.
        inputs: :class:`ModelInputs` (``prepare_inputs(..., padding_side="left")``), or a
            ``[b, s]`` tensor of token ids with no padding.
        max_new_tokens: the most tokens to add.
        temperature: 0 for greedy decoding; otherwise the softmax temperature of sampling.
        top_k: sample among the ``top_k`` most likely tokens only.
        top_p: sample among the most likely tokens whose probability reaches ``top_p``.
        seed: seed of the sampling generator (None: torch's global generator).
        eos_ids: ids that end a sample; None reads ``generation_config.json`` beside a
            model from ``load_fused``.
        pad_id: what follows a finished sample's eos; None: the first eos id (or 0).

    Returns:
        :class:`GenerationOutput`.

    Raises:
        InputError: bad options (top_k, top_p or seed without a temperature > 0), inputs
            of another type, right-padded inputs, images for a bare decoder, or a prompt
            plus ``max_new_tokens`` longer than the model's ``max_seq_len``.
    """
    _check_options(max_new_tokens, temperature, top_k, top_p, seed)
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() != 2 or inputs.dtype not in (torch.long, torch.int32, torch.int64):
            raise InputError(f"token ids must be an integer [b, s] tensor, got "
                             f"{list(inputs.shape)} {inputs.dtype}")
        inputs = ModelInputs(tokens=inputs.long(), labels=inputs.long(),
                             padding_mask=torch.ones_like(inputs, dtype=torch.bool))
    elif not isinstance(inputs, ModelInputs):
        raise InputError(f"generate takes prepare_inputs(...)'s ModelInputs or a [b, s] tensor "
                         f"of token ids, not {type(inputs).__name__}; for text, pass "
                         "prepare_inputs(model, text)")
    decoder = model.decoder if isinstance(model, DeepFusionModel) else model
    if not isinstance(decoder, TransformerDecoder):
        raise InputError(f"generate runs a DeepFusionModel or a TransformerDecoder, not "
                         f"{type(model).__name__}")
    if inputs.encoder_input is not None and not isinstance(model, DeepFusionModel):
        raise InputError("images need the whole fused model (load_fused(path)), not its "
                         "decoder alone")
    device = decoder.tok_embeddings.weight.device
    inputs = inputs.to(device)
    b, s = inputs.tokens.shape
    if s == 0:
        raise InputError("the prompt is empty")
    if not bool(inputs.padding_mask[:, -1].all()):
        raise InputError("the inputs are right-padded; generation continues after the last "
                         "token, so prepare them with padding_side='left'")
    total = s + max_new_tokens
    if total > decoder.max_seq_len:
        raise InputError(f"a prompt of {s} tokens plus {max_new_tokens} new ones is longer "
                         f"than the model's max_seq_len {decoder.max_seq_len}")
    if eos_ids is None:
        eos_ids = _default_eos_ids(model)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    pad_id = pad_id if pad_id is not None else (int(eos[0]) if len(eos) else 0)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)

    # self-attention over the prompt and every position to come; left padding masked out
    real = torch.cat([inputs.padding_mask,
                      torch.ones(b, max_new_tokens, dtype=torch.bool, device=device)], dim=1)
    mask, positions = padded_attention(real)
    encoder_mask = inputs.encoder_mask
    token_mask = None if inputs.encoder_input is None else inputs.encoder_input.get(
        "pixel_attention_mask")
    if token_mask is not None:  # NaFlex: no step may attend to a padding patch either
        encoder_mask = mask_padding_tokens(encoder_mask, token_mask, s)
    step_encoder_mask = None if encoder_mask is None else encoder_mask[:, -1:]
    if step_encoder_mask is not None and bool(step_encoder_mask.all()):
        # every step sees every image position: no mask is the same attention (bitwise, on
        # the CPU) without the masked kernel and the fusion layers' skipped-row work
        step_encoder_mask = None
    dtype = decoder.tok_embeddings.weight.dtype
    encoder_len = 1 if encoder_mask is None else encoder_mask.size(-1)
    out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((b,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    model.setup_caches(b, dtype, encoder_max_seq_len=encoder_len, decoder_max_seq_len=total)
    try:
        kwargs = {"encoder_input": inputs.encoder_input} if isinstance(
            model, DeepFusionModel) else {}
        logits = model(inputs.tokens, mask=mask[:, :s], encoder_mask=encoder_mask,
                       input_pos=positions[:, :s], **kwargs)
        for step in range(max_new_tokens):
            token = next_token(logits[:, -1], temperature=temperature, top_k=top_k,
                               top_p=top_p, generator=generator)
            token = torch.where(done, pad_id, token)
            out[:, step] = token
            finished = ~done & torch.isin(token, eos)
            lengths = torch.where(finished, step + 1, lengths)
            done |= finished
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            at = s + step
            logits = model(token[:, None], mask=mask[:, at:at + 1],
                           encoder_mask=step_encoder_mask, input_pos=positions[:, at:at + 1])
    finally:
        model.teardown_caches()
    used = int(lengths.max())
    return GenerationOutput(tokens=out[:, :used].cpu(), lengths=tuple(lengths.tolist()))


def _default_eos_ids(model: Any) -> tuple[int, ...]:
    directory = getattr(model, "fused_path", None)
    return () if directory is None else generation_ids(directory)[0]


@dataclass(frozen=True)
class TextGeneration:
    """What :func:`generate_text` produced.

    Attributes:
        text: the new text (special tokens left out).
        prompt_ids: the prompt's token ids, image tokens included.
        new_ids: the new token ids (the eos token included where generation stopped at one).
        prepended_image_tokens: image tokens put in front of a prompt that had none.
        stopped_at_eos: generation ended at an eos token rather than at max_new_tokens.
    """

    text: str
    prompt_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    prepended_image_tokens: int
    stopped_at_eos: bool


def generate_text(
    path: str | os.PathLike[str],
    prompt: str,
    images: Sequence[str | os.PathLike[str]] = (),
    *,
    max_new_tokens: int = 32,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> TextGeneration:
    """Load a fused checkpoint, run a prompt (with image files) and decode what it adds:
    what ``fusesurgery generate`` runs.

    Args:
        path: a fused checkpoint directory, or a transformers export of one (``convert --to
            transformers``; read in memory, as ``load_fused`` reads it).
        prompt: the text; ``<|image|>`` where the images go (one is put in front when
            images are given and the prompt has none).
        images: image files, one per image token.
        max_new_tokens, temperature, top_k, top_p, seed: as :func:`generate`.
        device: where the model runs.
        dtype: cast the model first; None keeps the stored dtypes.

    Returns:
        :class:`TextGeneration`.

    Raises:
        InputError: an unreadable image, no tokenizer, image tokens that do not match the
            images, or bad options.
        ConfigError: a device this machine does not have.
        FuseSurgeryError: not a fused checkpoint.
    """
    from fusesurgery.validate.checks import check_device  # noqa: PLC0415 - the CLI's path

    _check_options(max_new_tokens, temperature, top_k, top_p, seed)
    check_device(device)
    directory = Path(local_export_path(path))  # a Hub repo of an export: its fetched files
    processor = load_processor(directory)
    pictures = [load_image(image) for image in images]
    inputs = processor(prompt, pictures or None)
    part = "model" if processor.config.encoder is not None else "decoder"
    # an export is read in memory through the opener load_fused uses: no native copy on disk
    model = load_fused_from(fused_opener(directory), directory, part=part, device=device,
                            dtype=dtype)
    output = generate(model, inputs, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_k=top_k, top_p=top_p, seed=seed, eos_ids=processor.eos_ids,
                      pad_id=processor.pad_id)
    new_ids = output.sequences()[0]
    return TextGeneration(
        text=processor.decode(new_ids), prompt_ids=tuple(inputs.tokens[0].tolist()),
        new_ids=tuple(new_ids), prepended_image_tokens=inputs.prepended_image_tokens[0],
        stopped_at_eos=bool(new_ids) and new_ids[-1] in processor.eos_ids)


__all__ = ["GenerationOutput", "TextGeneration", "generate", "generate_text", "next_token"]

"""``validate DIR`` for a transformers export (``fuse --format transformers`` or ``convert --to
transformers``): the identity at initialisation, proven through transformers' own classes.

Rows: the tensors are exactly what the configs describe; with ``--against`` the text model's
(or the tower's) tensors are the source's bit for bit; the export's text logits equal the
source ``AutoModelForCausalLM``'s (``--against``) or its own text model's, bitwise, text only
and with an image while every gate is zero (the text model is then fed the same input
embeddings: its own table's rows, the image token's row from the export).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from fusesurgery._arguments import SEED_LIMIT, check_int
from fusesurgery._device import check_device
from fusesurgery.errors import ConfigError
from fusesurgery.hf.anyfamily import checked_any_export
from fusesurgery.io import open_checkpoint
from fusesurgery.surgery.export_layout import TEXT_PREFIX, VISION_PREFIX, is_any_export
from fusesurgery.surgery.exported import checked_export
from fusesurgery.surgery.fused_config import GATE_SUFFIXES
from fusesurgery.validate.checks import (
    BITWISE,
    ORIGINAL_LOGITS,
    ORIGINAL_TENSORS,
    TRAINED,
    ZERO_GATE_IDENTITY,
    ValidationReport,
    _bitwise_equal,
    _max_diff,
)

PAIR_VISION_PREFIX = "vision_model."


def check_export_layout(report: ValidationReport, path: str) -> dict[str, tuple]:
    """The first row: the export's tensors are exactly what its config.json describes.

    Raises:
        FuseSurgeryError: half an export, a family this transformers lacks, other tensors.
    """
    with open_checkpoint(path) as source:
        if is_any_export(source.config):
            shapes = checked_any_export(source, path)
            how = "transformers' classes for its text_config and vision_config, on meta"
        else:
            _, native_of = checked_export(source, path)
            shapes = {name: entry[2] for name, entry in native_of.items()}
            how = "the fused model its fusion config describes"
    report.add("keys and shapes are what its config.json describes", True,
               f"{len(shapes)} tensors", how)
    add_processor_row(report, path)
    return shapes


def add_processor_row(report: ValidationReport, path: str) -> None:
    """An information row when ``AutoProcessor`` cannot load the export (nothing when it
    can): the model's checks still stand, its inputs need building by hand."""
    from fusesurgery.hf.export import processor_gaps, processor_notes  # noqa: PLC0415

    for note in processor_notes(path):
        gaps = processor_gaps(p.name for p in Path(path).iterdir())
        report.add("processor files", None, f"{', '.join(gaps)} missing", note)


def _against_part(names: set[str], theirs: set[str], against: object) -> tuple[str, dict]:
    """Which part ``against`` is, and export name -> its key.

    Raises:
        ConfigError: its keys are neither the text model's nor the tower's.
    """
    text = {n.removeprefix(TEXT_PREFIX) for n in names if n.startswith(TEXT_PREFIX)}
    if text == theirs:
        return "decoder", {TEXT_PREFIX + key: key for key in text}
    tower = {n.removeprefix(VISION_PREFIX) for n in names if n.startswith(VISION_PREFIX)}
    if tower <= theirs:
        return "encoder", {VISION_PREFIX + key: key for key in tower}
    if {PAIR_VISION_PREFIX + key for key in tower} <= theirs:
        return "encoder", {VISION_PREFIX + key: PAIR_VISION_PREFIX + key for key in tower}
    raise ConfigError(f"--against {against}: its tensors are neither the export's text model's "
                      "nor its tower's; give the original decoder (or vision tower)")


def _check_against(report: ValidationReport, path: str, against: str,
                   names: set[str]) -> str:
    with open_checkpoint(path) as export, open_checkpoint(against) as source:
        part, pairs = _against_part(names, set(source.infos()), against)
        differing = [name for name, key in pairs.items()
                     if not _bitwise_equal(export.get_tensor(name), source.get_tensor(key))]
        report.add(f"original {part} tensors equal {against}'s", not differing,
                   f"{len(pairs) - len(differing)}/{len(pairs)} equal {BITWISE}",
                   f"first differing: {differing[0]}" if differing else "",
                   basis=BITWISE, proves=ORIGINAL_TENSORS)
    return part


def _image_size(config) -> int:
    size = getattr(config.vision_config, "image_size", None)
    if isinstance(size, list | tuple):
        size = size[0]
    if not isinstance(size, int) or size <= 0:
        raise ConfigError("its vision_config states no image_size to draw a test image of")
    return size


def _test_image(config, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The model's image inputs of one random image per sample: ``pixel_values``
    ``[b, c, h, w]``, or for a NaFlex tower (``vision_naflex``) a whole image of its position
    grid cut into patches, ``[b, g*g, c*p*p]``, with its ``spatial_shapes`` and
    ``pixel_attention_mask``.

    Raises:
        ConfigError: the vision config states no size to draw an image of.
    """
    vision = config.vision_config
    channels = getattr(vision, "num_channels", 3)
    if not getattr(config, "vision_naflex", False):
        size = _image_size(config)
        return {"pixel_values": torch.rand(batch, channels, size, size, generator=generator)}
    positions, patch = getattr(vision, "num_patches", None), getattr(vision, "patch_size", None)
    side = math.isqrt(positions) if isinstance(positions, int) and positions > 0 else 0
    if side * side != positions or not isinstance(patch, int) or patch <= 0:
        raise ConfigError("its vision_config states no square num_patches and patch_size to "
                          "draw a test image of")
    return {"pixel_values": torch.rand(batch, side * side, channels * patch * patch,
                                       generator=generator),
            "spatial_shapes": torch.tensor([[side, side]] * batch),
            "pixel_attention_mask": torch.ones(batch, side * side, dtype=torch.long)}


def validate_export(
    path: str | os.PathLike[str],
    *,
    against: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    batch: int = 1,
    seq_len: int = 8,
) -> ValidationReport:
    """Validate a transformers export with transformers' own classes.

    Args:
        path: the export directory.
        against: the source decoder (or tower): its tensors must be the export's, bit for bit,
            and (a decoder) its own ``AutoModelForCausalLM`` logits the export's.
        device: ``cpu`` or ``cuda`` (``cuda:N``).
        dtype: load both models in this dtype; None keeps the stored one.
        seed: seed of the random tokens and image.
        batch: batch size.
        seq_len: tokens per row (at least 4).

    Returns:
        The report (see ``ValidationReport``).

    Raises:
        FuseSurgeryError: not an export, half an export, a family this transformers lacks,
            tensors other than its config describes, a bad ``against``, device or size.
    """
    path = str(path)
    check_device(device)
    check_int("seed", seed, 0, SEED_LIMIT)
    check_int("batch", batch, 1, 2**31)
    check_int("seq_len", seq_len, 4, 2**31)
    report = ValidationReport(path=path, device=str(torch.device(device)))
    names = set(check_export_layout(report, path))
    part = None if against is None else _check_against(report, path, str(against), names)

    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText  # noqa: PLC0415

    from fusesurgery.hf import register_transformers  # noqa: PLC0415

    register_transformers()
    loaded = {"dtype": dtype if dtype is not None else "auto"}
    model = AutoModelForImageTextToText.from_pretrained(path, **loaded).to(device).eval()
    config = model.config
    if part == "decoder":
        reference = AutoModelForCausalLM.from_pretrained(str(against), **loaded)
        reference = reference.to(device).eval()
        whose = f"{against}'s AutoModelForCausalLM"
    else:
        reference, whose = model.language_model, "its own text model (fusion layers skipped)"
    gates = {name: float(p.detach().float().abs().max())
             for name, p in model.named_parameters() if name.endswith(GATE_SUFFIXES)}
    trained = any(value != 0.0 for value in gates.values())
    generator = torch.Generator().manual_seed(seed)
    vocab = config.text_vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    with_image = ids.clone()
    with_image[:, 1] = config.image_token_id
    image = {name: value.to(device) for name, value in
             _test_image(config, batch, generator).items()}
    ids, with_image = ids.to(device), with_image.to(device)
    image["pixel_values"] = image["pixel_values"].to(
        dtype=next(model.vision_tower.parameters()).dtype)

    with torch.no_grad():
        ours = model(input_ids=ids, use_cache=False).logits
        theirs = reference(input_ids=ids, use_cache=False).logits
        finite = _finite(ours, theirs)
        same = finite and _bitwise_equal(ours, theirs)
        proves = ORIGINAL_LOGITS if part == "decoder" else ZERO_GATE_IDENTITY
        report.add(f"text-only logits equal {whose}",
                   None if trained and finite and not same else same,
                   f"max |diff| {_max_diff(ours, theirs):.3g}", "" if same else
                   "the gates are nonzero: the fusion is trained" if finite else NOT_FINITE,
                   basis=BITWISE, proves=proves)
        ours = model(input_ids=with_image, use_cache=False, **image).logits
        table = reference.get_input_embeddings()(with_image.clamp(max=vocab - 1))
        new = model.embed_tokens(with_image).to(table.dtype)
        embeds = torch.where((with_image >= vocab).unsqueeze(-1), new, table)
        theirs = reference(inputs_embeds=embeds, use_cache=False).logits
        finite = _finite(ours, theirs)
        same = finite and _bitwise_equal(ours, theirs)
        report.add(f"logits with an image equal {whose}",
                   None if trained and finite else same,
                   f"max |diff| {_max_diff(ours, theirs):.3g}", NOT_FINITE if not finite else
                   "zero gates: the image adds exactly nothing" if same and not trained else
                   "the gates are nonzero: the image changes the logits, as trained",
                   basis=BITWISE, proves=TRAINED if trained else ZERO_GATE_IDENTITY)
    nonzero = sum(value != 0.0 for value in gates.values())
    report.add("gates", None, f"{nonzero}/{len(gates)} nonzero",
               "trained: no longer an identity" if trained else "all zero: an identity")
    report.identity = not trained and all(c.status != "fail" for c in report.checks)
    return report


NOT_FINITE = "non-finite logits (NaN or inf): equal bits prove nothing"


def _finite(*logits: torch.Tensor) -> bool:
    """Whether every logit is finite: NaNs with the same bits are no agreement."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in logits)


__all__ = ["check_export_layout", "validate_export"]

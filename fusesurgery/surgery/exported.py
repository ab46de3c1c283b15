"""A transformers export read as the fused checkpoint it holds: its tensors under their native
fused names (the decoder's q/k rows back in the native rotary order, a stacked tensor's parts
as row ranges, read lazily), and the fusion config its ``config.json`` carries.

The export's key map lives here, below every reader of fused checkpoints, so that
``load_fused``, ``generate``, ``validate`` and ``convert --to native`` read an export through
the one opener (:func:`open_export`, chosen by :func:`open_any_fused`) with no temporary
native copy. Nothing read is trusted: the export's keys and shapes must be exactly those the
fusion config it carries describes (each native key mapped by :func:`exported_key`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from fusesurgery import _json as standard_json
from fusesurgery.convert.keymaps import (
    FUSED_DECODER_PREFIX,
    FUSED_PROJECTION_PREFIX,
    FUSED_VISION_PREFIX,
    HF_VISION_PREFIX,
    StackedKey,
    from_native_key,
    stacked_key,
)
from fusesurgery.convert.mllama import FUSED_FUSION_EMBEDDING
from fusesurgery.convert.plan import ConversionPlan, PlanEntry, _rope_transform
from fusesurgery.convert.tokenizer import TOKENIZER_FILES
from fusesurgery.convert.transforms import IDENTITY, TAKE_ROWS, Transform, invert_transform
from fusesurgery.errors import ConfigError, FuseSurgeryError, KeyMapError
from fusesurgery.io import open_checkpoint
from fusesurgery.io._files import read_side_file
from fusesurgery.modules import DeepFusionModel, TransformerDecoder
from fusesurgery.surgery.export_layout import (
    CROSS_PREFIX,
    EXPORT_TARGET,
    FUSE_RECORD_FIELD,
    FUSION_CONFIG_FIELD,
    FUSION_EMBEDDING_KEY,
    PROCESSOR_CLASS,
    PROJECTION_PREFIX,
    TEXT_PREFIX,
    VISION_PREFIX,
    check_export_config,
    check_template_files,
    check_tensor_shapes,
    is_any_export,
    is_export_directory,
    is_transformers_export,
    local_export_path,
    native_model_types,
)
from fusesurgery.surgery.fused import (
    FusedOpener,
    FusedView,
    build_fused_model,
    check_tokenizer,
    gate_scalars,
    load_fused_from,
    open_fused,
)
from fusesurgery.surgery.fused_config import FusedConfig, fused_config_from_dict

_FUSION_SEGMENT = ".fusion_layer."


def exported_key(key: str, config: FusedConfig) -> tuple[str, Transform]:
    """The exported name of a native fused key, and the transform of its rows.

    Raises:
        KeyMapError: a key with no place in the exported model (an opaque encoder tensor).
    """
    if key == FUSED_FUSION_EMBEDDING:
        return FUSION_EMBEDDING_KEY, (IDENTITY,)
    if key.startswith(FUSED_DECODER_PREFIX + "layers.") and _FUSION_SEGMENT in key:
        layer, _, local = key.removeprefix(FUSED_DECODER_PREFIX + "layers.").partition(
            _FUSION_SEGMENT)
        return f"{CROSS_PREFIX}{layer}.{local}", (IDENTITY,)
    if key.startswith(FUSED_DECODER_PREFIX):
        local = key.removeprefix(FUSED_DECODER_PREFIX)
        return (TEXT_PREFIX + from_native_key(local, "hf", "decoder", config.decoder.family),
                _rope_transform(local, "native", "hf", config.decoder))
    if key.startswith(FUSED_VISION_PREFIX):
        name = from_native_key(key.removeprefix(FUSED_VISION_PREFIX), "hf", "vision",
                               family=None if config.encoder is None else config.encoder.family)
        return VISION_PREFIX + name.removeprefix(HF_VISION_PREFIX), (IDENTITY,)
    if key.startswith(FUSED_PROJECTION_PREFIX):
        return PROJECTION_PREFIX + key.removeprefix(FUSED_PROJECTION_PREFIX), (IDENTITY,)
    raise KeyMapError(f"{key!r} has no place in the transformers export")


def decoder_stacked_key(key: str, config: FusedConfig) -> StackedKey | None:
    """The tensor of the decoder's transformers names that stacks native fused ``key`` with
    others (Phi-3's ``qkv_proj``, ``gate_up_proj``; its name without ``language_model.``), or
    None where ``key`` is exported on its own."""
    if not key.startswith(FUSED_DECODER_PREFIX) or _FUSION_SEGMENT in key:
        return None
    return stacked_key(key.removeprefix(FUSED_DECODER_PREFIX), "hf", "decoder",
                       config.decoder.family)


def _native_shapes(config: FusedConfig) -> dict[str, tuple[int, ...]]:
    """Native fused key -> shape, of the model ``config`` describes (built on meta)."""
    with torch.device("meta"):
        model = build_fused_model(config)
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


class ExportedTensor(NamedTuple):
    """Where one tensor of an export comes from in the fused checkpoint.

    Attributes:
        native_key: its native fused key (a stacked tensor's: its first part's).
        transform: what turns its rows back into the native ones.
        shape: its shape in the export.
        parts: for a tensor stacking several native ones (Phi-3's ``qkv_proj``): each
            part's native key, its rows ``[start, stop)`` and its native shape; else empty.
    """

    native_key: str
    transform: Transform
    shape: tuple[int, ...]
    parts: tuple[tuple[str, int, int, tuple[int, ...]], ...] = ()


def _exported_tensors(config: FusedConfig) -> dict[str, ExportedTensor]:
    """Exported name -> :class:`ExportedTensor`, of the model ``config`` describes.

    Raises:
        ConfigError: a stacked part whose rows would need reordering too.
    """
    native_of: dict[str, ExportedTensor] = {}
    stacks: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in _native_shapes(config).items():
        name, transform = exported_key(key, config)
        stacked = decoder_stacked_key(key, config)
        if stacked is None:
            native_of[name] = ExportedTensor(key, invert_transform(transform), shape)
            continue
        if transform != (IDENTITY,):
            raise ConfigError(f"{key}: a part of {stacked.key} whose rows move as well, which "
                              "no family does")
        stacks.setdefault(name, {})[key] = shape
        native_of.setdefault(name, ExportedTensor(key, (IDENTITY,), ()))
    for name, shapes in stacks.items():
        order = decoder_stacked_key(native_of[name].native_key, config).parts
        parts, start = [], 0
        for part in order:
            rows = shapes[FUSED_DECODER_PREFIX + part][0]
            parts.append((FUSED_DECODER_PREFIX + part, start, start + rows,
                          shapes[FUSED_DECODER_PREFIX + part]))
            start += rows
        first = parts[0][3]
        native_of[name] = ExportedTensor(parts[0][0], (IDENTITY,), (start, *first[1:]),
                                         tuple(parts))
    return native_of


def _side_directory(source) -> Path:
    path = Path(source.path)
    return path if path.is_dir() else path.parent


def checked_export(source, path: object) -> tuple[FusedConfig, dict[str, ExportedTensor]]:
    """The fusion config an export carries, and exported name -> :class:`ExportedTensor`
    (native key, transform back, shape, stacked parts), its keys and shapes checked against
    the export's tensors.

    Raises:
        FuseSurgeryError: not an export, a damaged fusion config, or other tensors.
    """
    if source.config_file != "config.json" or not is_transformers_export(source.config):
        raise ConfigError(f"{path} is not a transformers export of a fused checkpoint "
                          "(its config.json's model_type is not 'fusesurgery_fused')")
    check_template_files(_side_directory(source), path)
    if is_any_export(source.config):
        raise ConfigError(_no_native_message(source.config, path))
    origin = f"{path}/config.json: {FUSION_CONFIG_FIELD}"
    config = fused_config_from_dict(source.config.get(FUSION_CONFIG_FIELD), origin)
    if config.encoder is None:
        raise ConfigError(f"{origin}: a fused model without a vision tower is no export")
    stated = source.config.get("fusion_norm_unit_offset", False)
    if stated is not config.fusion.norm_unit_offset:
        # transformers builds the fusion norms from the top-level field, the way back from
        # the carried fusion config: they must describe the same model
        raise ConfigError(f"{path}/config.json: fusion_norm_unit_offset is {stated!r}, its "
                          f"{FUSION_CONFIG_FIELD} says norm_unit_offset "
                          f"{config.fusion.norm_unit_offset}: an edited config.json")
    check_export_config(source.config, config, path)
    native_of = _exported_tensors(config)
    infos = source.infos()
    check_tensor_shapes(infos, {name: tensor.shape for name, tensor in native_of.items()},
                        path, "fusion config")
    return config, native_of


def _no_native_message(document: dict, path: object) -> str:
    """Why a directory ``fuse --format transformers`` wrote has no native form."""
    sources = document[FUSE_RECORD_FIELD].get("sources") or {}
    families = [(role, (sources.get(part) or {}).get("family"))
                for role, part in (("decoder", "decoder"), ("tower", "encoder"))]
    decoders, towers = native_model_types()
    missing = [f"its {role}'s family {family!r}" for (role, family), known in
               zip(families, (decoders, towers), strict=True) if family not in known]
    if missing:
        verb = "has" if len(missing) == 1 else "have"
        return (f"{path} was fused straight into the transformers layout (fuse --format "
                f"transformers) and {' and '.join(missing)} {verb} no native module: it has "
                "no native form (validate, unfuse, diff, inspect and push take it as it is)")
    return (f"{path} was fused straight into the transformers layout (fuse --format "
            "transformers): for a native fused checkpoint fuse the sources without --format")


def no_native_form(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` has no native form when ``fuse --format transformers`` wrote it (its
    config.json says so), else None (other directories, or a config.json that is no JSON:
    the readers report what is wrong with it)."""
    try:
        document = json.loads(read_side_file(Path(path) / "config.json"))
    except (FuseSurgeryError, OSError, ValueError):
        return None
    return _no_native_message(document, path) if is_any_export(document) else None


def export_plan(source, native_of: Mapping[str, ExportedTensor]) -> ConversionPlan:
    """The export's tensors as a conversion to the native fused layout, in the export's order
    (the fused checkpoint's): one entry per native tensor, a stacked tensor's parts each one
    row range of it. The one map ``import_transformers`` (which writes it) and every reader
    of an export in memory (:func:`open_export`) use.

    Args:
        source: the open export.
        native_of: exported name -> :class:`ExportedTensor`, as :func:`checked_export` gives.
    """
    entries: list[PlanEntry] = []
    for name, info in source.infos().items():
        key, transform, shape, parts = native_of[name]
        if not parts:
            entries.append(PlanEntry(target_key=key, source_key=name, transform=transform,
                                     source_shape=shape, source_dtype=info.dtype, shape=shape,
                                     dtype=info.dtype))
            continue
        entries.extend(  # each part one byte range of the stacked rows
            PlanEntry(target_key=part, source_key=name, transform=(TAKE_ROWS, start, stop),
                      source_shape=shape, source_dtype=info.dtype, shape=part_shape,
                      dtype=info.dtype)
            for part, start, stop, part_shape in parts)
    return ConversionPlan(kind="fused", source_layout=EXPORT_TARGET, target_layout="native",
                          entries=tuple(entries), dropped=())


def with_gates_read(config: FusedConfig, view: FusedView) -> FusedConfig:
    """``config`` with the gate values the export's tensors hold (a model trained and saved
    with transformers carries the fusion config it was exported with): ``trained`` once any
    gate is nonzero, so neither a written fusion_config.json nor a loaded model's
    ``fused_config`` claims an identity that no longer holds."""
    gates = gate_scalars(view)
    trained = config.trained or any(value != 0.0 for value in gates.values())
    return config.replace(gates=gates, trained=trained)


PROCESSOR_CONFIG_FILE = "processor_config.json"
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
# what a native fused checkpoint carries beside its weights, taken from an export
_NATIVE_SIDE_FILES: tuple[str, ...] = (*TOKENIZER_FILES, "generation_config.json",
                                       PREPROCESSOR_CONFIG_FILE, PROCESSOR_CONFIG_FILE)


def native_side_files(directory: Path) -> dict[str, bytes | str]:
    """The tokenizer, generation and image-processor files for the native layout. The
    export's own ``processor_config.json`` names a class only the export has, so it stays
    behind; a processor saved with ``save_pretrained`` holds the tower's image-processor
    config inside it, which becomes ``preprocessor_config.json`` again.

    Raises:
        FuseSurgeryError: a file present but unreadable, or a processor config that is not
            JSON.
    """
    found: dict[str, bytes | str] = {name: read_side_file(directory / name)
                                     for name in _NATIVE_SIDE_FILES
                                     if os.path.lexists(directory / name)}
    processor = found.get(PROCESSOR_CONFIG_FILE)
    document = None
    if processor is not None:
        try:
            document = json.loads(processor)
        except ValueError as error:
            raise ConfigError(f"{directory / PROCESSOR_CONFIG_FILE}: not valid JSON "
                              f"({error})") from None
    if isinstance(document, dict) and document.get("processor_class") == PROCESSOR_CLASS:
        del found[PROCESSOR_CONFIG_FILE]
        nested = document.get("image_processor")
        if PREPROCESSOR_CONFIG_FILE not in found and isinstance(nested, dict):
            found[PREPROCESSOR_CONFIG_FILE] = standard_json.dumps(nested, indent=2) + "\n"
    return found


@contextmanager
def open_export(path: str | os.PathLike[str]) -> Iterator[tuple[FusedView, FusedConfig]]:
    """Open a transformers export as :func:`~fusesurgery.surgery.fused.open_fused` opens a
    fused checkpoint: a view of its tensors under their native fused names (the q/k rows
    back in the native order, a stacked tensor's parts as row ranges, read lazily), and the
    fusion config it carries, with the gates its tensors hold (a model trained and saved with
    transformers carries the config it was exported with).

    Raises:
        FuseSurgeryError: a directory ``fuse --format transformers`` wrote (it has no native
            form: the message names what loads it), not an export, a half export (a
            modeling file missing, an edited config.json), a damaged carried fusion config,
            other keys or shapes than it describes, or new tokens its tokenizer lacks.
    """
    with open_checkpoint(path) as source:
        if source.config_file == "config.json" and is_any_export(source.config):
            raise ConfigError(f"{_no_native_message(source.config, path)}; load it with "
                              "transformers' AutoModelForImageTextToText.from_pretrained"
                              f"({str(path)!r})")
        config, native_of = checked_export(source, path)
        view = FusedView(source, export_plan(source, native_of))
        directory = _side_directory(source)
        view.side_files = lambda: native_side_files(directory)
        check_tokenizer(directory, config, f"{directory / 'config.json'}")
        yield view, with_gates_read(config, view)


def fused_opener(path: object) -> FusedOpener:
    """The opener of the fused checkpoint at ``path``: :func:`open_export` for a transformers
    export, :func:`~fusesurgery.surgery.fused.open_fused` for anything else (which names what
    is wrong with it)."""
    return open_export if is_export_directory(path) else open_fused


def load_fused(
    path: str | os.PathLike[str],
    *,
    part: str = "model",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
) -> DeepFusionModel | TransformerDecoder:
    """Load a fused checkpoint as a ``DeepFusionModel`` (or its fused decoder alone).

    Built on the meta device, every tensor assigned from the checkpoint's memory map
    (``strict=True``: the keys and shapes must be exactly the model's), so loading costs no
    memory until pages are touched; with ``dtype``, a non-CPU ``device``, or a layout that
    rewrites tensors (Mllama's permuted q/k rows and split embedding, a transformers export's
    permuted q/k rows), those tensors are copied. A transformers export's stacked tensors
    (Phi-3's ``qkv_proj``, ``gate_up_proj``) load as row views of the file.

    Args:
        path: a fused checkpoint directory written by fusesurgery, a transformers export of
            one (``convert --to transformers``; loaded in memory, as ``convert DIR --to
            native`` would write it; a Hub repo id of one too), or a transformers Mllama
            checkpoint
            (``MllamaForCausalLM``, ``MllamaForConditionalGeneration``).
        part: ``model`` for the whole ``DeepFusionModel``, ``decoder`` for the fused
            ``TransformerDecoder`` alone (the only part of an Mllama checkpoint with a native
            module).
        device: where the model ends up.
        dtype: cast every floating-point tensor; None keeps the stored dtypes.
        decoder_trainable: train the decoder's original parameters too.
        encoder_trainable: train the encoder's original parameters too.
        fusion_trainable: train the fusion parameters (new layers, tokens, projection).

    Returns:
        The model; ``.fused_config`` is its :class:`FusedConfig` (an export's: the one it
        carries, with the gate values its tensors hold) and ``.fused_path`` the directory it
        came from (``save_fused`` reads both).

    Raises:
        FuseSurgeryError: not a fused checkpoint, an unknown part or device, an argument of
            the wrong type, a whole model asked of an encoder with no native module, tensors
            that do not match the model; of an export, what ``convert DIR --to native``
            refuses (a half export, an edited config.json), or a directory ``fuse --format
            transformers`` wrote (no native form: transformers' ``AutoModelForImageTextToText``
            loads it).
    """
    path = local_export_path(path)  # a Hub repo of an export: its fetched directory
    return load_fused_from(fused_opener(path), path, part=part, device=device, dtype=dtype,
                           decoder_trainable=decoder_trainable,
                           encoder_trainable=encoder_trainable, fusion_trainable=fusion_trainable)


def open_any_fused(path: str | os.PathLike[str]):
    """Open a fused checkpoint of any layout fusesurgery reads (its own, Mllama's, a
    transformers export) as ``(view, config)``: a context manager, as
    :func:`~fusesurgery.surgery.fused.open_fused`.

    Raises:
        FuseSurgeryError: as :func:`open_fused` or :func:`open_export`.
    """
    return fused_opener(path)(path)


def read_any_fused_config(path: str | os.PathLike[str]) -> FusedConfig:
    """The fusion config of the fused checkpoint at ``path``, whichever layout holds it
    (fusesurgery's own ``fusion_config.json``, Mllama's, or the one a transformers export
    carries, with the gates its tensors hold; a Hub repo of an export too), checked as every
    reader checks it.

    Raises:
        FuseSurgeryError: as :func:`open_any_fused`.
    """
    with open_any_fused(local_export_path(path)) as (_, config):
        return config


__all__ = ["ExportedTensor", "checked_export", "decoder_stacked_key", "export_plan",
           "exported_key", "fused_opener", "load_fused", "native_side_files",
           "no_native_form", "open_any_fused", "open_export", "read_any_fused_config",
           "with_gates_read"]

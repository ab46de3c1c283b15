"""A transformers export (``convert --to transformers``) back to fusesurgery's fused layout,
streaming, atomic: every tensor under its native fused name, the decoder's q/k rows back in
the native rotary order, ``fusion_config.json`` and the kept ``source/`` files as they were.

Nothing read is trusted: the export's keys and shapes must be exactly those the fusion config
it carries describes (each native key mapped by :func:`~fusesurgery.hf.export.exported_key`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fusesurgery import _json as standard_json
from fusesurgery.convert.configs import config_style
from fusesurgery.convert.keymaps import FUSED_DECODER_PREFIX, FUSED_VISION_PREFIX
from fusesurgery.convert.plan import ConversionPlan, PlanEntry
from fusesurgery.convert.transforms import IDENTITY, TAKE_ROWS, Transform, invert_transform
from fusesurgery.errors import ConfigError, FuseSurgeryError, ShapeError
from fusesurgery.hf import EXPORT_TARGET
from fusesurgery.hf.anyfamily import (
    FUSE_RECORD_FIELD,
    _native_model_types,
    check_template_files,
    checked_any_export,
    is_any_export,
)
from fusesurgery.hf.export import (
    FUSION_CONFIG_FIELD,
    MODEL_TYPE,
    PROCESSOR_CLASS,
    TEXT_PREFIX,
    VISION_PREFIX,
    decoder_stacked_key,
    exported_key,
    processor_notes,
)
from fusesurgery.io import TensorInfo, open_checkpoint
from fusesurgery.io._files import file_fingerprint, read_side_file
from fusesurgery.io.checkpoint import FUSION_CONFIG_FILE
from fusesurgery.io.tensor_info import dtype_name
from fusesurgery.surgery.fused import FusedView, build_fused_model, check_tokenizer, gate_scalars
from fusesurgery.surgery.fused_config import (
    SOURCE_FILES_DIR,
    FusedConfig,
    fused_config_from_dict,
)
from fusesurgery.write.convert_checkpoint import plan_entry_source
from fusesurgery.write.safetensors_writer import WriteResult, write_safetensors
from fusesurgery.write.shard_plan import DEFAULT_MAX_SHARD_SIZE
from fusesurgery.write.side_files import (
    DECODER_SIDE_FILES,
    ENCODER_SIDE_FILES,
    json_object,
    read_kept_source_files,
    read_side_files,
    side_directory,
)

PART_PREFIXES: dict[str, str] = {"decoder": TEXT_PREFIX, "encoder": VISION_PREFIX}
PART_CONFIGS: dict[str, str] = {"decoder": "text_config", "encoder": "vision_config"}


def is_transformers_export(document: object) -> bool:
    """Whether a config.json document is an export's (``model_type`` fusesurgery_fused)."""
    return isinstance(document, dict) and document.get("model_type") == MODEL_TYPE


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


def _checked_export(source, path: object) -> tuple[FusedConfig, dict[str, ExportedTensor]]:
    """The fusion config an export carries, and exported name -> :class:`ExportedTensor`
    (native key, transform back, shape, stacked parts), its keys and shapes checked against
    the export's tensors.

    Raises:
        FuseSurgeryError: not an export, a damaged fusion config, or other tensors.
    """
    if source.config_file != "config.json" or not is_transformers_export(source.config):
        raise ConfigError(f"{path} is not a transformers export of a fused checkpoint "
                          f"(its config.json's model_type is not {MODEL_TYPE!r})")
    check_template_files(side_directory(source), path)
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
    naflex = source.config.get("vision_naflex", False)
    if naflex is not config.encoder.naflex:  # the exported code feeds the tower by it
        raise ConfigError(f"{path}/config.json: vision_naflex is {naflex!r}, its "
                          f"{FUSION_CONFIG_FIELD}'s tower ({config.encoder.family}) is "
                          f"{'' if config.encoder.naflex else 'not '}a NaFlex one: an edited "
                          "config.json")
    native_of = _exported_tensors(config)
    infos = source.infos()
    missing = sorted(set(native_of) - set(infos))
    unexpected = sorted(set(infos) - set(native_of))
    if missing or unexpected:
        raise ShapeError(f"{path}: its tensors are not the ones its fusion config "
                         f"describes: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, info in infos.items():
        if tuple(info.shape) != native_of[name][2]:
            raise ShapeError(f"{path}: {name} is {list(info.shape)}, its fusion config needs "
                             f"{list(native_of[name][2])}")
    return config, native_of


def _no_native_message(document: dict, path: object) -> str:
    """Why a directory ``fuse --format transformers`` wrote has no native form."""
    sources = document[FUSE_RECORD_FIELD].get("sources") or {}
    families = [(role, (sources.get(part) or {}).get("family"))
                for role, part in (("decoder", "decoder"), ("tower", "encoder"))]
    decoders, towers = _native_model_types()
    missing = [f"its {role}'s family {family!r}" for (role, family), known in
               zip(families, (decoders, towers), strict=True) if family not in known]
    if missing:
        return (f"{path} was fused straight into the transformers layout and "
                f"{' and '.join(missing)} {'has' if len(missing) == 1 else 'have'} no native "
                "module: it has no native form (validate, unfuse, diff, inspect and push take "
                "it as it is)")
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
        config, native_of = _checked_export(source, path)
        view = FusedView(source, export_plan(source, native_of))
        directory = side_directory(source)
        view.side_files = lambda: _native_side_files(directory)
        check_tokenizer(directory, config, f"{directory / 'config.json'}")
        yield view, _with_gates_read(config, view)


GATE_SUFFIXES: tuple[str, ...] = (".ca_scale.scale", ".mlp_scale.scale")
PROCESSOR_CONFIG_FILE = "processor_config.json"
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"


def _native_side_files(directory: Path) -> dict[str, bytes | str]:
    """The tokenizer, generation and image-processor files for the native layout. The
    export's own ``processor_config.json`` names a class only the export has, so it stays
    behind; a processor saved with ``save_pretrained`` holds the tower's image-processor
    config inside it, which becomes ``preprocessor_config.json`` again."""
    found: dict[str, bytes | str] = dict(
        read_side_files(directory, (*DECODER_SIDE_FILES, *ENCODER_SIDE_FILES)))
    processor = found.get(PROCESSOR_CONFIG_FILE)
    document = None if processor is None else json_object(
        processor, directory / PROCESSOR_CONFIG_FILE)
    if document is not None and document.get("processor_class") == PROCESSOR_CLASS:
        del found[PROCESSOR_CONFIG_FILE]
        nested = document.get("image_processor")
        if PREPROCESSOR_CONFIG_FILE not in found and isinstance(nested, dict):
            found[PREPROCESSOR_CONFIG_FILE] = standard_json.dumps(nested, indent=2) + "\n"
    return found


def export_plan(source, native_of: Mapping[str, ExportedTensor]) -> ConversionPlan:
    """The export's tensors as a conversion to the native fused layout, in the export's order
    (the fused checkpoint's): one entry per native tensor, a stacked tensor's parts each one
    row range of it. The one map both ``import_transformers`` (which writes it) and
    ``load_fused`` of an export (which loads it, in memory) read.

    Args:
        source: the open export.
        native_of: exported name -> :class:`ExportedTensor`, as :func:`_checked_export` gives.
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


def _with_gates_read(config: FusedConfig, view: FusedView) -> FusedConfig:
    """``config`` with the gate values the export's tensors hold (a model trained and saved
    with transformers carries the fusion config it was exported with): ``trained`` once any
    gate is nonzero, so neither a written fusion_config.json nor a loaded model's
    ``fused_config`` claims an identity that no longer holds."""
    gates = gate_scalars(view)
    trained = config.trained or any(value != 0.0 for value in gates.values())
    return config.replace(gates=gates, trained=trained)


PART_NATIVE_PREFIXES: dict[str, str] = {"decoder": FUSED_DECODER_PREFIX,
                                        "encoder": FUSED_VISION_PREFIX}


def _recorded_source(record: Mapping[str, Any]):
    """The source checkpoint a fusion config's ``sources`` record names, opened, where it is a
    local transformers-layout checkpoint whose files are still the ones fuse read (their
    header fingerprints); else None."""
    where = record.get("path")
    files = record.get("files")
    if (not isinstance(where, str) or record.get("layout") != "hf" or not isinstance(files, list)
            or not Path(where).exists()):
        return None
    try:
        theirs = open_checkpoint(where)
    except FuseSurgeryError:
        return None
    try:
        now = sorted((file_fingerprint(Path(f)) for f in theirs.files),
                     key=lambda f: str(f["name"]))
        recorded = sorted(files, key=lambda f: str(f.get("name")) if isinstance(f, dict) else "")
    except FuseSurgeryError:
        now, recorded = None, []
    if now != recorded:
        theirs.close()
        return None
    return theirs


def changed_originals(config: FusedConfig, source, native_of: Mapping[str, tuple]
                      ) -> tuple[str, ...] | None:
    """The native keys of the export's original (text model and tower) tensors whose values
    are no longer their sources' (a decoder trained, or LoRA merged into it, in transformers),
    compared bitwise with the sources fuse read (each cast to the export's dtype first, as
    ``fuse --dtype`` cast it). None when a source cannot be read as fuse read it (moved,
    changed, on the Hub, or not a transformers checkpoint): nothing can then be shown.

    Raises:
        FuseSurgeryError: an unreadable tensor of the export.
    """
    from fusesurgery.write.save_fused import _bitwise_equal, _cast  # noqa: PLC0415

    changed: list[str] = []
    for part, prefix in PART_PREFIXES.items():
        record = config.sources.get(part) or {}
        names = [name for name in source.infos() if name.startswith(prefix)]
        if not names:
            continue
        theirs = _recorded_source(record)
        if theirs is None:
            return None
        with theirs:
            keys = record.get("source_keys") if isinstance(record.get("source_keys"), dict) else {}
            available = theirs.infos()
            for name in names:
                key = native_of[name][0]
                local = key.removeprefix(PART_NATIVE_PREFIXES[part])
                their_key = keys.get(local, name.removeprefix(prefix))
                if their_key not in available:
                    return None
                ours = source.get_tensor(name)
                if not _bitwise_equal(_cast(theirs.get_tensor(their_key), ours.dtype), ours):
                    changed.append(key)
    return tuple(sorted(changed))


def import_transformers(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    durable: bool = True,
) -> tuple[FusedConfig, WriteResult]:
    """Write a transformers export back as the fused checkpoint it came from.

    Args:
        path: a directory written by ``convert --to transformers``.
        out_dir: the output directory (atomic; never an input, inside one or holding one).
        max_shard_size: largest shard.
        overwrite: replace an earlier fusesurgery output.
        on_progress: called with ``(bytes written, total bytes)`` after each tensor.
        durable: fsync before the output appears.

    Returns:
        The fusion config and the files written.

    Raises:
        FuseSurgeryError: not an export, a damaged carried fusion config, keys or shapes that
            are not the ones it describes, or an output that cannot be written.
    """
    with open_checkpoint(path) as source:
        config, native_of = _checked_export(source, path)
        plan = export_plan(source, native_of)
        out_infos = list(plan.target_infos().values())
        producers = {entry.target_key: lambda e=entry: plan_entry_source(e, source)
                     for entry in plan.entries}
        directory = side_directory(source)
        config = _with_gates_read(config, FusedView(source, plan))
        changed = changed_originals(config, source, native_of)
        if changed:  # trained in transformers, or a LoRA merged into the decoder: trained too
            config = config.replace(trained=True, trained_originals=tuple(sorted(
                {*config.trained_originals, *changed})))
        extra: dict[str, bytes | str] = {
            FUSION_CONFIG_FILE: standard_json.dumps(config.to_dict(), indent=2) + "\n",
            **_native_side_files(directory),
        }
        extra.update(read_kept_source_files(directory, config.sources))
        written = write_safetensors(
            out_dir, out_infos, lambda key: producers[key](), max_shard_size=max_shard_size,
            extra_files=extra, overwrite=overwrite, on_progress=on_progress, durable=durable,
            inputs=(directory, *source.paths_read))
    return config, written


def _part_config(source, directory: Path, part: str, record: dict, dtype: str) -> bytes | str:
    """The part's config.json: its source's own, byte for byte, where that is a transformers
    config of the dtype written; else the export's ``text_config`` / ``vision_config``."""
    kept = directory / SOURCE_FILES_DIR / part
    for name in ("config.json", "hf_config.json"):
        content = read_side_files(kept, (name,)).get(name)
        document = None if content is None else json_object(content, kept / name)
        if document is not None and config_style(document) == "hf" and not (
                isinstance(document.get("vision_config"), dict) or document.get(
                    "dtype", document.get("torch_dtype", dtype)) != dtype):
            return content
    return standard_json.dumps(source.config[PART_CONFIGS[part]], indent=2) + "\n"


def unfuse_export(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    part: str = "decoder",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    durable: bool = True,
) -> tuple[int, WriteResult, tuple[str, ...]]:
    """The text model (or the tower) of a transformers export on its own: a prefix strip of
    its keys (``language_model.`` / ``vision_tower.``), its bytes copied by the kernel, with
    its source's config (or the export's sub-config) and the source files fuse kept.

    Args:
        path: a directory written by ``convert --to transformers``.
        out_dir: the output directory (atomic; never an input, inside one or holding one).
        part: ``decoder`` or ``encoder``.
        max_shard_size: largest shard.
        overwrite: replace an earlier fusesurgery output.
        on_progress: called with ``(bytes written, total bytes)`` after each tensor.
        durable: fsync before the output appears.

    Returns:
        The number of tensors, the files written, and notes on the export (a tokenizer or
        image-processor file missing: its processor cannot load, though the part written is
        whole, its own files coming from ``source/``).

    Raises:
        FuseSurgeryError: an unknown part, not an export, keys or shapes other than its
            fusion config describes, or an output that cannot be written.
    """
    if part not in PART_PREFIXES:
        raise ConfigError(f"unknown part {part!r}; valid: {', '.join(PART_PREFIXES)}")
    prefix = PART_PREFIXES[part]
    with open_checkpoint(path) as source:
        if source.config_file == "config.json" and is_any_export(source.config):
            checked_any_export(source, path)
            sources = source.config[FUSE_RECORD_FIELD].get("sources") or {}
        else:
            config, _ = _checked_export(source, path)
            sources = config.sources
        infos = [TensorInfo(name.removeprefix(prefix), tuple(info.shape), info.dtype)
                 for name, info in source.infos().items() if name.startswith(prefix)]

        def produce(name: str):
            region = source.file_region(prefix + name)
            return region if region is not None else source.get_tensor(prefix + name)

        directory = side_directory(source)
        record = dict(sources.get(part, {}))
        kept = tuple(name for name in record.get("kept_files", ())
                     if name not in ("config.json", "hf_config.json"))
        dtype = dtype_name(infos[0].dtype)
        extra: dict[str, bytes | str] = {
            **read_side_files(directory / SOURCE_FILES_DIR / part, kept),
            "config.json": _part_config(source, directory, part, record, dtype),
        }
        written = write_safetensors(
            out_dir, infos, produce, max_shard_size=max_shard_size, extra_files=extra,
            overwrite=overwrite, on_progress=on_progress, durable=durable,
            inputs=(directory, *source.paths_read))
    return len(infos), written, processor_notes(directory)


__all__ = ["export_plan", "import_transformers", "is_transformers_export", "open_export",
           "unfuse_export"]

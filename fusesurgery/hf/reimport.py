"""A transformers export (``convert --to transformers``) back to fusesurgery's fused layout,
streaming, atomic: every tensor under its native fused name, the decoder's q/k rows back in
the native rotary order, ``fusion_config.json`` and the kept ``source/`` files as they were.

Nothing read is trusted: the export's keys and shapes must be exactly those the fusion config
it carries describes (each native key mapped by
:func:`~fusesurgery.surgery.exported.exported_key`); the reading itself is
:mod:`fusesurgery.surgery.exported`'s, which every reader of an export shares.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fusesurgery import _json as standard_json
from fusesurgery.convert.configs import config_style
from fusesurgery.convert.keymaps import FUSED_DECODER_PREFIX, FUSED_VISION_PREFIX
from fusesurgery.errors import ConfigError, FuseSurgeryError
from fusesurgery.hf.anyfamily import checked_any_export
from fusesurgery.hf.export import processor_notes
from fusesurgery.io import TensorInfo, open_checkpoint
from fusesurgery.io._files import file_fingerprint
from fusesurgery.io.checkpoint import FUSION_CONFIG_FILE
from fusesurgery.io.tensor_info import dtype_name
from fusesurgery.surgery.export_layout import (
    FUSE_RECORD_FIELD,
    TEXT_PREFIX,
    VISION_PREFIX,
    is_any_export,
    is_transformers_export,
)
from fusesurgery.surgery.exported import (
    checked_export,
    export_plan,
    native_side_files,
    no_native_form,
    open_export,
    with_gates_read,
)
from fusesurgery.surgery.fused import FusedView
from fusesurgery.surgery.fused_config import SOURCE_FILES_DIR, FusedConfig
from fusesurgery.write.convert_checkpoint import plan_entry_source
from fusesurgery.write.safetensors_writer import WriteResult, write_safetensors
from fusesurgery.write.shard_plan import DEFAULT_MAX_SHARD_SIZE
from fusesurgery.write.side_files import (
    json_object,
    read_kept_source_files,
    read_side_files,
    side_directory,
)
from fusesurgery.write.unfuse_checkpoint import kept_part_files

PART_PREFIXES: dict[str, str] = {"decoder": TEXT_PREFIX, "encoder": VISION_PREFIX}
PART_CONFIGS: dict[str, str] = {"decoder": "text_config", "encoder": "vision_config"}


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
        config, native_of = checked_export(source, path)
        plan = export_plan(source, native_of)
        out_infos = list(plan.target_infos().values())
        producers = {entry.target_key: lambda e=entry: plan_entry_source(e, source)
                     for entry in plan.entries}
        directory = side_directory(source)
        config = with_gates_read(config, FusedView(source, plan))
        changed = changed_originals(config, source, native_of)
        if changed:  # trained in transformers, or a LoRA merged into the decoder: trained too
            config = config.replace(trained=True, trained_originals=tuple(sorted(
                {*config.trained_originals, *changed})))
        extra: dict[str, bytes | str] = {
            FUSION_CONFIG_FILE: standard_json.dumps(config.to_dict(), indent=2) + "\n",
            **native_side_files(directory),
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


# the part's config files, which unfuse_export writes itself (_part_config)
_CONFIG_FILES: tuple[str, ...] = ("config.json", "hf_config.json")
# what an export holds beside its weights as the sources' own (its processor_config.json is
# the export's processor's, not the tower's)
_EXPORT_DIRECTORY_COPIES: tuple[str, ...] = ("generation_config.json",
                                             "preprocessor_config.json")


def unfuse_export(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    part: str = "decoder",
    allow_missing: bool = False,
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
        allow_missing: write the part even when files fuse kept of its source (under
            ``source/<part>/``, such as its tokenizer) are gone, as native unfuse does.
        max_shard_size: largest shard.
        overwrite: replace an earlier fusesurgery output.
        on_progress: called with ``(bytes written, total bytes)`` after each tensor.
        durable: fsync before the output appears.

    Returns:
        The number of tensors, the files written, and notes: kept source files that were
        gone (taken from the export, derived, or left out with ``allow_missing``), and a
        tokenizer or image-processor file missing beside the export's weights (its processor
        cannot load, though the part written is whole, its own files coming from
        ``source/``).

    Raises:
        FuseSurgeryError: an unknown part, not an export, keys or shapes other than its
            fusion config describes, a kept source file gone that cannot be derived (without
            ``allow_missing``), or an output that cannot be written.
    """
    if part not in PART_PREFIXES:
        raise ConfigError(f"unknown part {part!r}; valid: {', '.join(PART_PREFIXES)}")
    prefix = PART_PREFIXES[part]
    with open_checkpoint(path) as source:
        if source.config_file == "config.json" and is_any_export(source.config):
            checked_any_export(source, path)
            sources = source.config[FUSE_RECORD_FIELD].get("sources") or {}
        else:
            config, _ = checked_export(source, path)
            sources = config.sources
        infos = [TensorInfo(name.removeprefix(prefix), tuple(info.shape), info.dtype)
                 for name, info in source.infos().items() if name.startswith(prefix)]

        def produce(name: str):
            region = source.file_region(prefix + name)
            return region if region is not None else source.get_tensor(prefix + name)

        directory = side_directory(source)
        record = dict(sources.get(part, {}))
        notes: list[str] = []
        # the rule native unfuse follows: config.json is written here (the source's own,
        # else the export's sub-config); a kept file gone is an error unless allow_missing
        kept, recovered, missing = kept_part_files(
            directory, part, record, allow_missing, notes, replaced=_CONFIG_FILES,
            copies=_EXPORT_DIRECTORY_COPIES)
        if record.get("config_file") in missing:
            notes.append(f"{SOURCE_FILES_DIR}/{part}/{record['config_file']} is missing: "
                         f"config.json written from the export's {PART_CONFIGS[part]}")
        dtype = dtype_name(infos[0].dtype)
        extra: dict[str, bytes | str] = {
            **{name: content for name, content in {**recovered, **kept}.items()
               if name not in _CONFIG_FILES},
            "config.json": _part_config(source, directory, part, record, dtype),
        }
        written = write_safetensors(
            out_dir, infos, produce, max_shard_size=max_shard_size, extra_files=extra,
            overwrite=overwrite, on_progress=on_progress, durable=durable,
            inputs=(directory, *source.paths_read))
    return len(infos), written, (*notes, *processor_notes(directory))


__all__ = ["export_plan", "import_transformers", "is_transformers_export", "no_native_form",
           "open_export", "unfuse_export"]

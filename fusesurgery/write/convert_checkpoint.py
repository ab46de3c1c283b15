"""Convert a checkpoint between layouts on disk, streaming: read one tensor (mmap-backed),
transform it, write it, drop it. Peak memory is about the largest tensor."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from fusesurgery import _json as standard_json
from fusesurgery.convert import detect_model, plan_conversion
from fusesurgery.convert.configs import (
    HF_ARCHITECTURES,
    HF_MODEL_TYPES,
    config_style,
    hf_config_dict,
    meta_config_dict,
    native_config_dict,
    read_hf_decoder_config,
    set_hf_dtype,
)
from fusesurgery.convert.detect import DetectedModel
from fusesurgery.convert.plan import ConversionPlan, PlanEntry
from fusesurgery.convert.pooling_head import (
    HEAD_CONFIG_FIELD,
    HEAD_FAMILIES,
    HEAD_FILE,
    plan_pooling_head,
)
from fusesurgery.convert.tied_output import (
    TIED_OUTPUT_FIELD,
    hf_output_key,
    recorded_output_copy,
    resolve_stored_output,
    with_equal_reason,
    with_output_copy,
)
from fusesurgery.errors import ConfigError
from fusesurgery.io import (
    CheckpointSource,
    FileRegion,
    PermutedRegion,
    TensorInfo,
    open_checkpoint,
)
from fusesurgery.io._files import read_side_file
from fusesurgery.write.fused_convert import convert_fused
from fusesurgery.write.plan_sources import plan_entry_source, plan_entry_tensor, source_file_order
from fusesurgery.write.safetensors_writer import WriteResult, write_safetensors
from fusesurgery.write.shard_plan import DEFAULT_MAX_SHARD_SIZE
from fusesurgery.write.side_files import (
    DECODER_SIDE_FILES,
    ENCODER_SIDE_FILES,
    HF_CONFIG_SIDE_FILE,
    read_side_files,
    side_directory,
)
from fusesurgery.write.torch_writer import write_torch_checkpoint

CONFIG_WRITERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "native": native_config_dict,
    "hf": hf_config_dict,
    "meta": meta_config_dict,
}
# The config file each layout's readers look for.
CONFIG_FILES: dict[str, str] = {"native": "config.json", "hf": "config.json",
                                "meta": "params.json"}


def write_layout(
    out_dir: str | os.PathLike[str],
    layout: str,
    infos: list[TensorInfo],
    produce: Callable[[str], torch.Tensor | FileRegion | PermutedRegion],
    tensor_of: Callable[[str], torch.Tensor],
    **options: Any,
) -> WriteResult:
    """Write converted tensors in ``layout``'s file format: sharded safetensors, or for
    ``meta`` one ``consolidated.00.pth`` (``tensor_of`` gives tensors, mmap-backed where the
    bytes do not change). ``options`` are ``write_safetensors``' keywords."""
    if layout != "meta":
        return write_safetensors(out_dir, infos, produce, **options)
    for unused in ("max_shard_size", "new_shard_at"):
        options.pop(unused, None)
    return write_torch_checkpoint(out_dir, infos, tensor_of, **options)


def vision_tower_config(document: dict[str, Any], family: str) -> dict[str, Any]:
    """The config.json of a vision tower alone: ``document`` itself when it is one, else a
    whole ``CLIPModel`` / ``SiglipModel`` config's ``vision_config`` made a config of its own
    (``CLIPVisionConfig`` / ``SiglipVisionConfig``, the architecture its keys load into, the
    dtype and transformers version of the whole), so that ``AutoModel`` builds the vision
    model and no random text tower beside the weights."""
    section = document.get("vision_config")
    if not isinstance(section, dict):
        return document
    tower = {"architectures": [HF_ARCHITECTURES[family]], "model_type": HF_MODEL_TYPES[family],
             **{key: value for key, value in section.items() if key != "architectures"}}
    for key in ("dtype", "torch_dtype", "transformers_version"):
        if key in document and key not in tower:
            tower[key] = document[key]
    return tower


@dataclass(frozen=True)
class ConversionResult:
    """Attributes:
        detected: what the source was.
        plan: what was converted, renamed and dropped.
        written: the files written.
        notes: one line each on what the conversion did beyond renaming (where a SigLIP
            pooling head went, or that the output says it has none), what it left out, and
            settings the native model does not compute as transformers does.
    """

    detected: DetectedModel
    plan: ConversionPlan
    written: WriteResult
    notes: tuple[str, ...] = ()

    @property
    def num_tensors(self) -> int:
        """Tensors written (a fused checkpoint's plan lists its native tensors, which an
        Mllama output merges or leaves out)."""
        return sum(len(shard.keys) for shard in self.written.plan.shards)


def _pooling_head(
    source: CheckpointSource, detected: DetectedModel, dtype: torch.dtype | None,
    stack: ExitStack,
) -> tuple[CheckpointSource | None, tuple[PlanEntry, ...]]:
    """Where a vision tower's SigLIP pooling head lies (the source itself for transformers
    layouts, the head file beside a native one), and the plan that carries it."""
    if detected.kind != "vision":
        return None, ()
    if detected.layout == "hf":
        return source, plan_pooling_head(source.infos(), detected.config,
                                         origin=str(source.path), dtype=dtype)
    path = side_directory(source) / HEAD_FILE
    if detected.layout != "native" or not os.path.lexists(path):
        return None, ()
    head = stack.enter_context(open_checkpoint(path))
    return head, plan_pooling_head(head.infos(), detected.config, origin=str(path),
                                   dtype=dtype, head_only=True)


def head_file_bytes(entries: tuple[PlanEntry, ...], source: CheckpointSource) -> bytes:
    """A safetensors file of the pooling head's tensors (the head of a so400m tower is about
    45 MB in float32, a few of its layers' MLPs)."""
    from safetensors.torch import save  # noqa: PLC0415 - only a SigLIP conversion needs it

    return save({entry.target_key: plan_entry_tensor(entry, source) for entry in entries},
                metadata={"format": "pt"})


def _head_notes(head: tuple[PlanEntry, ...], from_file: bool, to: str,
                detected: DetectedModel) -> list[str]:
    what = f"SigLIP's attention-pooling head ({len(head)} tensors)"
    if head and to == "native":
        return [f"{what} kept beside the native weights in {HEAD_FILE}, for the way back to hf"]
    if head and from_file and to == "hf":
        return [f"{what} put back from {HEAD_FILE}"]
    if not head and to == "hf" and detected.kind == "vision" \
            and detected.config.family in HEAD_FAMILIES:
        return [f"no SigLIP attention-pooling head to write: config.json says "
                f"{HEAD_CONFIG_FIELD}: false, so transformers builds the tower without one "
                "(no pooler_output)"]
    return []


def _hf_base(source: CheckpointSource, detected: DetectedModel
             ) -> tuple[dict[str, Any] | None, Any]:
    """A decoder's own transformers config.json and the file it lies in: the source's, or
    the one an earlier conversion kept beside a native or Meta checkpoint; ``(None, None)``
    for anything else.

    Raises:
        ConfigError: a kept file that is not a transformers config.json.
    """
    if detected.kind != "decoder":
        return None, None
    directory = side_directory(source)
    if source.config_file == "config.json" and source.config is not None \
            and config_style(source.config) == "hf":
        return dict(source.config), directory / "config.json"
    path = directory / HF_CONFIG_SIDE_FILE
    if detected.layout == "hf" or not os.path.lexists(path):
        return None, None
    try:
        document = json.loads(read_side_file(path))
    except ValueError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, dict) or config_style(document) != "hf":
        raise ConfigError(f"{path}: not a transformers config.json")
    return document, path


def convert_checkpoint(
    source_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    to: str = "native",
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    on_tensor_written: Callable[[TensorInfo], None] | None = None,
    durable: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> ConversionResult:
    """Rewrite a decoder or vision-tower checkpoint in another layout as sharded safetensors
    plus a config.json.

    Args:
        source_path: any checkpoint ``fusesurgery.io.open_checkpoint`` reads.
        out_dir: the output directory; written atomically. It may not be, contain, lie inside
            or link to the source or any file the source reads.
        to: ``"native"`` (torchtune keys, fusesurgery config), ``"hf"`` (transformers keys
            and config.json, loadable with ``from_pretrained``) or ``"meta"`` (Meta's
            ``consolidated.00.pth`` and ``params.json``; decoders only).
        dtype: cast floating-point tensors; None keeps them.
        max_shard_size: largest shard, e.g. ``"5GB"``. When every tensor lies in a
            safetensors file, each source file starts a new output shard, so a sharded source
            keeps its shards (split further only where one exceeds the limit).
        overrides: config fields to supply or replace (see ``detect_model``).
        overwrite: replace an earlier fusesurgery output at ``out_dir`` (never any other
            directory).
        on_tensor_written: progress callback, called after each tensor.
        durable: fsync the output before it appears (see ``write_safetensors``).
        on_progress: called with ``(bytes written, total bytes)`` after each tensor.

    Returns:
        What was detected, planned and written.

    Raises:
        FuseSurgeryError: unreadable source, unknown keys, config problems, or an output
            that cannot be written.
    """
    if to == "transformers":  # a model directory with its modeling code: fusesurgery.hf
        raise ConfigError("a transformers model directory is written by "
                          "fusesurgery.export_transformers (convert --to transformers)")
    if to not in (*CONFIG_WRITERS, "mllama"):
        raise ConfigError(f"cannot convert to {to!r}; valid: {', '.join(CONFIG_WRITERS)}, "
                          "mllama")
    with ExitStack() as stack:
        source = stack.enter_context(open_checkpoint(source_path))
        infos = source.infos()
        detected = detect_model(infos, source.config, source.config_file, overrides)
        # a tied decoder's stored head: equal to the table, it comes back on the way to hf;
        # different, the decoder is the untied one transformers builds
        detected, stored_head = resolve_stored_output(source, detected)
        if detected.kind == "fused" or to == "mllama":
            if detected.kind != "fused":
                raise ConfigError(f"--to mllama takes a fused checkpoint; {source_path} holds "
                                  f"a {detected.kind}")
            if dtype is not None:
                raise ConfigError("--dtype is not supported for fused checkpoints")
            plan = plan_conversion(infos, detected.layout, detected.config, kind="fused")
            source.close()
            _, written, notes = convert_fused(
                source_path, out_dir, to=to, max_shard_size=max_shard_size,
                overwrite=overwrite, on_tensor_written=on_tensor_written, durable=durable,
                on_progress=on_progress)
            return ConversionResult(detected, plan, written, notes)
        plan = plan_conversion(infos, detected.layout, detected.config, target_layout=to,
                               kind=detected.kind, dtype=dtype)
        plan = with_equal_reason(plan, stored_head)
        tied = detected.kind == "decoder" and detected.config.tie_word_embeddings
        head_copy = None if stored_head is None else hf_output_key()
        if head_copy is None and detected.layout == "native" and source.config is not None:
            head_copy = recorded_output_copy(source.config, tied, str(source.config_file))
        if to == "hf" and head_copy is not None:
            plan = with_output_copy(plan, head_copy)
        # SigLIP's pooling head: no native key holds it, so it is carried, not dropped
        head_source, head = _pooling_head(source, detected, dtype, stack)
        if head_source is source:
            carried = {entry.source_key for entry in head}
            plan = dataclasses.replace(plan, dropped=tuple(
                item for item in plan.dropped if item[0] not in carried))
        in_source = plan  # the entries the main source holds
        if to == "hf" and head:
            plan = dataclasses.replace(plan, entries=(*plan.entries, *head))
            if head_source is source:
                in_source = plan
        infos_out, new_shard_at = source_file_order(in_source, source)
        readers = {entry.target_key: (entry, source) for entry in in_source.entries}
        for entry in plan.entries[len(in_source.entries):]:  # from the head file
            readers[entry.target_key] = (entry, head_source)
            infos_out.append(TensorInfo(entry.target_key, entry.shape, entry.dtype))

        def produce(key: str) -> torch.Tensor | FileRegion | PermutedRegion:
            return plan_entry_source(*readers[key])
        # a decoder's own transformers config: what the native config cannot hold (token
        # ids, a sliding window, dtype, ...) travels in it, to come back with --to hf
        base, base_path = _hf_base(source, detected)
        config = CONFIG_WRITERS[to](detected.config)
        if to == "native" and head_copy is not None:
            config[TIED_OUTPUT_FIELD] = head_copy
        if to == "hf" and base is not None:
            config = hf_config_dict(detected.config, base=base)
        elif to == "hf" and source.config_file == "config.json" and source.config is not None \
                and config_style(source.config) == "hf":
            # a vision tower's: keep what fusesurgery does not model, with the fields it does
            # written as it resolved them (of a CLIPModel / SiglipModel, its vision half's)
            config = {**vision_tower_config(dict(source.config), detected.config.family),
                      **config}
        dtype_name = None if dtype is None else str(dtype).removeprefix("torch.")
        if dtype_name is not None and to != "meta":
            set_hf_dtype(config, dtype_name)
        if to == "hf" and detected.kind == "vision" and detected.config.family in HEAD_FAMILIES:
            config[HEAD_CONFIG_FIELD] = bool(head)  # else transformers makes a random head
        side_names = DECODER_SIDE_FILES if detected.kind == "decoder" else ENCODER_SIDE_FILES
        side = read_side_files(side_directory(source), side_names)
        if to == "native" and head:
            side[HEAD_FILE] = head_file_bytes(head, head_source)
        if to != "hf" and base is not None:
            if dtype_name is None:  # the file as it was
                side[HF_CONFIG_SIDE_FILE] = read_side_file(base_path)
            else:
                set_hf_dtype(base, dtype_name)
                side[HF_CONFIG_SIDE_FILE] = standard_json.dumps(base, indent=2) + "\n"
        notes = _head_notes(head, head_source is not source, to, detected)
        if not (detected.layout == "hf" and to == "hf"):  # a native or Meta model involved
            differences = list(detected.differences)
            if to == "hf" and base is not None and detected.layout != "hf":
                differences += read_hf_decoder_config(base, str(base_path)).differences
            notes.extend(dict.fromkeys(differences))
        written = write_layout(
            out_dir,
            to,
            infos_out,
            produce,
            lambda key: plan_entry_tensor(*readers[key]),
            new_shard_at=new_shard_at,
            max_shard_size=max_shard_size,
            extra_files={**side,
                         CONFIG_FILES[to]: standard_json.dumps(config, indent=2) + "\n"},
            overwrite=overwrite,
            on_tensor_written=on_tensor_written,
            on_progress=on_progress,
            durable=durable,
            inputs=(*source.paths_read, *(() if base_path is None else (base_path,)),
                    *(head_source.paths_read if head_source not in (None, source) else ())),
        )
    return ConversionResult(detected, plan, written, tuple(notes))

"""``unfuse``: take the decoder (or the vision tower) back out of a fused checkpoint.

Without ``merge_embeddings`` it is the inverse of ``fuse``: the original tensors under their
original names, bit for bit, with the source's own config and tokenizer files as they were.
With ``merge_embeddings`` the decoder gets one embedding table of the original rows plus the
new tokens', loadable by transformers with the new tokens in its tokenizer.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusesurgery import _json as standard_json
from fusesurgery._plural import plural
from fusesurgery.convert import plan_conversion
from fusesurgery.convert.configs import (
    HF_ARCHITECTURES,
    config_style,
    decoder_text_config,
    hf_config_dict,
    set_hf_dtype,
)
from fusesurgery.convert.keymaps import unwrapped_hf_key
from fusesurgery.convert.mllama import mllama_text_config
from fusesurgery.convert.plan import (
    ConversionPlan,
    PlanEntry,
    check_cast_dtype,
    dropped_by_reason,
)
from fusesurgery.convert.pooling_head import HEAD_CONFIG_FIELD, HEAD_FAMILIES
from fusesurgery.convert.tied_output import (
    TIED_OUTPUT_FIELD,
    recorded_output_copy,
    with_output_copy,
)
from fusesurgery.errors import CheckpointError, ConfigError
from fusesurgery.io import CheckpointSource, FileRegion, TensorInfo
from fusesurgery.surgery.fuse_plan import FUSION_EMBEDDING_KEY, fused_key_of, native_key_of
from fusesurgery.surgery.fused import FusedView, open_fused
from fusesurgery.surgery.fused_config import SOURCE_FILES_DIR
from fusesurgery.write.convert_checkpoint import (
    CONFIG_FILES,
    CONFIG_WRITERS,
    vision_tower_config,
    write_layout,
)
from fusesurgery.write.plan_sources import plan_entry_source, plan_entry_tensor, source_file_order
from fusesurgery.write.safetensors_writer import WriteResult
from fusesurgery.write.shard_plan import DEFAULT_MAX_SHARD_SIZE
from fusesurgery.write.side_files import (
    DECODER_SIDE_FILES,
    ENCODER_SIDE_FILES,
    HF_CONFIG_SIDE_FILE,
    TOKEN_ID_FIELDS,
    json_object,
    read_json_side_file,
    read_side_files,
)

PARTS = ("decoder", "encoder")
HF_EMBEDDING_KEY = "model.embed_tokens.weight"
HF_OUTPUT_KEY = "lm_head.weight"


@dataclass(frozen=True)
class UnfuseResult:
    """Attributes:
        part: ``decoder`` or ``encoder``.
        format: the layout written.
        plan: the tensors written and their sources.
        written: the files written.
        merged_embeddings: the new tokens were merged into the embedding table.
        notes: what differs from the original checkpoint, if anything.
    """

    part: str
    format: str
    plan: ConversionPlan
    written: WriteResult
    merged_embeddings: bool
    notes: tuple[str, ...]


class _PartView:
    """The fused checkpoint's tensors of one part under their native names: what
    ``plan_entry_source`` and ``source_file_order`` read."""

    def __init__(self, source: CheckpointSource, part: str) -> None:
        self._source, self._part = source, part

    def _key(self, native: str) -> str:
        return fused_key_of(self._part, native)

    def file_region(self, key: str) -> FileRegion | None:
        return self._source.file_region(self._key(key))

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._source.get_tensor(self._key(key))

    def read_tensor(self, key: str) -> torch.Tensor:
        return self._source.read_tensor(self._key(key))


def _renamed(plan: ConversionPlan, names: dict[str, str]) -> ConversionPlan:
    """The plan with each target key replaced by the source's own spelling of it."""
    entries = tuple(
        PlanEntry(**{**entry.__dict__, "target_key": names.get(entry.source_key, entry.target_key)})
        for entry in plan.entries)
    return ConversionPlan(plan.kind, plan.source_layout, plan.target_layout, entries, plan.dropped)


def _hf_config_with_vocab(document: bytes, vocab: int) -> bytes:
    """The output's transformers config.json with ``vocab_size`` raised, other fields kept."""
    config = json.loads(document)
    config["vocab_size"] = vocab
    return (standard_json.dumps(config, indent=2) + "\n").encode()


def _cast_note(plan: ConversionPlan, dtype: torch.dtype) -> str:
    """What ``--dtype`` changed: how many tensors were cast, from which dtypes."""
    name = str(dtype).removeprefix("torch.")
    cast: dict[str, int] = {}
    for entry in plan.entries:
        if entry.source_dtype != entry.dtype:
            origin = str(entry.source_dtype).removeprefix("torch.")
            cast[origin] = cast.get(origin, 0) + 1
    if not cast:
        return f"nothing to cast: every floating-point tensor is {name} already"
    origins = ", ".join(f"{plural(count, 'tensor')} from {origin}"
                        for origin, count in sorted(cast.items()))
    return f"cast to {name}: {origins}"


def _derived_token_ids(directory: Path, kept: dict[str, bytes], source: FusedView,
                       vocab: int) -> dict[str, Any]:
    """bos/eos/pad ids for a decoder config derived from ``fusion_config.json`` (which holds
    none): an Mllama source's own text config, else the source's generation config, else the
    fused directory's copy of it; ids outside the original table are left out."""
    candidates: list[Any] = []
    if source.layout == "mllama" and isinstance(source.source.config, dict):
        candidates.append(mllama_text_config(source.source.config))
    if "generation_config.json" in kept:
        candidates.append(json_object(kept["generation_config.json"], directory / SOURCE_FILES_DIR
                                      / "decoder" / "generation_config.json"))
    else:
        candidates.append(read_json_side_file(directory / "generation_config.json"))

    def valid(value: Any) -> bool:
        ids = value if isinstance(value, list) else [value]
        return bool(ids) and all(isinstance(i, int) and not isinstance(i, bool)
                                 and 0 <= i < vocab for i in ids)

    found: dict[str, Any] = {}
    for document in candidates:
        for key in TOKEN_ID_FIELDS:
            if isinstance(document, dict) and key not in found and valid(document.get(key)):
                found[key] = document[key]
    return found


# What fuse copies beside the fused weights unchanged (the tokenizer it changes): a kept copy
# of one of these that is gone is the fused directory's.
FUSED_DIRECTORY_COPIES: tuple[str, ...] = (*ENCODER_SIDE_FILES, "generation_config.json")


def kept_part_files(
    directory: Path, part: str, record: Mapping[str, Any], allow_missing: bool,
    notes: list[str], *, replaced: tuple[str, ...] = (),
    copies: tuple[str, ...] = FUSED_DIRECTORY_COPIES,
) -> tuple[dict[str, bytes], dict[str, bytes], list[str]]:
    """The source files fuse kept of ``part`` (its ``kept_files`` under ``source/<part>/``),
    by the one rule every unfuse follows, whatever the layout of the fused directory: a kept
    file that is gone is taken from the fused directory where that holds the source's own
    copy (``copies``), its config is derived by the caller (a note says so), one the caller
    writes itself (``replaced``) is not needed; any other (a tokenizer) is an error unless
    ``allow_missing``, and then a note. Appends what it did to ``notes``.

    Returns:
        ``(kept, recovered, missing)``: the files found under ``source/<part>/``, the ones
        taken from the fused directory instead, and the names of every kept file gone.

    Raises:
        CheckpointError: a kept file is gone that cannot be derived, unless
            ``allow_missing``; or one present but unreadable.
    """
    config_file = record.get("config_file")
    names = tuple(record.get("kept_files", ()))
    kept = read_side_files(directory / SOURCE_FILES_DIR / part, names)
    where = f"{SOURCE_FILES_DIR}/{part}/"
    missing = [name for name in names if name not in kept]
    recovered = read_side_files(directory, tuple(
        name for name in missing if name != config_file and name in copies))
    for name in recovered:
        notes.append(f"{where}{name} is missing: {name} is the fused directory's copy")
    lost = [name for name in missing
            if name != config_file and name not in recovered and name not in replaced]
    if lost and not allow_missing:
        raise CheckpointError(
            f"{directory}: {where} lacks {', '.join(lost)} of the {part} source, which unfuse "
            "gives back and cannot derive; restore them, or write the part without them",
            flag="--allow-missing")
    if lost:
        notes.append(f"written without {', '.join(lost)}: missing from {where}")
    return kept, recovered, missing


def _config_and_side_files(
    directory: Path, part: str, record: dict[str, Any], fmt: str, part_config: Any,
    source: FusedView, plan: ConversionPlan, allow_missing: bool, notes: list[str],
    replaced: tuple[str, ...] = (), head_copy: str | None = None,
) -> dict[str, bytes]:
    """The small files of the unfused part, by name: the source's own files fuse kept under
    ``source/<part>/``, with its config rewritten for another layout (its transformers
    config.json kept as ``hf_config.json`` beside a native or Meta one, as ``convert`` does,
    and read back as the base of an hf one). A kept file that is gone is derived where that
    is exact: the config from ``fusion_config.json``, a generation or processor config from
    the fused directory's unchanged copy; one the caller writes itself (``replaced``) is not
    needed. A tied decoder's stored head (``head_copy``) is recorded in a native config, as
    ``convert --to native`` records it, for the way back to hf. Appends what it did to
    ``notes``.

    Raises:
        CheckpointError: a kept file is gone that cannot be derived (a tokenizer), unless
            ``allow_missing``.
        ConfigError: a kept config that is not valid JSON.
    """
    layout = record.get("layout", "native")
    config_file = record.get("config_file")
    kept, recovered, missing = kept_part_files(directory, part, record, allow_missing, notes,
                                               replaced=replaced)
    where = f"{SOURCE_FILES_DIR}/{part}/"
    extra = {**recovered, **kept}
    if source.layout == "mllama" and part == "decoder":  # its generation settings are Llama's
        extra.update(read_side_files(directory, ("generation_config.json",)))

    hf_base = None  # the decoder's own transformers config.json, if fuse kept it
    if part == "decoder":
        for name in (config_file, HF_CONFIG_SIDE_FILE):
            if name in kept and name.endswith(".json"):
                document = json_object(kept[name], directory / where / name)
                if document is not None and config_style(document) == "hf":
                    hf_base = name
                    break
    if fmt == layout and config_file in kept:
        if hf_base == config_file:  # a multimodal source's: its text model's config alone
            document = json.loads(kept[hf_base])
            text = decoder_text_config(document)
            if text is not document:
                extra[config_file] = (standard_json.dumps(text, indent=2) + "\n").encode()
                notes.append(f"{config_file}: the text model's own ({text['model_type']}), "
                             "from the source's text section; its other parts are not given "
                             "back")
        return extra  # the source's own config, as it was
    if config_file is not None and config_file in missing:
        notes.append(f"{where}{config_file} is missing: {CONFIG_FILES[fmt]} written from "
                     f"fusion_config.json's {part} config")
    extra.pop(config_file, None)
    if fmt == "hf" and hf_base is not None:
        config = hf_config_dict(part_config, base=json.loads(kept[hf_base]))
        extra.pop(HF_CONFIG_SIDE_FILE, None)
    else:
        config = CONFIG_WRITERS[fmt](part_config)
        if fmt == "native" and head_copy is not None:
            config[TIED_OUTPUT_FIELD] = head_copy
        if fmt != "hf" and hf_base is not None and hf_base == config_file:
            extra[HF_CONFIG_SIDE_FILE] = kept[hf_base]  # for the way back to hf, as convert
        if fmt == "hf":  # derived: what fusion_config.json holds, the ids and dtype it lacks
            if part == "decoder":
                config.update(_derived_token_ids(directory, kept, source,
                                                 part_config.vocab_size))
            dtypes = Counter(str(entry.dtype).removeprefix("torch.") for entry in plan.entries)
            if dtypes:
                set_hf_dtype(config, dtypes.most_common(1)[0][0])
    extra[CONFIG_FILES[fmt]] = (standard_json.dumps(config, indent=2) + "\n").encode()
    return extra


def _state_dtype(extra: dict[str, bytes], fmt: str, dtype_name: str) -> None:
    """Say ``dtype_name`` in the output's transformers configs (config.json of an hf output,
    the hf_config.json beside a native or Meta one)."""
    for name in ("config.json" if fmt == "hf" else None, HF_CONFIG_SIDE_FILE):
        if name in extra:
            document = json.loads(extra[name])
            set_hf_dtype(document, dtype_name)
            extra[name] = (standard_json.dumps(document, indent=2) + "\n").encode()


def _architecture(document: dict[str, Any]) -> str:
    names = document.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0]
    return str(document.get("model_type", "model"))


def _no_encoder_message(path: object, keys: list[str]) -> str:
    """Why a fused checkpoint without a native encoder (transformers' Mllama) has no
    ``--part encoder`` to write."""
    opaque = [key for key in keys if key.startswith("encoder.")]
    if not opaque:
        return (f"{path} holds no vision encoder (a text model with cross-attention layers "
                "alone, as MllamaForCausalLM): there is no --part encoder to unfuse")
    return (f"{path}: its vision side (Mllama's tiled vision model and projector, "
            f"{len(opaque)} tensors) is no CLIP/SigLIP tower and has no standalone layout; "
            "convert --to mllama keeps it with the decoder")


def unfuse_checkpoint(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    part: str = "decoder",
    format: str | None = None,
    merge_embeddings: bool = False,
    dtype: torch.dtype | None = None,
    allow_missing: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    durable: bool = True,
) -> UnfuseResult:
    """Write one part of a fused checkpoint as a standalone checkpoint.

    Args:
        path: the fused checkpoint directory.
        out_dir: the output directory (atomic; may not overlap the fused checkpoint).
        part: ``decoder`` or ``encoder``.
        format: ``hf``, ``native`` or ``meta`` (decoders); None writes the layout the part
            was fused from.
        merge_embeddings: (decoder, ``hf``) one table of ``vocab + new tokens`` rows and a
            config and tokenizer that know them. An untied output projection gets zero rows
            for the new tokens (they were never predicted).
        dtype: cast the floating-point tensors written (a checkpoint fused with ``--dtype``
            back to its source's dtype); the config states the new dtype. None keeps them.
        allow_missing: write the part even when files fuse kept of its source (under
            ``source/<part>/``) are gone and cannot be derived, such as its tokenizer. A
            missing config is always derived from ``fusion_config.json``, and a missing
            generation or processor config taken from the fused directory's copy.
        max_shard_size: largest shard.
        overwrite: replace an earlier fusesurgery output at ``out_dir``.
        on_progress: called with ``(bytes written, total bytes)`` after each tensor.
        durable: fsync before the output appears.

    Returns:
        What was written.

    Raises:
        FuseSurgeryError: not a fused checkpoint, an unknown part, format or dtype, an encoder
            asked of a checkpoint without a native one (transformers' Mllama), merge without
            ``hf`` or for the encoder, source files missing that cannot be derived (without
            ``allow_missing``), or an output that cannot be written.
    """
    if part not in PARTS:
        raise ConfigError(f"unknown part {part!r}; valid: {', '.join(PARTS)}")
    check_cast_dtype(dtype)
    with open_fused(path) as (source, config):
        if part == "encoder" and config.encoder is None:
            raise ConfigError(_no_encoder_message(path, source.keys()))
        record: dict[str, Any] = dict(config.sources.get(part, {}))
        layout = record.get("layout", "native")
        fmt = format or layout
        if fmt not in CONFIG_WRITERS:
            raise ConfigError(f"unknown format {fmt!r} for unfuse; valid: "
                              f"{', '.join(CONFIG_WRITERS)}")
        if merge_embeddings and (part != "decoder" or fmt != "hf"):
            raise ConfigError("--merge-embeddings needs --part decoder and --format hf")
        kind = "decoder" if part == "decoder" else "vision"
        part_config = config.decoder if part == "decoder" else config.encoder.replace(
            output_layer=None)
        native_infos = {}
        for key, info in source.infos().items():
            origin = native_key_of(key)
            if origin is not None and origin[0] == part:
                native_infos[origin[1]] = TensorInfo(origin[1], info.shape, info.dtype)
        plan = plan_conversion(native_infos, "native", part_config, target_layout=fmt,
                               kind=kind, dtype=dtype)
        notes = [f"{keys} was dropped by fuse: {reason}"  # one note a reason
                 for keys, reason in dropped_by_reason(record.get("dropped", {}))]
        if dtype is not None:
            notes.append(_cast_note(plan, dtype))
        head_copy = recorded_output_copy(record, part == "decoder" and
                                         config.decoder.tie_word_embeddings,
                                         "fusion_config.json: sources['decoder']")
        if fmt == layout and isinstance(record.get("source_keys"), dict):
            # the source's own names; a multimodal source's part under the part's own (it
            # is written alone, which its whole's names would not load as)
            plan = _renamed(plan, {native: unwrapped_hf_key(key, kind)
                                   for native, key in record["source_keys"].items()})
        if head_copy is not None and fmt == "hf":
            if merge_embeddings and config.new_tokens:
                notes.append(f"{head_copy} not written back: the merged table has more rows "
                             "than the stored head had, and transformers ties the head to it")
            else:  # the source stored it, equal to the table: given back
                plan = with_output_copy(plan, head_copy)
        view = _PartView(source, part)
        entries = {entry.target_key: entry for entry in plan.entries}
        producers: dict[str, Callable[[], Any]] = {
            key: (lambda e=entry: plan_entry_source(e, view)) for key, entry in entries.items()}
        infos, new_shard_at = source_file_order(plan, view)

        directory = Path(source.path) if Path(source.path).is_dir() else Path(source.path).parent
        merging = merge_embeddings and bool(config.new_tokens)
        # merged, the output takes the fused tokenizer, not the source's
        fused_tokenizer = read_side_files(directory, DECODER_SIDE_FILES) if merging else {}
        extra = _config_and_side_files(directory, part, record, fmt, part_config, source,
                                       plan, allow_missing, notes, tuple(fused_tokenizer),
                                       head_copy)
        hf_config = None
        if part == "encoder" and fmt == "hf" and "config.json" in extra:
            hf_config = json_object(extra["config.json"], directory / SOURCE_FILES_DIR / part
                                    / "config.json")
        if hf_config is not None:
            tower = vision_tower_config(hf_config, part_config.family)
            changed = tower is not hf_config
            if changed:
                notes.append(f"config.json is the vision half of the source's "
                             f"{_architecture(hf_config)} config "
                             f"({HF_ARCHITECTURES[part_config.family]}): fuse kept no text "
                             "tower")
            # fuse keeps no SigLIP pooling head; a config claiming one would make transformers
            # build it at random
            if part_config.family in HEAD_FAMILIES \
                    and tower.get(HEAD_CONFIG_FIELD, True) is not False:
                tower[HEAD_CONFIG_FIELD] = False
                changed = True
                notes.append(f"config.json says {HEAD_CONFIG_FIELD}: false: fuse kept no SigLIP "
                             "attention-pooling head")
            if changed:
                extra["config.json"] = (standard_json.dumps(tower, indent=2) + "\n").encode()
        if merging:
            infos, producers = _merge(plan, infos, producers, view, source, config)
            extra["config.json"] = _hf_config_with_vocab(
                extra["config.json"], config.decoder.vocab_size + len(config.new_tokens))
            # the fused tokenizer: the original one plus the new tokens at their ids
            extra.update(fused_tokenizer)
            notes.append(f"embedding table merged: {config.decoder.vocab_size} + "
                         f"{len(config.new_tokens)} rows")
        if dtype is not None:
            _state_dtype(extra, fmt, str(dtype).removeprefix("torch."))
        written = write_layout(
            out_dir, fmt, infos, lambda key: producers[key](),
            lambda key: plan_entry_tensor(entries[key], view), new_shard_at=new_shard_at,
            max_shard_size=max_shard_size, extra_files=extra, overwrite=overwrite,
            on_progress=on_progress, durable=durable,
            inputs=(directory, *source.paths_read))
    return UnfuseResult(part=part, format=fmt, plan=plan, written=written,
                        merged_embeddings=merging,
                        notes=tuple(notes))


def _merge(plan, infos, producers, view, source, config):
    """Replace the embedding (and an untied output) with tables that include the new rows."""
    new_rows = config.fusion.fusion_vocab_size
    by_source = {entry.source_key: entry for entry in plan.entries}
    embed = by_source["tok_embeddings.weight"].target_key
    output = by_source.get("output.weight")

    def merged_embedding() -> torch.Tensor:
        dtype = by_source["tok_embeddings.weight"].dtype  # the planned one (a --dtype cast)
        return torch.cat([view.get_tensor("tok_embeddings.weight").to(dtype),
                          source.get_tensor(FUSION_EMBEDDING_KEY).to(dtype)], dim=0)

    def padded_output() -> torch.Tensor:
        table = view.get_tensor("output.weight").to(output.dtype)
        return torch.cat([table, table.new_zeros(new_rows, table.shape[1])], dim=0)

    infos = list(infos)
    producers = dict(producers)
    for i, info in enumerate(infos):
        if info.name == embed:
            infos[i] = TensorInfo(embed, (info.shape[0] + new_rows, info.shape[1]), info.dtype)
            producers[embed] = merged_embedding
        elif output is not None and info.name == output.target_key:
            infos[i] = TensorInfo(info.name, (info.shape[0] + new_rows, info.shape[1]),
                                  info.dtype)
            producers[info.name] = padded_output
    return infos, producers


__all__ = ["UnfuseResult", "unfuse_checkpoint"]

"""A fused checkpoint as a transformers model directory, streaming, atomic.

The output holds ``config.json`` (a ``FusedVisionTextConfig``: the sources' own transformers
configs as ``text_config`` / ``vision_config`` plus the fusion settings, with an ``auto_map``
to the modeling files beside it), sharded safetensors with an index, the fused tokenizer,
generation and preprocessor configs, the processor's config, and the template's
configuration, modeling and processing files.
``AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)`` and
``AutoProcessor.from_pretrained(DIR, trust_remote_code=True)`` load it with transformers alone.

Keys (``exported_key``): the text model's and the tower's are the sources' own transformers
names under ``language_model.`` and ``vision_tower.``; fusion's are
``cross_attention_layers.{i}.<native local name>``, ``projection.*`` and
``fusion_embedding.weight``. ``config.json`` also holds the fused checkpoint's
``fusion_config.json`` and the output its ``source/`` files, so that
:func:`fusesurgery.hf.reimport.import_transformers` gives the fused checkpoint back. Every
tensor is the fused checkpoint's bytes: copied by the kernel, the decoder's q/k rows put back
in transformers' rotary order, and the native tensors a family's transformers names stack
(Phi-3's q/k/v, w1/w3) stacked again (see :func:`export_entries`). A Gemma decoder's fusion
layers keep their ``(1 + w)`` RMSNorms: ``fusion_norm_unit_offset`` in config.json.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from fusesurgery import _json as standard_json
from fusesurgery.convert.configs import (
    HF_ARCHITECTURES,
    HF_MODEL_TYPES,
    config_style,
    hf_config_dict,
    set_hf_dtype,
)
from fusesurgery.convert.keymaps import (
    FUSED_DECODER_PREFIX,
    FUSED_VISION_PREFIX,
)
from fusesurgery.convert.plan import PlanEntry, _stack_parts
from fusesurgery.convert.pooling_head import HEAD_CONFIG_FIELD, HEAD_FAMILIES
from fusesurgery.errors import ConfigError, KeyMapError
from fusesurgery.io import TensorInfo
from fusesurgery.surgery.export_layout import (
    CONFIG_CLASS,
    CONFIG_MODULE,
    EXPORT_MODEL_TYPE,
    FUSION_CONFIG_FIELD,
    MODEL_CLASS,
    MODELING_MODULE,
    PROCESSING_MODULE,
    PROCESSOR_CLASS,
    TEMPLATE_FILES,
    TEXT_PREFIX,
    export_fusion_fields,
)
from fusesurgery.surgery.exported import decoder_stacked_key, exported_key
from fusesurgery.surgery.fused import open_fused
from fusesurgery.surgery.fused_config import SOURCE_FILES_DIR, FusedConfig
from fusesurgery.write.convert_checkpoint import plan_entry_source, vision_tower_config
from fusesurgery.write.safetensors_writer import WriteResult, write_safetensors
from fusesurgery.write.shard_plan import DEFAULT_MAX_SHARD_SIZE
from fusesurgery.write.side_files import (
    DECODER_SIDE_FILES,
    ENCODER_SIDE_FILES,
    HF_CONFIG_SIDE_FILE,
    read_json_side_file,
    read_kept_source_files,
    read_side_files,
    side_directory,
)

MODEL_TYPE = EXPORT_MODEL_TYPE


def export_entries(tensors: Mapping[str, TensorInfo], config: FusedConfig,
                   path: object) -> tuple[PlanEntry, ...]:
    """The export's tensors, one plan entry each, in the fused checkpoint's order: a tensor
    the decoder's transformers names stack from several native ones (Phi-3's q/k/v into
    ``qkv_proj``, w1/w3 into ``gate_up_proj``) is one entry with a part per native tensor,
    placed where its first part is (written as one byte range where the parts lie one after
    the other in one file).

    Raises:
        ConfigError: a key with no place in the export, or a stacked tensor lacking a part.
    """
    entries: list[tuple[str | None, PlanEntry]] = []
    for key, info in tensors.items():
        try:
            name, transform = exported_key(key, config)
        except KeyMapError as error:
            raise ConfigError(f"{path}: {error}") from None
        entry = PlanEntry(target_key=name, source_key=key, transform=transform,
                          source_shape=tuple(info.shape), source_dtype=info.dtype,
                          shape=tuple(info.shape), dtype=info.dtype)
        stacked = decoder_stacked_key(key, config)
        entries.append((None if stacked is None else key.removeprefix(FUSED_DECODER_PREFIX),
                        entry))
    try:
        return _stack_parts(entries, "decoder", "hf", config.decoder)
    except KeyMapError as error:
        raise ConfigError(f"{path}: {error}") from None


def _kept_config(directory: Path, part: str, names: tuple[str, ...]) -> dict[str, Any] | None:
    """A source's own transformers config.json that fuse kept under ``source/<part>/``."""
    for name in names:
        document = read_json_side_file(directory / SOURCE_FILES_DIR / part / name)
        if document is not None and config_style(document) == "hf":
            return document
    return None


def text_config_dict(config: FusedConfig, directory: Path, dtype: str) -> dict[str, Any]:
    """The decoder's transformers config: its source's own, with what the fused config
    states written over it (``hf_config_dict``), and the fused tensors' dtype."""
    base = _kept_config(directory, "decoder", ("config.json", HF_CONFIG_SIDE_FILE))
    document = hf_config_dict(config.decoder, base=base)
    set_hf_dtype(document, dtype)
    return document


def vision_config_dict(config: FusedConfig, directory: Path, dtype: str) -> dict[str, Any]:
    """The tower's transformers config (of a whole CLIPModel / SiglipModel, its vision half),
    without SigLIP's pooling head (fuse does not carry it)."""
    encoder = config.encoder
    kept = _kept_config(directory, "encoder", ("config.json",))
    document = hf_config_dict(encoder)
    if kept is not None:
        document = {**vision_tower_config(kept, encoder.family), **document}
    document.setdefault("model_type", HF_MODEL_TYPES[encoder.family])
    document.setdefault("architectures", [HF_ARCHITECTURES[encoder.family]])
    if encoder.family in HEAD_FAMILIES:
        document[HEAD_CONFIG_FIELD] = False
    set_hf_dtype(document, dtype)
    return document


def auto_map() -> dict[str, str]:
    """config.json's ``auto_map``: the Auto classes to the template's files beside it."""
    return {
        "AutoConfig": f"{CONFIG_MODULE}.{CONFIG_CLASS}",
        "AutoModel": f"{MODELING_MODULE}.{MODEL_CLASS}",
        "AutoModelForImageTextToText": f"{MODELING_MODULE}.{MODEL_CLASS}",
        "AutoProcessor": f"{PROCESSING_MODULE}.{PROCESSOR_CLASS}",
    }


def export_config_dict(config: FusedConfig, directory: Path,
                       dtypes: Mapping[str, str]) -> dict[str, Any]:
    """``config.json`` of the export (``dtypes``: part -> dtype name of its tensors)."""
    return {
        "architectures": [MODEL_CLASS],
        "model_type": MODEL_TYPE,
        "auto_map": auto_map(),
        "text_config": text_config_dict(config, directory, dtypes["decoder"]),
        "vision_config": vision_config_dict(config, directory, dtypes["encoder"]),
        **export_fusion_fields(config),
        "dtype": dtypes["decoder"],
        FUSION_CONFIG_FIELD: config.to_dict(),
    }


def processor_config_dict(config: FusedConfig) -> dict[str, Any]:
    """``processor_config.json`` of the export: the processor class (beside it) and the image
    token; the tower's image processor config and the tokenizer are their own files."""
    image = next((t.token for t in config.new_tokens if t.token == "<|image|>"),
                 config.new_tokens[0].token)
    return {"processor_class": PROCESSOR_CLASS, "image_token": image,
            "auto_map": {"AutoProcessor": f"{PROCESSING_MODULE}.{PROCESSOR_CLASS}"}}


# the files a tokenizer's vocabulary lives in (one is enough for AutoTokenizer); the others
# (tokenizer_config.json, special_tokens_map.json, chat templates) only configure one
VOCABULARY_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer.model", "tiktoken.model", "spiece.model",
    "sentencepiece.bpe.model", "vocab.json", "vocab.txt")
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"


def processor_gaps(names: Iterable[str]) -> tuple[str, ...]:
    """What ``AutoProcessor`` would miss among a directory's file ``names``: a tokenizer
    vocabulary (``tokenizer.json`` or a slow tokenizer's files) and the tower's
    ``preprocessor_config.json``; empty when the processor can load."""
    present = set(names)
    gaps = []
    if not present & set(VOCABULARY_FILES):
        gaps.append("tokenizer.json")
    if IMAGE_PROCESSOR_FILE not in present:
        gaps.append(IMAGE_PROCESSOR_FILE)
    return tuple(gaps)


def processor_notes(directory: str | os.PathLike[str]) -> tuple[str, ...]:
    """A note for an export ``AutoProcessor`` cannot load (a tokenizer or the image
    processor's config missing); the model itself still loads."""
    path = Path(directory)
    gaps = processor_gaps(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else ()
    if not gaps:
        return ()
    return (f"{' and '.join(gaps)} {'is' if len(gaps) == 1 else 'are'} missing: "
            "AutoProcessor cannot load this export (the model can; build inputs with the "
            "decoder's tokenizer and the tower's image processor)",)


def template_files() -> dict[str, bytes]:
    """The configuration, modeling and processing files, as shipped in
    ``fusesurgery/hf/template``."""
    package = resources.files("fusesurgery.hf.template")
    return {name: package.joinpath(name).read_bytes() for name in TEMPLATE_FILES}



def _check_exportable(config: FusedConfig, path: object) -> None:
    if config.encoder is None:
        raise ConfigError(f"{path}: its vision side (Mllama's tiled encoder) has no "
                          "transformers tower to export; convert it --to mllama instead")
    if config.fusion.fusion_vocab_size == 0:
        raise ConfigError(f"{path}: a fused model with no new tokens has no image token to "
                          "place the image by")
    if config.projection not in ("mlp", "linear"):
        raise ConfigError(f"{path}: unknown projection {config.projection!r}")


def export_transformers(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    on_tensor_written: Callable[[TensorInfo], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    durable: bool = True,
) -> tuple[FusedConfig, WriteResult]:
    """Write a fusesurgery fused checkpoint as a transformers model directory.

    Tensors stream one at a time from the fused checkpoint (unchanged bytes copied by the
    kernel, the decoder's q/k rows gathered into transformers' rotary order); the output
    appears only when complete.

    Args:
        path: a fused checkpoint directory written by fusesurgery.
        out_dir: the output directory (atomic; never an input, inside one or holding one).
        max_shard_size: largest shard (``"5GB"``).
        overwrite: replace an earlier fusesurgery output.
        on_tensor_written: called after each tensor.
        on_progress: called with ``(bytes written, total bytes)`` after each tensor.
        durable: fsync before the output appears.

    Returns:
        The fusion config and the files written.

    Raises:
        FuseSurgeryError: not a fusesurgery fused checkpoint, one with no transformers tower
            (Mllama's), a damaged one, or an output that cannot be written.
    """
    with open_fused(path) as (view, config):
        _check_exportable(config, path)
        directory = side_directory(view)
        infos, producers = [], {}
        dtypes: dict[str, str] = {}
        for entry in export_entries(view.infos(), config, path):
            part = ("encoder" if entry.source_key.startswith(FUSED_VISION_PREFIX) else
                    "decoder" if entry.target_key.startswith(TEXT_PREFIX) else "fusion")
            dtypes.setdefault(part, str(entry.dtype).removeprefix("torch."))
            infos.append(TensorInfo(entry.target_key, entry.shape, entry.dtype))
            producers[entry.target_key] = lambda e=entry: plan_entry_source(e, view)
        dtypes.setdefault("encoder", dtypes.get("fusion", "float32"))
        document = export_config_dict(config, directory, dtypes)
        extra: dict[str, bytes | str] = {
            "config.json": standard_json.dumps(document, indent=2) + "\n",
            **template_files(),
            **read_side_files(directory, (*DECODER_SIDE_FILES, *ENCODER_SIDE_FILES)),
        }
        extra.update(read_kept_source_files(directory, config.sources))
        if not processor_gaps(extra):  # else a processor config that cannot load
            extra["processor_config.json"] = standard_json.dumps(
                processor_config_dict(config), indent=2) + "\n"
        written = write_safetensors(
            out_dir, infos, lambda key: producers[key](), max_shard_size=max_shard_size,
            extra_files=extra, overwrite=overwrite, on_tensor_written=on_tensor_written,
            on_progress=on_progress, durable=durable, inputs=(directory, *view.paths_read))
    return config, written


__all__ = ["FUSION_CONFIG_FIELD", "MODEL_TYPE", "decoder_stacked_key", "export_config_dict",
           "export_entries", "export_transformers", "exported_key"]

"""The transformers export's layout, by name: what marks a directory as one, where its files
and tensors are. Imports neither torch nor transformers, so the command line tells an export
from a fused checkpoint at no cost; :mod:`fusesurgery.surgery.exported` reads one.

Two writers make this layout: ``convert --to transformers`` (a fused checkpoint exported; its
``config.json`` carries the fused checkpoint's ``fusion_config.json``) and ``fuse --format
transformers`` (any family straight into it; its ``config.json`` carries what fuse did
instead, and it has no native form).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusesurgery.errors import CheckpointError, ConfigError, ShapeError

if TYPE_CHECKING:
    from fusesurgery.surgery.fused_config import FusedConfig

EXPORT_MODEL_TYPE = "fusesurgery_fused"  # the exported config.json's model_type
EXPORT_TARGET = "transformers"  # convert --to's name for the export

CONFIG_MODULE = "configuration_fusesurgery_fused"
MODELING_MODULE = "modeling_fusesurgery_fused"
PROCESSING_MODULE = "processing_fusesurgery_fused"
CONFIG_CLASS = "FusedVisionTextConfig"
MODEL_CLASS = "FusedVisionTextForConditionalGeneration"
PROCESSOR_CLASS = "FusedVisionTextProcessor"
TEMPLATE_FILES: tuple[str, ...] = (f"{CONFIG_MODULE}.py", f"{MODELING_MODULE}.py",
                                   f"{PROCESSING_MODULE}.py")
# what the model itself needs to load with trust_remote_code (a model's own save_pretrained
# writes these two; the processing file comes with the processor's)
MODEL_CODE_FILES: tuple[str, ...] = TEMPLATE_FILES[:2]

TEXT_PREFIX = "language_model."
VISION_PREFIX = "vision_tower."
CROSS_PREFIX = "cross_attention_layers."
PROJECTION_PREFIX = "projection."
FUSION_EMBEDDING_KEY = "fusion_embedding.weight"
# The fused checkpoint's whole fusion_config.json, inside config.json: the way back.
FUSION_CONFIG_FIELD = "fusesurgery_fusion_config"
# What ``fuse --format transformers`` did (sources, choices, new tokens), inside config.json.
FUSE_RECORD_FIELD = "fusesurgery_fuse"


def is_transformers_export(document: object) -> bool:
    """Whether a config.json document is an export's (``model_type`` fusesurgery_fused)."""
    return isinstance(document, dict) and document.get("model_type") == EXPORT_MODEL_TYPE


def is_any_export(document: object) -> bool:
    """Whether a config.json document is one ``fuse --format transformers`` wrote."""
    return is_transformers_export(document) and isinstance(document.get(FUSE_RECORD_FIELD),
                                                           dict)


def is_export_directory(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory written by ``convert --to transformers`` or ``fuse
    --format transformers`` (its config.json says so); reads that one file. Anything but a
    local directory (a Hub repo id is a str too) is not one: the readers name what it is."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    config = Path(path) / "config.json"
    if not Path(path).is_dir() or not config.is_file():
        return False
    try:
        document = json.loads(config.read_bytes())
    except (OSError, ValueError):
        return False  # the readers report what is wrong with it
    return is_transformers_export(document)


def hub_export_directory(path: object, *, remote_headers: bool = False) -> Path | None:
    """Where a Hub repo whose files are a transformers export lies in huggingface_hub's cache
    (its weights fetched too, unless ``remote_headers``: then its side files alone), so that
    every reader takes ``org/name`` as it takes a local export; None for a local path, for
    what names no repo, and for a repo that is no export (its readers open it as before).

    Raises:
        HubError: a repo that is missing, gated or out of reach (what opening it says).
    """
    if not isinstance(path, (str, os.PathLike)) or os.path.lexists(os.fspath(path)):
        return None
    from fusesurgery.io.hub_sources import (  # noqa: PLC0415 - Hub ids only
        fetch_hub_files,
        hub_reference_for,
        open_hub_checkpoint,
    )

    reference = hub_reference_for(path)
    if reference is None:
        return None
    # config.json, and an export's code files, which remote headers alone would not fetch
    config = fetch_hub_files(reference, ("config.json", *TEMPLATE_FILES)) / "config.json"
    try:
        document = json.loads(config.read_bytes())
    except (OSError, ValueError):
        return None  # no config.json, or no JSON: the readers say what the repo is
    if not is_transformers_export(document):
        return None
    if remote_headers:
        return config.parent
    with open_hub_checkpoint(path) as source:  # the weights and the side files
        return Path(source.hub.directory)


def local_export_path(path: object) -> object:
    """``path``, or for a Hub repo whose files are a transformers export, the directory its
    files were fetched into (see :func:`hub_export_directory`): what the readers of a local
    export take.

    Raises:
        HubError: as :func:`hub_export_directory`.
    """
    directory = hub_export_directory(path)
    return path if directory is None else directory


def check_template_files(directory: Path, path: object) -> None:
    """Raises CheckpointError when the modeling or configuration file is missing."""
    missing = [name for name in MODEL_CODE_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: half a transformers export: {missing[0]} is missing "
                              "(transformers cannot load it with trust_remote_code); write "
                              "it again")


def export_fusion_fields(config: FusedConfig) -> dict[str, Any]:
    """The fields of an export's ``config.json`` that the exported model's classes build the
    fusion from (its layers, sizes, epsilons, tokens, projection, which tower output), as the
    fused checkpoint's fusion config gives them."""
    d, f, e = config.decoder, config.fusion, config.encoder
    image = next((t.id for t in config.new_tokens if t.token == "<|image|>"),
                 config.new_tokens[0].id if config.new_tokens else None)
    return {
        "fusion_layers": list(f.fusion_layers),
        "fusion_first": f.fusion_first,
        "ca_norm_eps": f.ca_norm_eps,
        "qk_norm_eps": f.qk_norm_eps,
        "fusion_norm_unit_offset": f.norm_unit_offset,
        "fusion_num_heads": d.num_heads,
        "fusion_num_kv_heads": d.num_kv_heads,
        "fusion_head_dim": d.head_dim,
        "fusion_intermediate_size": d.intermediate_dim,
        "hidden_size": d.embed_dim,
        "vision_hidden_size": e.embed_dim,
        "text_vocab_size": d.vocab_size,
        "fusion_vocab_size": f.fusion_vocab_size,
        "image_token_id": image,
        "new_tokens": [{"token": t.token, "id": t.id} for t in config.new_tokens],
        "projection": config.projection,
        "vision_feature_layer": e.output_layer,
        "encoder_tokens": e.feature_tokens,
        "vision_num_cls_tokens": int(e.class_token),
        "vision_num_register_tokens": e.num_register_tokens,
        "vision_naflex": e.naflex,
        "tie_word_embeddings": d.tie_word_embeddings,
    }


# Fields the exported classes default when config.json leaves them out (exports written before
# the field existed): a file without one means this value, and is checked as stating it.
EXPORT_FIELD_DEFAULTS: dict[str, Any] = {"vision_naflex": False}


def _as_json(value: object) -> object:
    """``value`` as it reads back from JSON (tuples as lists), for comparing with a file."""
    return json.loads(json.dumps(value, default=str))


def check_export_config(document: Mapping[str, Any], config: FusedConfig,
                        path: object) -> None:
    """An export's ``config.json`` against the fusion config it carries, which its tensors
    were checked against: transformers builds the model from ``text_config``,
    ``vision_config`` and the fusion fields, fusesurgery from the carried config, so the two
    must describe the same model. Every field of :func:`export_fusion_fields` the file
    states, and every computation field its two sub-configs state (or leave to their
    loader's default), read as a source's config is read.

    Raises:
        ConfigError: a field that says otherwise (an edited config.json), or a sub-config
            that cannot be read.
    """
    from fusesurgery.convert.configs import (  # noqa: PLC0415 - only for an export
        read_decoder_config,
        read_vision_config,
    )

    origin = f"{path}/config.json"
    for name, value in export_fusion_fields(config).items():
        stated = document.get(name, EXPORT_FIELD_DEFAULTS.get(name, value))
        if _as_json(stated) != _as_json(value):
            raise ConfigError(f"{origin}: {name} is {stated!r}, but its "
                              f"{FUSION_CONFIG_FIELD} (which the weights match) says "
                              f"{_as_json(value)!r}: an edited config.json, which transformers "
                              "would build another model from")
    for key, part, reader in (("text_config", config.decoder, read_decoder_config),
                              ("vision_config", config.encoder, read_vision_config)):
        stated = document.get(key)
        if not isinstance(stated, dict):
            raise ConfigError(f"{origin}: {key} must be an object, not "
                              f"{type(stated).__name__}")
        reading = reader(stated, f"{origin}: {key}")
        for name, value in {**reading.defaults, **reading.read}.items():
            ours = getattr(part, name, value)
            if _as_json(ours) != _as_json(value):
                raise ConfigError(f"{origin}: its {key} gives {name} {_as_json(value)!r}, but "
                                  f"its {FUSION_CONFIG_FIELD} (which the weights match) says "
                                  f"{_as_json(ours)!r}: an edited config.json, which "
                                  "transformers would build another model from")


def check_tensor_shapes(infos: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
                        origin: object, described_by: str) -> None:
    """A checkpoint's tensors (name -> info with a ``shape``) against the names and shapes
    ``described_by`` (its config.json, its fusion config) gives.

    Raises:
        ShapeError: missing or extra tensors (the first three of each named), or a shape
            other than the description's.
    """
    missing = sorted(set(expected) - set(infos))
    unexpected = sorted(set(infos) - set(expected))
    if missing or unexpected:
        raise ShapeError(f"{origin}: its tensors are not the ones its {described_by} "
                         f"describes: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, info in infos.items():
        if tuple(info.shape) != tuple(expected[name]):
            raise ShapeError(f"{origin}: {name} is {list(info.shape)}, its {described_by} "
                             f"needs {list(expected[name])}")


def native_model_types() -> tuple[frozenset[str], frozenset[str]]:
    """The transformers model types fusesurgery's native modules read (decoders, towers)."""
    from fusesurgery.convert.configs import (  # noqa: PLC0415
        HF_DECODER_FAMILIES,
        HF_VISION_FAMILIES,
    )

    # (every family file's model types: fusesurgery.families)
    return frozenset(HF_DECODER_FAMILIES), frozenset(HF_VISION_FAMILIES)


__all__ = ["EXPORT_MODEL_TYPE", "EXPORT_TARGET", "FUSE_RECORD_FIELD", "FUSION_CONFIG_FIELD",
           "check_export_config", "check_tensor_shapes", "check_template_files",
           "export_fusion_fields", "hub_export_directory", "is_any_export",
           "is_export_directory", "is_transformers_export", "local_export_path",
           "native_model_types"]

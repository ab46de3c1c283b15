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
from pathlib import Path

from fusesurgery.errors import CheckpointError

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


def check_template_files(directory: Path, path: object) -> None:
    """Raises CheckpointError when the modeling or configuration file is missing."""
    missing = [name for name in MODEL_CODE_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: half a transformers export: {missing[0]} is missing "
                              "(transformers cannot load it with trust_remote_code); write "
                              "it again")


__all__ = ["EXPORT_MODEL_TYPE", "EXPORT_TARGET", "FUSE_RECORD_FIELD", "FUSION_CONFIG_FIELD",
           "check_template_files", "is_any_export", "is_export_directory",
           "is_transformers_export"]

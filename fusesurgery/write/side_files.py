"""The small files that travel beside weights: tokenizer, generation and processor configs."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusesurgery.convert.tokenizer import TOKENIZER_FILES
from fusesurgery.errors import ConfigError
from fusesurgery.io import CheckpointSource
from fusesurgery.io._files import read_side_file
from fusesurgery.surgery.fused_config import SOURCE_FILES_DIR

# Files beside a decoder that the fused model needs as they are (or, the tokenizer, with the
# new tokens added), and beside an encoder.
DECODER_SIDE_FILES: tuple[str, ...] = (*TOKENIZER_FILES, "generation_config.json")
ENCODER_SIDE_FILES: tuple[str, ...] = ("preprocessor_config.json", "processor_config.json")
# A decoder's own transformers config.json, kept beside a native or Meta checkpoint converted
# from it: the way back to hf starts from it, so what the native config cannot hold (token
# ids, a sliding window, dtype, ...) comes back as it was.
HF_CONFIG_SIDE_FILE = "hf_config.json"
# The special-token ids a transformers config.json (and a generation config) states.
TOKEN_ID_FIELDS: tuple[str, ...] = ("bos_token_id", "eos_token_id", "pad_token_id")


def side_directory(source: CheckpointSource) -> Path:
    """The directory whose config and tokenizer files belong to ``source``."""
    path = Path(source.path)
    return path if path.is_dir() else path.parent


def read_side_files(directory: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The files among ``names`` present in ``directory``, read whole.

    Raises:
        CheckpointError: one is present but unreadable, not a regular file, or too large.
    """
    found = {}
    for name in names:
        path = directory / name
        if os.path.lexists(path):
            found[name] = read_side_file(path)
    return found


def read_kept_source_files(directory: Path,
                           sources: Mapping[str, Mapping[str, Any]]) -> dict[str, bytes]:
    """The source files fuse kept under ``directory/source/<part>/`` (each part's
    ``kept_files`` in ``fusion_config.json``'s sources), keyed by their path in the directory.

    Raises:
        CheckpointError: one is present but unreadable, not a regular file, or too large.
    """
    found: dict[str, bytes] = {}
    for part, record in sources.items():
        kept = read_side_files(directory / SOURCE_FILES_DIR / part,
                               tuple(record.get("kept_files", ())))
        found.update({f"{SOURCE_FILES_DIR}/{part}/{name}": content
                      for name, content in kept.items()})
    return found


def json_object(content: bytes, origin: object) -> dict[str, Any] | None:
    """A side file's JSON object (None when it holds another JSON value).

    Raises:
        ConfigError: not valid JSON.
    """
    try:
        document = json.loads(content)
    except ValueError as error:
        raise ConfigError(f"{origin}: not valid JSON ({error})") from None
    return document if isinstance(document, dict) else None


def read_json_side_file(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None where there is no such file or no object.

    Raises:
        CheckpointError: unreadable, not a regular file, or too large.
        ConfigError: not valid JSON.
    """
    if not os.path.lexists(path):
        return None
    return json_object(read_side_file(path), path)


__all__ = ["DECODER_SIDE_FILES", "ENCODER_SIDE_FILES", "HF_CONFIG_SIDE_FILE", "TOKEN_ID_FIELDS",
           "json_object", "read_json_side_file", "read_side_files", "side_directory"]

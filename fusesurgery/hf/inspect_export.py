"""``inspect DIR`` for a transformers export: what it holds, from config.json and the
safetensors headers alone (the gate scalars read from their bytes); imports neither torch nor
transformers."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusesurgery._plural import plural
from fusesurgery.errors import (
    ConfigError,
    FuseSurgeryError,
    KeyMapError,
    UnrecognizedFormatError,
    UnsupportedFamilyError,
)
from fusesurgery.io import TensorInfo, open_checkpoint
from fusesurgery.reports.formatting import format_bytes

TEXT_PREFIX, VISION_PREFIX = "language_model.", "vision_tower."  # as hf.export names them
TEMPLATE_FILES = ("configuration_fusesurgery_fused.py", "modeling_fusesurgery_fused.py")
GATE_SUFFIXES = (".ca_scale.scale", ".mlp_scale.scale")
FUSE_RECORD_FIELD = "fusesurgery_fuse"  # hf.anyfamily's
FUSION_FIELDS = ("fusion_layers", "fusion_first", "fusion_num_heads", "fusion_num_kv_heads",
                 "fusion_head_dim", "fusion_intermediate_size", "ca_norm_eps", "qk_norm_eps",
                 "projection", "vision_feature_layer", "tie_word_embeddings",
                 "fusion_norm_unit_offset")
# what the exported model's config class takes for a field an older export does not state
FUSION_FIELD_DEFAULTS = {"fusion_norm_unit_offset": False}
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers?|h|blocks)\.(\d+)\.")


def _generic_mismatch(tensors: Mapping[str, TensorInfo], config: Mapping[str, Any]) -> str | None:
    """For a family fusesurgery has no reader of: the layer count and the width its config
    states against the weights (the layers' indices; the most common 1-D length, which norms
    and biases share)."""
    layers = {int(m.group(1)) for name in tensors if (m := LAYER_INDEX.search(name))}
    stated = config.get("num_hidden_layers")
    if isinstance(stated, int) and layers and stated != max(layers) + 1:
        return f"num_hidden_layers {stated}, the weights hold {max(layers) + 1} layers"
    widths = Counter(info.shape[0] for info in tensors.values() if len(info.shape) == 1)
    hidden = config.get("hidden_size")
    if isinstance(hidden, int) and widths and hidden not in widths:
        width = widths.most_common(1)[0][0]
        return f"hidden_size {hidden}, the weights' width is {width}"
    return None


def config_mismatches(infos: Mapping[str, TensorInfo],
                      document: Mapping[str, Any]) -> tuple[str, ...]:
    """Where ``text_config`` / ``vision_config`` contradict the tensors under
    ``language_model.`` / ``vision_tower.``, from the headers alone: for a family fusesurgery
    reads, its config read as ``inspect`` reads a source's and checked against every shape;
    for another, its layer count and width."""
    from fusesurgery.convert.detect import detect_model  # noqa: PLC0415

    found = []
    for prefix, key in ((TEXT_PREFIX, "text_config"), (VISION_PREFIX, "vision_config")):
        config = document.get(key)
        tensors = {name.removeprefix(prefix): info for name, info in infos.items()
                   if name.startswith(prefix)}
        if not isinstance(config, dict) or not tensors:
            continue
        why = None
        try:
            detect_model(tensors, config, f"{key}")
        except (UnsupportedFamilyError, UnrecognizedFormatError, KeyMapError):
            why = _generic_mismatch(tensors, config)
        except FuseSurgeryError as error:
            why = str(error)
        if why is not None:
            found.append(f"config.json's {key} does not describe the weights ({why}); "
                         "transformers cannot load it as it is")
    return tuple(found)


def _carried_config_notes(document: Mapping[str, Any], path: object) -> tuple[str, ...]:
    """For an export ``convert --to transformers`` wrote: where its config.json and the
    fusion config it carries (the way back to the native layout) disagree, or that one cannot
    be read: what every reader of the export refuses, from config.json alone."""
    from fusesurgery.surgery.export_layout import (  # noqa: PLC0415
        FUSION_CONFIG_FIELD,
        check_export_config,
    )
    from fusesurgery.surgery.fused_config import fused_config_from_dict  # noqa: PLC0415

    try:
        config = fused_config_from_dict(document.get(FUSION_CONFIG_FIELD),
                                        f"{path}/config.json: {FUSION_CONFIG_FIELD}")
        if config.encoder is not None:
            check_export_config(document, config, path)
    except FuseSurgeryError as error:
        return (f"{error}; load_fused, convert, validate, unfuse and generate refuse it",)
    return ()


@dataclass(frozen=True)
class ExportReport:
    """What a transformers export holds.

    Attributes:
        path: the directory.
        written_by: ``fuse --format transformers`` or ``convert --to transformers``.
        text_family, vision_family: the transformers model types of its two parts.
        fusion: the fusion fields of its config.json.
        new_tokens: token -> id.
        parameters: part (``text model``, ``vision tower``, ``fusion``) -> elements.
        dtypes: dtype -> elements.
        num_tensors, total_bytes: of its weights.
        gates: gate key -> value.
        choices: what fuse chose and why (``fuse --format transformers`` only).
        keys: every tensor, ``(name, shape, dtype)``.
        notes: what is wrong or missing.
    """

    path: str
    written_by: str
    text_family: str
    vision_family: str
    fusion: dict[str, Any]
    new_tokens: dict[str, int]
    parameters: dict[str, int]
    dtypes: dict[str, int]
    num_tensors: int
    total_bytes: int
    gates: dict[str, float]
    choices: dict[str, str] = field(default_factory=dict)
    keys: tuple[tuple[str, tuple[int, ...], str], ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self, all_keys: bool = False) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in (
            "path", "written_by", "text_family", "vision_family", "fusion", "new_tokens",
            "parameters", "dtypes", "num_tensors", "total_bytes", "gates", "choices")}
        out["notes"] = list(self.notes)
        if all_keys:
            out["keys"] = [{"name": n, "shape": list(s), "dtype": d} for n, s, d in self.keys]
        return out

    def summary(self, all_keys: bool = False) -> str:
        nonzero = sum(value != 0.0 for value in self.gates.values())
        identity = (f"identity: all gates 0 ({plural(len(self.gates), 'gate')})" if not nonzero
                    else f"trained: {nonzero} of {plural(len(self.gates), 'gate')} nonzero")
        lines = [
            f"{self.path}: a transformers export ({self.written_by}): {self.vision_family} "
            f"tower -> {self.text_family} text model",
            f"tensors: {self.num_tensors}, {format_bytes(self.total_bytes)}; parameters: "
            + ", ".join(f"{part} {count:,}" for part, count in self.parameters.items()),
            "dtypes: " + ", ".join(f"{d} {n:,}" for d, n in self.dtypes.items()),
            "fusion: " + ", ".join(f"{k} {v}" for k, v in self.fusion.items()),
            "new tokens: " + ", ".join(f"{t}={i}" for t, i in self.new_tokens.items()),
            *(f"chose {name}: {why}" for name, why in self.choices.items()),
            identity,
            *(f"note: {note}" for note in self.notes),
        ]
        if all_keys:
            lines += [f"{n} {list(s)} {d}" for n, s, d in self.keys]
        return "\n".join(lines)


def inspect_export(path: str | os.PathLike[str]) -> ExportReport:
    """Describe a transformers export from its metadata.

    Raises:
        CheckpointError: unreadable files.
        ConfigError: a config.json that is not an export's.
    """
    with open_checkpoint(path, remote_headers=True) as source:  # a Hub repo: no download
        document = source.config
        if not isinstance(document, dict):
            raise ConfigError(f"{path}: no config.json")
        text, vision = document.get("text_config"), document.get("vision_config")
        if not isinstance(text, dict) or not isinstance(vision, dict):
            raise ConfigError(f"{path}/config.json: text_config and vision_config must be "
                              "objects")
        infos = source.infos()
        parameters = {"text model": 0, "vision tower": 0, "fusion": 0}
        dtypes: dict[str, int] = {}
        for name, info in infos.items():
            part = ("text model" if name.startswith(TEXT_PREFIX) else "vision tower"
                    if name.startswith(VISION_PREFIX) else "fusion")
            parameters[part] += info.numel
            dtype = info.dtype_code.lower()
            dtypes[dtype] = dtypes.get(dtype, 0) + info.numel
        gates = {name: source.read_scalar(name) for name in infos
                 if name.endswith(GATE_SUFFIXES)}
        directory = Path(source.path) if Path(source.path).is_dir() else Path(source.path).parent
        notes = tuple(f"{name} is missing: transformers cannot load it with trust_remote_code"
                      for name in TEMPLATE_FILES if not (directory / name).is_file())
        notes += config_mismatches(infos, document)
        record = document.get(FUSE_RECORD_FIELD)
        if not isinstance(record, dict) and not notes:
            notes += _carried_config_notes(document, path)
        tokens = document.get("new_tokens") or []
        return ExportReport(
            path=str(path),
            written_by=("fuse --format transformers" if isinstance(record, dict)
                        else "convert --to transformers"),
            text_family=str(text.get("model_type")),
            vision_family=str(vision.get("model_type")),
            fusion={name: document.get(name, FUSION_FIELD_DEFAULTS.get(name))
                    for name in FUSION_FIELDS},
            new_tokens={t.get("token"): t.get("id") for t in tokens if isinstance(t, dict)},
            parameters=parameters, dtypes=dtypes, num_tensors=len(infos),
            total_bytes=source.total_bytes, gates=gates,
            choices=dict(record.get("choices") or {}) if isinstance(record, dict) else {},
            keys=tuple((name, tuple(info.shape), info.dtype_code.lower())
                       for name, info in infos.items()),
            notes=notes)


__all__ = ["ExportReport", "inspect_export"]

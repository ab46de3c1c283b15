"""What is this checkpoint? A report built from metadata alone.

:func:`inspect_checkpoint` opens a checkpoint lazily, detects what it holds and returns an
:class:`InspectReport`: the file format; the architecture (decoder, vision tower or fused
model; family; key layout); the resolved config with the provenance of every field;
parameter counts per component and per dtype; the key tree with layer ranges collapsed; and,
for a fused checkpoint, where its fusion layers sit and what its gates hold.

No tensor data is read, except the gate scalars of a fused checkpoint (one number per
``TanhGate``), so a Llama-3.1-405B-shaped checkpoint inspects in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from fusesurgery._plural import plural
from fusesurgery.config import DecoderConfig, FusionConfig, VisionEncoderConfig
from fusesurgery.convert.configs import DECODER_FIELDS, VISION_FIELDS
from fusesurgery.convert.detect import (
    DECODER_FLAGS,
    VISION_FLAGS,
    DetectedModel,
    PartialConfig,
    detect_layout,
    detect_model,
    unsupported_family,
)
from fusesurgery.convert.keymaps import (
    FUSED_TORCHTUNE_VISION_PREFIX,
    FUSED_VISION_PREFIX,
    LAYER,
    keys_to_native,
    split_layer_index,
)
from fusesurgery.errors import (
    ConfigError,
    FuseSurgeryError,
    KeyMapError,
    UnrecognizedFormatError,
    UnsupportedFamilyError,
)
from fusesurgery.families import ADDING_A_FAMILY, Closest, closest_family
from fusesurgery.io import CheckpointSource, TensorInfo, open_checkpoint
from fusesurgery.io.checkpoint import FUSION_CONFIG_FILE
from fusesurgery.reports.formatting import format_bytes, format_index_set
from fusesurgery.surgery.fused_config import (
    FusedConfig,
    check_config_against_keys,
    check_gates_against_weights,
    fused_config_from_dict,
)

# Overrides of a vision encoder's fields carry this prefix (``encoder_num_heads``), as the
# CLI's ``--encoder-*`` options do; unprefixed names are decoder fields.
ENCODER_OVERRIDE_PREFIX = "encoder_"

# Suffix of a TanhGate's parameter in a fused checkpoint (``...fusion_layer.ca_scale.scale``).
GATE_SUFFIX = "_scale.scale"
MLLAMA_GATE_SUFFIXES = (".cross_attn_attn_gate", ".cross_attn_mlp_gate")  # as transformers names

NOT_CONVERTED = "not converted"

# Components of each kind of model, in display order: name -> glob patterns over native keys
# (``*`` matches dots too). The longest matching pattern wins, so ``encoder.projection.*``
# claims the projection head before ``encoder.*`` can.
COMPONENT_PATTERNS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "decoder": (
        ("embeddings", ("tok_embeddings.*",)),
        ("layers", ("layers.*",)),
        ("final norm + output", ("norm.*", "output.*")),
    ),
    "vision": (
        ("embeddings", ("conv.*", "cls_token_embedding.*", "token_pos_embedding.*")),
        ("layers", ("layers.*",)),
        ("norms", ("ln_pre.*", "ln_post.*")),
    ),
    "fused": (
        ("embeddings", ("decoder.tok_embeddings.weight",)),
        ("fusion embedding", ("decoder.tok_embeddings.fusion_embedding.*",)),
        ("layers", ("decoder.layers.*",)),
        ("fusion layers", ("decoder.layers.*.fusion_layer.*",)),
        ("final norm + output", ("decoder.norm.*", "decoder.output.*")),
        ("encoder", ("encoder.*",)),
        ("projection head", ("encoder.projection.*",)),
    ),
}


@dataclass(frozen=True)
class TensorCount:
    """How many tensors, parameters and bytes fall under one name (a component, a dtype).

    Args:
        name: the component (``"layers"``) or dtype (``"bf16"``).
        num_tensors: tensors counted.
        num_parameters: their elements, summed.
        nbytes: their size in bytes.
    """

    name: str
    num_tensors: int
    num_parameters: int
    nbytes: int


@dataclass(frozen=True)
class KeyRow:
    """One row of the collapsed key tree: keys differing only in their layer index, with one
    shape and dtype.

    Args:
        name: the stored key, its layer index replaced by the compact index set when the row
            covers several keys (``layers.{0..31}.attn.q_proj.weight``); else the key itself.
        template: the stored key with its layer index as ``{i}``; the key itself when it has
            no layer index.
        layers: the layer indices covered, ascending; empty for a key without one.
        shape: the shape every key of the row has.
        dtype: their dtype's short name (``bf16``).
        num_parameters: elements of all keys of the row.
    """

    name: str
    template: str
    layers: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str
    num_parameters: int

    @property
    def num_tensors(self) -> int:
        return max(len(self.layers), 1)


@dataclass(frozen=True)
class FusionReport:
    """The fusion parts of a fused checkpoint.

    Args:
        fusion_layers: decoder layers that carry a fusion layer.
        fusion_vocab_size: rows of the fusion embedding (new tokens), 0 without one.
        encoder_dim: width of the encoder output the fusion layers attend to.
        gates: stored key of every TanhGate parameter -> its value; ``tanh(value)`` scales
            what the gated branch adds, so all zeros means the fused model computes exactly
            what the original decoder did.
        encoder: the vision encoder (``encoder.vision.*``) detected with its config, or None
            when it could not be resolved (the report's notes say why).
        fusion_first: each fusion layer runs before its decoder layer (else after).
        ca_norm_eps: epsilon of the fusion layers' RMSNorms.
        qk_norm_eps: epsilon of the cross-attention q/k RMSNorms.
        projection: the projection head (``mlp``, ``linear``), or None when unrecorded.
        settings_source: where the four settings above come from (``fusion_config.json``,
            or ``the layout's defaults`` when no fusion config records them).
    """

    fusion_layers: tuple[int, ...]
    fusion_vocab_size: int
    encoder_dim: int
    gates: Mapping[str, float]
    encoder: DetectedModel | None = None
    fusion_first: bool = True
    ca_norm_eps: float = 1e-6
    qk_norm_eps: float = 1e-5
    projection: str | None = None
    settings_source: str = "the layout's defaults"

    @property
    def is_identity(self) -> bool:
        """Every gate is exactly 0: the fusion layers add nothing."""
        return all(value == 0.0 for value in self.gates.values())


# config.json fields a metadata viewer shows first, for an architecture no family describes
# (transformers' spellings; the first that is present of each group).
CONFIG_MAIN_FIELDS: tuple[str, ...] = (
    "model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
    "max_position_embeddings", "hidden_act", "hidden_activation", "rms_norm_eps",
    "layer_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "sliding_window",
    "tie_word_embeddings", "image_size", "patch_size", "num_channels", "dtype", "torch_dtype",
)


@dataclass(frozen=True)
class UnsupportedArchitecture:
    """A checkpoint no family file describes: what its config.json says, and what it needs.

    Args:
        kind: ``"decoder"`` or ``"vision"``, or None when nothing tells.
        model_type: its transformers ``model_type``, or None.
        config_fields: the main fields of its config.json (``CONFIG_MAIN_FIELDS`` it states);
            without a config.json, those its key names and shapes tell.
        closest: the nearest supported family, or None when none shares a key name.
        reason: the error every command that needs a native module gives for it.
        looks_like: without a config.json, the architecture its key names suggest
            (``KEY_SIGNATURES``), or None.
        fields_from_shapes: ``config_fields`` come from key names and shapes, not a file.
    """

    kind: str | None
    model_type: str | None
    config_fields: Mapping[str, Any]
    closest: Closest | None
    reason: str
    looks_like: str | None = None
    fields_from_shapes: bool = False

    def needs(self) -> str:
        """One line: which native family it would need, and the closest supported one."""
        what = f"model_type {self.model_type!r}" if self.model_type else "this checkpoint"
        if self.looks_like:
            what += f" (no config; its keys look like {self.looks_like})"
        kind = f"{self.kind} " if self.kind else ""
        advice = self.closest.advice() if self.closest is not None else (
            f"no supported family shares its key names; to add one, see {ADDING_A_FAMILY}")
        return f"{what} needs a native {kind}family of its own: {advice}"


@dataclass(frozen=True)
class UnresolvedConfig:
    """A supported checkpoint whose config cannot be completed from what it holds (a native
    Llama file without a config: its head count): what the weights tell, and which facts
    need an option.

    Args:
        kind: ``"decoder"``, ``"vision"`` or ``"fused"``.
        layout: its key layout.
        partial: the fields resolved, with their provenance, and the ones missing.
        attention_rows: stored q and k projection key -> rows (heads x head width), which
            the missing head count splits.
    """

    kind: str
    layout: str
    partial: PartialConfig
    attention_rows: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))

    @property
    def family(self) -> str | None:
        return self.partial.values.get("family")

    def needs(self) -> str:
        """One line: which facts need which option, and what the weights say of them."""
        by_flag: dict[str, list[str]] = {}
        for name, flag in self.partial.missing.items():
            by_flag.setdefault(flag, []).append(name)
        parts = [f"{_listed(names)} need{'s' if len(names) == 1 else ''} {flag}"
                 for flag, names in by_flag.items()]
        rows = ", ".join(f"{key} has {rows} rows" for key, rows in self.attention_rows.items())
        told = f" ({rows}: heads x head width)" if rows else ""
        return (f"{'; '.join(parts)}: neither a config file nor the shapes tell "
                f"{'it' if len(self.partial.missing) == 1 else 'them'}{told}; convert, fuse "
                "and load ask for it, inspect shows what the weights tell")


def _listed(names: list[str]) -> str:
    return " and ".join(filter(None, (", ".join(names[:-1]), names[-1])))


@dataclass(frozen=True)
class InspectReport:
    """What a checkpoint holds, from its metadata.

    Args:
        path: the path inspected.
        format: the storage format (``safetensors``, ``safetensors-sharded``, ``torch``,
            ``torch-sharded``, ``meta``).
        files: the data files, in stored order.
        model: kind (``decoder``/``vision``/``fused``), layout, family, fused style, the
            resolved config (a fused model's: its decoder's) with per-field provenance, and
            notes. See :class:`fusesurgery.convert.DetectedModel`.
        components: tensors, parameters and bytes per component, in model order; keys that a
            conversion drops are counted under ``not converted (<reason>)``.
        dtypes: the same per dtype, most parameters first.
        num_tensors: tensors in the checkpoint.
        num_parameters: elements of every stored tensor (buffers such as RoPE frequencies
            included); the components sum to it.
        total_bytes: bytes of tensor data.
        key_rows: the key tree, layer ranges collapsed, in stored order of first appearance.
        tensors: every tensor's metadata, in stored order.
        fusion: fusion layers, fusion vocabulary and gates of a fused checkpoint, else None.
        notes: remarks for the user: the model's notes, overrides that did not apply, parts
            that could not be resolved.
        unsupported: for an architecture no family file describes (``model`` is then None,
            ``components`` one row of everything): its config's main fields and the native
            family it would need.
        unresolved: for a supported checkpoint whose config nothing completes (no config
            file states its head count; ``model`` is then None): the fields its weights tell
            and which facts need an option.
    """

    path: str
    format: str
    files: tuple[str, ...]
    model: DetectedModel | None
    components: tuple[TensorCount, ...]
    dtypes: tuple[TensorCount, ...]
    num_tensors: int
    num_parameters: int
    total_bytes: int
    key_rows: tuple[KeyRow, ...]
    tensors: tuple[TensorInfo, ...]
    fusion: FusionReport | None = None
    notes: tuple[str, ...] = ()
    unsupported: UnsupportedArchitecture | None = None
    unresolved: UnresolvedConfig | None = None

    @property
    def kind(self) -> str:
        """``decoder``, ``vision`` or ``fused``; ``unsupported`` for an unknown architecture."""
        if self.unresolved is not None:
            return self.unresolved.kind
        return self.model.kind if self.model is not None else "unsupported"

    @property
    def config(self) -> DecoderConfig | VisionEncoderConfig | None:
        return self.model.config if self.model is not None else None

    def summary(self) -> str:
        """A few lines for people: the file, the model and its config, the fusion parts."""
        lines = [
            f"{self.path}: {self.format}, {plural(self.num_tensors, 'tensor')}, "
            f"{self.num_parameters:,} parameters, {format_bytes(self.total_bytes)}",
        ]
        if self.unsupported is not None:
            lines.extend(f"  {name} = {value!r}"
                         for name, value in self.unsupported.config_fields.items())
            lines.append(f"  {self.unsupported.needs()}")
            return "\n".join(lines)
        if self.unresolved is not None:
            unresolved = self.unresolved
            lines.append(f"{unresolved.kind} ({unresolved.family}, {unresolved.layout} layout)")
            lines.extend(f"  {name} = {value!r} ({unresolved.partial.provenance[name]})"
                         for name, value in unresolved.partial.values.items())
            lines.extend(f"  note: {note}" for note in self.notes)
            return "\n".join(lines)
        lines.append(self.model.summary())
        if self.fusion is not None:
            gates = "identity: all gates 0" if self.fusion.is_identity else (
                f"{sum(v != 0.0 for v in self.fusion.gates.values())} of "
                f"{plural(len(self.fusion.gates), 'gate')} non-zero"
            )
            lines.append(f"  gates: {gates}")
        lines.extend(f"  note: {note}" for note in self.notes if note not in self.model.notes)
        return "\n".join(lines)

    def to_dict(self, *, all_keys: bool = False) -> dict[str, Any]:
        """A JSON-ready dict.

        Args:
            all_keys: list every tensor under ``"keys"`` instead of the collapsed
                ``"key_tree"``.
        """
        if self.unsupported is not None:
            return self._unsupported_dict(all_keys)
        if self.unresolved is not None:
            return self._unresolved_dict(all_keys)
        payload: dict[str, Any] = {
            "path": self.path,
            "format": self.format,
            "files": list(self.files),
            # the family is config["family"], with its provenance beside the other fields
            "architecture": {
                "kind": self.model.kind,
                "layout": self.model.layout,
                "fused_style": self.model.fused_style,
            },
            "config": config_to_dict(self.model.config),
            "provenance": dict(self.model.provenance),
            # read from the config file, changing the computation, but not a config field
            "unmodelled": dict(self.model.unmodelled),
            "config_source": self.model.config_source,
            "num_tensors": self.num_tensors,
            "num_parameters": self.num_parameters,
            "total_bytes": self.total_bytes,
            # a list: component names are labels for people ("final norm + output"), not keys
            "components": [{"name": c.name, **_count_dict(c)} for c in self.components],
            "dtypes": {d.name: _count_dict(d) for d in self.dtypes},
            "fusion": None if self.fusion is None else _fusion_dict(self.fusion),
            "notes": list(self.notes),
        }
        payload.update(self._keys_dict(all_keys))
        return payload

    def _keys_dict(self, all_keys: bool) -> dict[str, Any]:
        if all_keys:
            return {"keys": [
                {"name": t.name, "shape": list(t.shape), "dtype": t.dtype_name}
                for t in self.tensors
            ]}
        return {"key_tree": [
            {"name": row.name, "template": row.template, "layers": list(row.layers),
             "shape": list(row.shape), "dtype": row.dtype,
             "num_tensors": row.num_tensors, "num_parameters": row.num_parameters}
            for row in self.key_rows
        ]}

    def _unresolved_dict(self, all_keys: bool) -> dict[str, Any]:
        unresolved = self.unresolved
        return {
            "path": self.path,
            "format": self.format,
            "files": list(self.files),
            "architecture": {"kind": unresolved.kind, "layout": unresolved.layout,
                             "fused_style": None, "resolved": False},
            # the fields the weights tell; the missing ones are under "missing"
            "config": dict(unresolved.partial.values),
            "provenance": dict(unresolved.partial.provenance),
            "missing": dict(unresolved.partial.missing),
            "attention_rows": dict(unresolved.attention_rows),
            "needs": unresolved.needs(),
            "num_tensors": self.num_tensors,
            "num_parameters": self.num_parameters,
            "total_bytes": self.total_bytes,
            "components": [{"name": c.name, **_count_dict(c)} for c in self.components],
            "dtypes": {d.name: _count_dict(d) for d in self.dtypes},
            "notes": list(self.notes),
            **self._keys_dict(all_keys),
        }

    def _unsupported_dict(self, all_keys: bool) -> dict[str, Any]:
        unsupported = self.unsupported
        closest = unsupported.closest
        return {
            "path": self.path,
            "format": self.format,
            "files": list(self.files),
            "architecture": {
                "kind": unsupported.kind,
                "supported": False,
                "model_type": unsupported.model_type,
                "needs": unsupported.needs(),
                "closest_family": None if closest is None else closest.family.name,
                "closest_why": None if closest is None else closest.why,
                "looks_like": unsupported.looks_like,
            },
            "config_fields": dict(unsupported.config_fields),
            "config_fields_from": "shapes" if unsupported.fields_from_shapes else "config",
            "error": unsupported.reason,
            "num_tensors": self.num_tensors,
            "num_parameters": self.num_parameters,
            "total_bytes": self.total_bytes,
            "dtypes": {d.name: _count_dict(d) for d in self.dtypes},
            "notes": list(self.notes),
            **self._keys_dict(all_keys),
        }


def config_to_dict(config: DecoderConfig | VisionEncoderConfig) -> dict[str, Any]:
    """A config's fields as plain JSON values (``rope_scaling`` as a dict or None)."""
    return dataclasses.asdict(config)


def _count_dict(count: TensorCount) -> dict[str, int]:
    return {"num_tensors": count.num_tensors, "num_parameters": count.num_parameters,
            "nbytes": count.nbytes}


def _fusion_dict(fusion: FusionReport) -> dict[str, Any]:
    encoder = None
    if fusion.encoder is not None:
        encoder = {
            "layout": fusion.encoder.layout,
            "config": config_to_dict(fusion.encoder.config),
            "provenance": dict(fusion.encoder.provenance),
        }
    return {
        "fusion_layers": list(fusion.fusion_layers),
        "fusion_vocab_size": fusion.fusion_vocab_size,
        "encoder_dim": fusion.encoder_dim,
        "fusion_first": fusion.fusion_first,
        "ca_norm_eps": fusion.ca_norm_eps,
        "qk_norm_eps": fusion.qk_norm_eps,
        "projection": fusion.projection,
        "settings_source": fusion.settings_source,
        "is_identity": fusion.is_identity,
        "gates": dict(fusion.gates),
        "encoder": encoder,
    }


# --------------------------------------------------------------------------------------------
# The key tree.


def collapse_keys(tensors: Iterable[TensorInfo]) -> tuple[KeyRow, ...]:
    """Collapse keys that differ only in their layer index and share shape and dtype.

    Keys keep their stored spelling; a row covering one key shows the key itself, and keys of
    one template with different shapes or dtypes stay in separate rows.

    Args:
        tensors: tensor metadata in stored order.

    Returns:
        The rows, in the order their first key appears.
    """
    groups: dict[tuple[str, bool, tuple[int, ...], str], list[int]] = {}
    for info in tensors:
        template, index = split_layer_index(info.name)
        # An index with leading zeros would not survive the round trip through int.
        if index is None or str(int(index)) != index:
            template, index = info.name, None
        key = (template, index is not None, tuple(info.shape), info.dtype_name)
        layers = groups.setdefault(key, [])
        if index is not None:
            layers.append(int(index))
    rows = []
    for (template, has_layer, shape, dtype), layers in groups.items():
        layers.sort()
        if not has_layer:
            name = template
        elif len(layers) == 1:
            name = template.replace(LAYER, str(layers[0]))
        else:
            name = template.replace(LAYER, format_index_set(layers))
        numel = math.prod(shape) * max(len(layers), 1)
        rows.append(KeyRow(name, template, tuple(layers), shape, dtype, numel))
    return tuple(rows)


# --------------------------------------------------------------------------------------------
# Counting.


def _tally(named: Iterable[tuple[str, TensorInfo]]) -> dict[str, list[int]]:
    totals: dict[str, list[int]] = {}
    for name, info in named:
        total = totals.setdefault(name, [0, 0, 0])
        total[0] += 1
        total[1] += info.numel
        total[2] += info.nbytes
    return totals


def _component_counts(
    infos: Mapping[str, TensorInfo], kind: str, layout: str
) -> tuple[TensorCount, ...]:
    mapping = keys_to_native(infos, layout, kind)
    patterns = COMPONENT_PATTERNS[kind]

    def component_of(source_key: str) -> str:
        native = mapping.mapping.get(source_key)
        if source_key in mapping.parts:  # a stacked tensor (qkv_proj): its first part's
            native = mapping.parts[source_key][0]
        if native is None:
            return f"{NOT_CONVERTED} ({mapping.dropped[source_key]})"
        matches = [(len(glob), component) for component, globs in patterns for glob in globs
                   if fnmatchcase(native, glob)]
        return max(matches)[1] if matches else "other"

    totals = _tally((component_of(key), info) for key, info in infos.items())
    order = [name for name, _ in patterns]
    names = sorted(totals, key=lambda n: (order.index(n) if n in order else len(order), n))
    return tuple(TensorCount(name, *totals[name]) for name in names)


def _dtype_counts(infos: Mapping[str, TensorInfo]) -> tuple[TensorCount, ...]:
    totals = _tally((info.dtype_name, info) for info in infos.values())
    counts = [TensorCount(name, *total) for name, total in totals.items()]
    return tuple(sorted(counts, key=lambda c: (-c.num_parameters, c.name)))


# --------------------------------------------------------------------------------------------
# Overrides and the fusion parts.


def _split_overrides(
    overrides: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    decoder: dict[str, Any] = {}
    vision: dict[str, Any] = {}
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name.startswith(ENCODER_OVERRIDE_PREFIX):
            field = name.removeprefix(ENCODER_OVERRIDE_PREFIX)
            valid, target = VISION_FIELDS, vision
        else:
            field, valid, target = name, DECODER_FIELDS, decoder
        if field not in valid:
            choices = [*DECODER_FIELDS, *(ENCODER_OVERRIDE_PREFIX + f for f in VISION_FIELDS)]
            raise ConfigError(
                f"unknown config override {name!r}; valid: {', '.join(sorted(choices))}"
            )
        target[field] = value
    return decoder, vision


def _ignored_note(overrides: Mapping[str, Any], flags: Mapping[str, str], why: str) -> str:
    return f"ignored {', '.join(flags[name] for name in overrides)}: {why}"


def _read_gates(source: CheckpointSource, keys: Iterable[str]) -> tuple[dict[str, float],
                                                                        list[str]]:
    gates: dict[str, float] = {}
    notes: list[str] = []
    for key in keys:
        if not key.endswith((GATE_SUFFIX, *MLLAMA_GATE_SUFFIXES)):
            continue
        info = source.info(key)
        if info.numel != 1:
            notes.append(f"{key} has shape {list(info.shape)}, not a TanhGate scalar; not read")
            continue
        gates[key] = source.read_scalar(key)  # from the file's bytes: no torch
    return gates, notes


def _detect_fused_encoder(
    infos: Mapping[str, TensorInfo],
    source: CheckpointSource,
    vision_overrides: Mapping[str, Any],
) -> tuple[DetectedModel | None, str | None]:
    """The vision encoder of a fused checkpoint with its config, or None and why not."""
    if not any(key.startswith(FUSED_VISION_PREFIX) for key in infos):
        if any(key.startswith(FUSED_TORCHTUNE_VISION_PREFIX) for key in infos):
            return None, (
                f"encoder keys are torchtune's ({FUSED_TORCHTUNE_VISION_PREFIX}*); its config "
                "is not resolved"
            )
        return None, "no vision encoder keys (encoder.vision.*); its config is not resolved"
    encoder_infos = {
        key.removeprefix(FUSED_VISION_PREFIX): info
        for key, info in infos.items()
        if key.startswith(FUSED_VISION_PREFIX)
    }
    config = source.config
    # Only fusesurgery's own config (with an "encoder" section) describes the encoder; a
    # decoder's config.json beside a fused checkpoint says nothing about it.
    if config is not None and not isinstance(config.get("encoder"), Mapping):
        config = None
    try:
        encoder = detect_model(encoder_infos, config, source.config_file, vision_overrides)
    except FuseSurgeryError as error:
        return None, f"vision encoder config not resolved: {error}"
    if encoder.kind != "vision":
        return None, "encoder.vision.* keys do not form a vision tower; its config is not resolved"
    return encoder, None


def _fusion_settings(recorded: FusedConfig | None, from_keys: FusionConfig) -> dict[str, Any]:
    """How the fusion computes beyond its shapes (order, epsilons, projection): as
    ``fusion_config.json`` records it, else as the layout implies."""
    if recorded is None:
        return {"fusion_first": from_keys.fusion_first, "ca_norm_eps": from_keys.ca_norm_eps,
                "qk_norm_eps": from_keys.qk_norm_eps}
    fusion = recorded.fusion
    return {"fusion_first": fusion.fusion_first, "ca_norm_eps": fusion.ca_norm_eps,
            "qk_norm_eps": fusion.qk_norm_eps, "projection": recorded.projection,
            "settings_source": FUSION_CONFIG_FILE}


# --------------------------------------------------------------------------------------------


def inspect_checkpoint(
    path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None
) -> InspectReport:
    """Describe a checkpoint from its metadata (plus a fused checkpoint's gate scalars).

    Args:
        path: anything :func:`fusesurgery.io.open_checkpoint` opens: a safetensors file, a
            shard index, a ``torch.save`` file, a Hugging Face / Meta / fusesurgery directory,
            a Hub repo id (a safetensors repo is read from its remote headers: nothing is
            downloaded but its config and its index; a fused repo's gate scalars are read
            by range requests of a few bytes).
        overrides: config values from the user, by field name: ``DecoderConfig`` fields
            (``num_heads``) for a decoder or a fused model's decoder, ``VisionEncoderConfig``
            fields prefixed ``encoder_`` (``encoder_num_heads``) for a vision tower. None
            values are ignored; overrides that do not apply to the checkpoint are ignored
            with a note.

    Returns:
        The report.

    Raises:
        CheckpointError: the path is missing, unreadable or corrupted (and its subclasses
            UnsafeCheckpointError, UnrecognizedFormatError).
        UnrecognizedFormatError: the keys match no known layout.
        KeyMapError: keys the detected layout does not know.
        ConfigError: an unknown override name, a config that disagrees with the shapes, or a
            value that nothing states (the message names the flag that supplies it, e.g.
            ``--num-heads``).
    """
    decoder_overrides, vision_overrides = _split_overrides(overrides)
    with open_checkpoint(path, remote_headers=True) as source:
        infos = source.infos()
        try:
            kind, _ = detect_layout(infos)
        except UnrecognizedFormatError as error:
            unsupported = unsupported_family(infos, source.config,
                                             source.config_file or "the config")
            if unsupported is None and source.config is None:
                unsupported = _configless_unsupported(infos, error)
            if unsupported is None or unsupported.kind is None and source.config is None:
                raise error from None  # keys that say nothing of a model (no embedding...)
            return _unsupported_report(path, source, infos, unsupported)
        try:
            return _supported_report(path, source, infos, kind, decoder_overrides,
                                     vision_overrides)
        except UnsupportedFamilyError as error:
            return _unsupported_report(path, source, infos, error)
        except ConfigError as error:  # a field nothing states: show what the weights tell
            if getattr(error, "partial", None) is None:
                raise
            return _unresolved_report(path, source, infos, kind, error.partial)
        except KeyMapError as error:  # keys no family of that layout knows
            if source.config is not None or kind == "fused":  # a damaged fused checkpoint
                raise
            return _unsupported_report(path, source, infos,
                                       _configless_unsupported(infos, error))


def _unresolved_report(path: str | os.PathLike[str], source: CheckpointSource,
                       infos: Mapping[str, TensorInfo], kind: str,
                       partial: PartialConfig) -> InspectReport:
    """What a metadata viewer shows of a supported checkpoint whose config nothing completes
    (files, tensors, dtypes, parameters per component, key rows, the fields its shapes
    tell), and which facts need an option."""
    _, layout = detect_layout(infos)
    mapping = keys_to_native(infos, layout, kind)
    prefix = "decoder." if kind == "fused" else ""
    sources = mapping.sources()
    rows = {}
    for native in (f"{prefix}layers.0.attn.q_proj.weight", f"{prefix}layers.0.attn.k_proj.weight"):
        key = sources.get(native)
        if key is not None and key not in mapping.parts and infos[key].shape:
            rows[key] = infos[key].shape[0]
    unresolved = UnresolvedConfig(kind=kind, layout=layout, partial=partial,
                                  attention_rows=types.MappingProxyType(rows))
    return _report(path, source, infos, model=None,
                   components=_component_counts(infos, kind, layout),
                   notes=(*partial.notes, unresolved.needs()), unresolved=unresolved)


def _unsupported_report(path: str | os.PathLike[str], source: CheckpointSource,
                        infos: Mapping[str, TensorInfo],
                        error: UnsupportedFamilyError) -> InspectReport:
    """What a metadata viewer shows of a checkpoint no family describes, and what it needs."""
    config = source.config if isinstance(source.config, Mapping) else {}
    fields = {name: config[name] for name in CONFIG_MAIN_FIELDS if name in config}
    configless = source.config is None
    if configless:
        fields = _fields_from_shapes(infos) if error.kind == "decoder" else {}
    closest = (closest_family(error.kind, error.model_type, infos)
               if error.kind is not None else None)
    unsupported = UnsupportedArchitecture(
        kind=error.kind, model_type=error.model_type,
        config_fields=types.MappingProxyType(fields), closest=closest, reason=str(error),
        looks_like=_looks_like(infos) if configless else None,
        fields_from_shapes=configless)
    everything = _tally(("all tensors (no family: not converted)", info)
                        for info in infos.values())
    return _report(path, source, infos, model=None,
                   components=tuple(TensorCount(name, *total)
                                    for name, total in everything.items()),
                   notes=(unsupported.needs(),), unsupported=unsupported)


def _report(path: str | os.PathLike[str], source: CheckpointSource,
            infos: Mapping[str, TensorInfo], **described: Any) -> InspectReport:
    """The report: what every checkpoint shows (files, counts per dtype, sizes, the key
    tree), from its metadata, plus what ``described`` says of its model (``model``,
    ``components``, ``fusion``, ``notes``, ``unsupported``)."""
    tensors = tuple(infos.values())
    return InspectReport(
        path=str(path),
        format=source.format,
        files=tuple(str(file) for file in source.files),
        dtypes=_dtype_counts(infos),
        num_tensors=len(tensors),
        num_parameters=sum(info.numel for info in tensors),
        total_bytes=source.total_bytes,
        key_rows=collapse_keys(tensors),
        tensors=tensors,
        **described,
    )


# Key-name signatures of architectures no family file describes, for a checkpoint without a
# config.json to name it: (what it looks like, key fragments it has, fragments it lacks).
# First match wins.
KEY_SIGNATURES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("gemma3_text (pre- and post-feed-forward norms, q/k norms)",
     (".pre_feedforward_layernorm.", ".post_feedforward_layernorm.", ".self_attn.q_norm."), ()),
    ("gemma2 (pre- and post-feed-forward norms, no q/k norms)",
     (".pre_feedforward_layernorm.", ".post_feedforward_layernorm."), ()),
    ("olmo2 (norms after attention and MLP only, q/k norms)",
     (".post_feedforward_layernorm.", ".self_attn.q_norm."), (".input_layernorm.",)),
    ("phi3 (fused qkv_proj and gate_up_proj)", (".self_attn.qkv_proj.", ".mlp.gate_up_proj."),
     ()),
    ("a DINOv2-style vision tower (layer scale)", (".layer_scale", "patch_embeddings."), ()),
)


def _looks_like(infos: Mapping[str, TensorInfo]) -> str | None:
    keys = list(infos)
    for what, has, lacks in KEY_SIGNATURES:
        if all(any(part in key for key in keys) for part in has) and not any(
                part in key for part in lacks for key in keys):
            return what
    return None


def _fields_from_shapes(infos: Mapping[str, TensorInfo]) -> dict[str, Any]:
    """The main config fields a decoder's transformers key names and shapes tell."""
    fields: dict[str, Any] = {}
    for key, info in infos.items():
        if key.endswith("embed_tokens.weight") and len(info.shape) == 2:
            fields["vocab_size"], fields["hidden_size"] = info.shape
    layers = {index for key in infos
              for _, index in [split_layer_index(key)] if index is not None}
    if layers:
        fields["num_hidden_layers"] = len(layers)
    for key, info in infos.items():
        if key.endswith("mlp.down_proj.weight") and len(info.shape) == 2:
            fields["intermediate_size"] = info.shape[1]
            break
    # a per-head q norm gives head_dim, and with it the head counts
    shapes = {split_layer_index(key)[0]: info.shape for key, info in infos.items()}
    q_norm = next((shape for key, shape in shapes.items()
                   if key.endswith("self_attn.q_norm.weight")), None)
    if q_norm and len(q_norm) == 1 and q_norm[0] != fields.get("hidden_size"):
        fields["head_dim"] = head_dim = q_norm[0]
        for name, projection in (("num_attention_heads", "q_proj"),
                                 ("num_key_value_heads", "k_proj")):
            shape = next((shape for key, shape in shapes.items()
                          if key.endswith(f"self_attn.{projection}.weight")), None)
            if shape and len(shape) == 2 and shape[0] % head_dim == 0:
                fields[name] = shape[0] // head_dim
    if fields and not any(key.startswith("lm_head.") for key in infos):
        fields["tie_word_embeddings"] = True  # no head stored: the table, if a LM at all
    return fields


def _configless_unsupported(infos: Mapping[str, TensorInfo],
                            error: FuseSurgeryError) -> UnsupportedFamilyError:
    """What a checkpoint without a config.json, whose keys no family knows, is taken for:
    its kind and closest family from its key names."""
    kind = _guess_kind(infos)
    closest = closest_family(kind, None, infos) if kind is not None else None
    return UnsupportedFamilyError(str(error), kind=kind,
                                  closest=closest.family.name if closest else None)


def _guess_kind(infos: Mapping[str, TensorInfo]) -> str | None:
    keys = list(infos)
    if any("embed_tokens." in key or key.startswith("lm_head.") for key in keys):
        return "decoder"
    if any("patch_embed" in key or "vision_model." in key for key in keys):
        return "vision"
    return None


def _supported_report(path: str | os.PathLike[str], source: CheckpointSource,
                      infos: Mapping[str, TensorInfo], kind: str,
                      decoder_overrides: dict[str, Any],
                      vision_overrides: dict[str, Any]) -> InspectReport:
    notes: list[str] = []
    if kind == "vision":
        model = detect_model(infos, source.config, source.config_file, vision_overrides)
        if decoder_overrides:
            notes.append(_ignored_note(decoder_overrides, DECODER_FLAGS,
                                       "the checkpoint holds no decoder"))
    else:
        model = detect_model(infos, source.config, source.config_file, decoder_overrides)
        if kind == "decoder" and vision_overrides:
            notes.append(_ignored_note(vision_overrides, VISION_FLAGS,
                                       "the checkpoint holds no vision encoder"))
    notes[:0] = model.notes

    fusion = None
    if model.kind == "fused" and model.fusion is not None:
        gates, gate_notes = _read_gates(source, infos)
        notes.extend(gate_notes)
        encoder, why_not = _detect_fused_encoder(infos, source, vision_overrides)
        if why_not is not None:
            notes.append(why_not)
        recorded = None
        if source.config_file == FUSION_CONFIG_FILE:  # cross-checked, as every reader does
            recorded = fused_config_from_dict(source.config, FUSION_CONFIG_FILE)
            check_config_against_keys(recorded, infos, FUSION_CONFIG_FILE)
            check_gates_against_weights(recorded, gates, FUSION_CONFIG_FILE)
        settings = _fusion_settings(recorded, model.fusion)
        fusion = FusionReport(
            fusion_layers=model.fusion.fusion_layers,
            fusion_vocab_size=model.fusion.fusion_vocab_size,
            encoder_dim=model.fusion.encoder_dim,
            gates=types.MappingProxyType(gates),
            encoder=encoder,
            **settings,
        )

    return _report(path, source, infos, model=model,
                   components=_component_counts(infos, model.kind, model.layout),
                   fusion=fusion, notes=tuple(notes))


__all__ = [
    "COMPONENT_PATTERNS",
    "ENCODER_OVERRIDE_PREFIX",
    "FusionReport",
    "InspectReport",
    "KeyRow",
    "TensorCount",
    "UnresolvedConfig",
    "UnsupportedArchitecture",
    "collapse_keys",
    "config_to_dict",
    "format_index_set",
    "inspect_checkpoint",
]

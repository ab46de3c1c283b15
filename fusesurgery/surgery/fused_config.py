"""``fusion_config.json``: everything needed to rebuild, validate and undo a fused checkpoint.

The file sits beside the fused safetensors. It holds the three frozen configs (decoder,
encoder, fusion), the projection head, the new tokens and their ids, the dtypes, the seed, and
a record of each source (format, layout, files with sizes and header digests, the files kept
for ``unfuse``, the keys dropped on the way in). ``fusesurgery.io`` reads its ``decoder``
section as the config of a fused checkpoint, so ``inspect`` and ``diff`` understand it too.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fusesurgery.config import DecoderConfig, FusionConfig, VisionEncoderConfig
from fusesurgery.convert.configs import coerce_rope_scaling
from fusesurgery.convert.keymaps import (
    FUSED_VISION_PREFIX,
    TO_NATIVE,
    to_native_key,
    to_native_parts,
)
from fusesurgery.errors import ConfigError, FuseSurgeryError
from fusesurgery.families import DECODER_FAMILIES
from fusesurgery.io.checkpoint import FUSION_CONFIG_FILE
from fusesurgery.io.tensor_info import SAFETENSORS_DTYPE_FACTS

FORMAT_NAME = "fusesurgery-fused"
SCHEMA_VERSION = 1
PROJECTIONS: tuple[str, ...] = ("linear", "mlp")
EMBEDDING_INITS: tuple[str, ...] = ("mean", "zeros", "normal")
# Where fuse keeps each source's own small files (config, tokenizer, processor), unchanged,
# so that unfuse gives them back byte for byte.
SOURCE_FILES_DIR = "source"
PARTS: tuple[str, ...] = ("decoder", "encoder")
# The dtype names the "dtypes" section holds: torch's, without the module (as fuse writes them).
DTYPE_NAMES: tuple[str, ...] = tuple(facts[0] for facts in SAFETENSORS_DTYPE_FACTS.values())

IDENTITY_NOTE = (
    "every gate is exactly zero: the fused model computes exactly what the original decoder "
    "computed"
)
TRAINED_NOTE = "trained: identity no longer holds (gates are nonzero)"
ORIGINALS_TRAINED_NOTE = ("trained: identity no longer holds ({count} original tensors differ "
                          "from the sources')")


@dataclass(frozen=True)
class NewToken:
    """A token added by the fusion: its text and its FusionEmbedding id (``vocab_size + i``)."""

    token: str
    id: int


@dataclass(frozen=True)
class FusedConfig:
    """The parsed ``fusion_config.json``.

    Args:
        decoder: the decoder's config (its ``vocab_size`` is the original table's rows).
        encoder: the vision tower's config; ``output_layer`` is the hidden layer that feeds
            the fusion. None for an encoder with no native module (Mllama's tiled vision
            model and projector), whose tensors travel as opaque ``encoder.*`` tensors.
        fusion: fusion layers, encoder width after the projection, new-token count.
        projection: ``"linear"`` or ``"mlp"``.
        new_tokens: the added tokens, ids ``vocab_size + i``.
        embedding_init: how the new embedding rows started (``mean``, ``zeros``, ``normal``).
        dtypes: ``{"decoder", "encoder", "fusion"}`` -> dtype name of those tensors.
        seed: the seed the new parameters were drawn with.
        sources: ``{"decoder", "encoder"}`` -> the source record written by ``fuse``.
        trained: the model changed since ``fuse`` (``save_fused`` of a trained model: a
            nonzero gate, or ``trained_originals``); the identity no longer holds.
        gates: gate name -> value, as last saved.
        trained_originals: the fused keys of original (decoder or encoder) tensors whose saved
            values differ from their sources' (trained with ``decoder_trainable`` or
            ``encoder_trainable``), sorted.
        version: the fusesurgery version that wrote the file.
    """

    decoder: DecoderConfig
    encoder: VisionEncoderConfig | None
    fusion: FusionConfig
    projection: str | None = "mlp"
    new_tokens: tuple[NewToken, ...] = ()
    embedding_init: str = "mean"
    dtypes: Mapping[str, str] = field(default_factory=dict)
    seed: int = 0
    sources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    trained: bool = False
    gates: Mapping[str, float] = field(default_factory=dict)
    trained_originals: tuple[str, ...] = ()
    version: str = ""

    @property
    def tied_embeddings(self) -> bool:
        return self.decoder.tie_word_embeddings

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (write it with ``fusesurgery._json.dumps``)."""
        tied = self.decoder.tie_word_embeddings
        return {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "fusesurgery_version": self.version,
            "decoder": dataclasses.asdict(self.decoder),
            "encoder": None if self.encoder is None else dataclasses.asdict(self.encoder),
            "fusion": {**dataclasses.asdict(self.fusion),
                       "fusion_layers": list(self.fusion.fusion_layers)},
            "projection": self.projection,
            "encoder_layer": None if self.encoder is None else self.encoder.output_layer,
            "encoder_tokens": None if self.encoder is None else self.encoder.feature_tokens,
            "new_tokens": [{"token": t.token, "id": t.id} for t in self.new_tokens],
            "embedding_init": self.embedding_init,
            "tied_embeddings": tied,
            "output_projection": (
                "tied to the original embedding table; new tokens are input-only"
                if tied else "the original output projection; new tokens are input-only"
            ),
            "dtypes": dict(self.dtypes),
            "seed": self.seed,
            "trained": self.trained,
            "identity": self.identity_note,
            "gates": dict(self.gates),
            "trained_originals": list(self.trained_originals),
            "sources": {part: dict(record) for part, record in self.sources.items()},
        }

    @property
    def identity_note(self) -> str:
        """Whether the fused model still computes what the original decoder computed."""
        if self.trained_originals:
            return ORIGINALS_TRAINED_NOTE.format(count=len(self.trained_originals))
        return TRAINED_NOTE if self.trained else IDENTITY_NOTE

    def replace(self, **changes: Any) -> FusedConfig:
        return dataclasses.replace(self, **changes)


def _section(doc: Mapping[str, Any], name: str, origin: str) -> Mapping[str, Any]:
    value = doc.get(name)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{origin}: the {name!r} section is missing or not an object")
    return value


def _build(cls: type, values: Mapping[str, Any], origin: str, section: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{origin}: unknown {section} fields {unknown}")
    values = dict(values)
    if "rope_scaling" in values:
        values["rope_scaling"] = coerce_rope_scaling(values["rope_scaling"])
    if "fusion_layers" in values and isinstance(values["fusion_layers"], list):
        values["fusion_layers"] = tuple(values["fusion_layers"])
    try:
        return cls(**values)
    except FuseSurgeryError as error:
        raise ConfigError(f"{origin}: {section}: {error}") from None
    except TypeError as error:  # a required field is missing
        raise ConfigError(f"{origin}: {section}: {error}") from None


def _tokens(value: Any, origin: str) -> tuple[NewToken, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{origin}: new_tokens must be a list")
    tokens = []
    for item in value:
        if (not isinstance(item, Mapping) or not isinstance(item.get("token"), str)
                or type(item.get("id")) is not int):
            raise ConfigError(f"{origin}: each new token must be {{\"token\": str, \"id\": int}}")
        tokens.append(NewToken(item["token"], item["id"]))
    return tuple(tokens)


def _object(value: Any, origin: str, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{origin}: {name} must be an object, not {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    """How JSON spells the type of a parsed value (``null``, ``a string``, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    kinds = {str: "a string", int: "a number", float: "a number", list: "a list",
             dict: "an object"}
    return next((kind for cls, kind in kinds.items() if isinstance(value, cls)),
                type(value).__name__)


def _gates(value: Any, origin: str) -> dict[str, float]:
    """``gates``: gate name -> a finite number."""
    gates = {}
    for name, gate in _object(value, origin, "gates").items():
        if isinstance(gate, bool) or not isinstance(gate, int | float) or not math.isfinite(
                gate):
            shown = repr(gate) if isinstance(gate, float) else _json_type(gate)
            raise ConfigError(f"{origin}: gates[{name!r}] must be a finite number, not {shown}")
        gates[str(name)] = float(gate)
    return gates


def _key_list(value: Any, origin: str, name: str) -> tuple[str, ...]:
    """A list of distinct tensor names."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{origin}: {name} must be a list of tensor names, not "
                          f"{_json_type(value)}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{origin}: {name} names a tensor twice")
    return tuple(sorted(value))


def _sources(value: Any, origin: str) -> dict[str, Mapping[str, Any]]:
    """``sources``: part -> the source record (an object)."""
    return {str(part): _object(record, origin, f"sources[{part!r}]")
            for part, record in _object(value, origin, "sources").items()}


def _dtypes(value: Any, origin: str) -> dict[str, str]:
    """``dtypes``: part -> a dtype name of :data:`DTYPE_NAMES`."""
    dtypes = {}
    for part, name in _object(value, origin, "dtypes").items():
        if name not in DTYPE_NAMES:
            shown = repr(name) if isinstance(name, str) else _json_type(name)
            raise ConfigError(f"{origin}: dtypes[{part!r}] is {shown}, not a dtype name "
                              f"({', '.join(DTYPE_NAMES)})")
        dtypes[str(part)] = name
    return dtypes


def _typed(doc: Mapping[str, Any], name: str, kind: type, default: Any, origin: str) -> Any:
    """``doc[name]`` (``default`` when absent), checked to be a ``kind`` (bool is no int)."""
    value = doc.get(name, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        wanted = {int: "an integer", bool: "true or false", str: "a string"}[kind]
        raise ConfigError(f"{origin}: {name} must be {wanted}, not {_json_type(value)}")
    return value


def fused_config_from_dict(doc: Mapping[str, Any], origin: str = FUSION_CONFIG_FILE) -> FusedConfig:
    """Parse a ``fusion_config.json`` document, checking every field's type.

    Raises:
        ConfigError: not a fusesurgery fusion config, a newer schema, or a malformed section
            or field (the message names the file and the field).
    """
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{origin} is not a fusesurgery fusion config (a JSON "
                          f"{_json_type(doc).removeprefix('a ').removeprefix('an ')}, "
                          "not an object)")
    if doc.get("format") != FORMAT_NAME:
        raise ConfigError(f"{origin} is not a fusesurgery fusion config (format "
                          f"{doc.get('format')!r}, expected {FORMAT_NAME!r})")
    version = doc.get("schema_version")
    if type(version) is not int or version > SCHEMA_VERSION:
        raise ConfigError(f"{origin}: schema_version {version!r} is newer than this "
                          f"fusesurgery understands ({SCHEMA_VERSION}); upgrade fusesurgery")
    decoder = _build(DecoderConfig, _section(doc, "decoder", origin), origin, "decoder")
    encoder = None if doc.get("encoder", {}) is None else _build(
        VisionEncoderConfig, _section(doc, "encoder", origin), origin, "encoder")
    fusion = _build(FusionConfig, _section(doc, "fusion", origin), origin, "fusion")
    projection = doc.get("projection")
    if projection not in PROJECTIONS and not (encoder is None and projection is None):
        raise ConfigError(f"{origin}: projection {projection!r} is not one of {PROJECTIONS}")
    tokens = _tokens(doc.get("new_tokens", []), origin)
    if len(tokens) != fusion.fusion_vocab_size:
        raise ConfigError(f"{origin}: {len(tokens)} new tokens for a fusion vocabulary of "
                          f"{fusion.fusion_vocab_size}")
    for i, token in enumerate(tokens):
        if token.id != decoder.vocab_size + i:
            raise ConfigError(f"{origin}: new token {token.token!r} has id {token.id}, not "
                              f"vocab_size + {i} = {decoder.vocab_size + i}")
    if fusion.encoder_dim != decoder.embed_dim:
        raise ConfigError(f"{origin}: fusion.encoder_dim {fusion.encoder_dim} differs from the "
                          f"decoder width {decoder.embed_dim}")
    embedding_init = doc.get("embedding_init", "mean")
    if embedding_init not in EMBEDDING_INITS:
        raise ConfigError(f"{origin}: embedding_init {embedding_init!r} is not one of "
                          f"{EMBEDDING_INITS}")
    return FusedConfig(
        decoder=decoder,
        encoder=encoder,
        fusion=fusion,
        projection=projection,
        new_tokens=tokens,
        embedding_init=embedding_init,
        dtypes=_dtypes(doc.get("dtypes", {}), origin),
        seed=_typed(doc, "seed", int, 0, origin),
        sources=_sources(doc.get("sources", {}), origin),
        trained=_typed(doc, "trained", bool, False, origin),
        gates=_gates(doc.get("gates", {}), origin),
        trained_originals=_key_list(doc.get("trained_originals", []), origin,
                                    "trained_originals"),
        version=_typed(doc, "fusesurgery_version", str, "", origin),
    )


# What the checkpoint's keys say about the sizes a config states: the layer indices under
# each prefix, and (for the fusion layers) the indices carrying a fusion layer.
_DECODER_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
_FUSION_LAYER = re.compile(r"decoder\.layers\.(\d+)\.fusion_layer\.")
_ENCODER_LAYER = re.compile(re.escape(FUSED_VISION_PREFIX) + r"layers\.(\d+)\.")
GATE_SUFFIXES = (".ca_scale.scale", ".mlp_scale.scale")


def _indices(pattern: re.Pattern[str], keys: Iterable[str]) -> set[int]:
    return {int(match.group(1)) for key in keys if (match := pattern.match(key))}


def _is_range(indices: set[int], count: int) -> bool:
    """``indices == set(range(count))`` without building a range of a stated size."""
    return len(indices) == count and (not indices or (min(indices) == 0
                                                       and max(indices) == count - 1))


def _shown(indices: Iterable[int], limit: int = 8) -> str:
    ordered = sorted(indices)
    more = f" (+{len(ordered) - limit} more)" if len(ordered) > limit else ""
    return "[" + ", ".join(map(str, ordered[:limit])) + f"]{more}"


def check_config_against_keys(config: FusedConfig, keys: Iterable[str], origin: str) -> None:
    """What ``fusion_config.json`` states against what the weights hold, before anything of
    the stated sizes is built or iterated: the decoder's and the encoder's layer counts, the
    layers carrying a fusion layer, and each source key recorded for ``unfuse`` (it must be
    the name the part's key map gives that tensor, so a swapped pair cannot rename one
    tensor as another).

    Args:
        config: the parsed config.
        keys: the fused checkpoint's tensor names (native fused layout).
        origin: the config file, for messages.

    Raises:
        ConfigError: a count, a fusion layer or a source key the weights contradict.
    """
    keys = list(keys)
    # worded as detection words it (inspect and convert refuse the same file there)
    counts = [("num_layers", config.decoder.num_layers, _indices(_DECODER_LAYER, keys))]
    if config.encoder is not None:
        counts.append(("encoder num_layers", config.encoder.num_layers,
                       _indices(_ENCODER_LAYER, keys)))
    for name, stated, held in counts:
        if not _is_range(held, stated):
            found = str(len(held)) if _is_range(held, len(held)) else f"layers {_shown(held)}"
            raise ConfigError(f"{origin} gives {name} {stated}, but the checkpoint holds "
                              f"{found}; the config does not belong to these weights")
    fusion_held = _indices(_FUSION_LAYER, keys)
    if fusion_held != set(config.fusion.fusion_layers):
        raise ConfigError(f"{origin} gives fusion layers {_shown(config.fusion.fusion_layers)}, "
                          f"but the checkpoint holds fusion layers {_shown(fusion_held)}; the "
                          "config does not belong to these weights")
    for part, record in config.sources.items():
        if "source_keys" in record:
            _check_source_keys(part, record, keys, origin, config.decoder.family)


def _check_source_keys(part: str, record: Mapping[str, Any], keys: list[str],
                       origin: str, decoder_family: str | None = None) -> None:
    """``sources[part].source_keys`` (native key -> the source's name) against the part's key
    map (the decoder family's own, for a family with transformers names of its own) and the
    part's tensors in the weights."""
    names = record["source_keys"]
    where = f"{origin}: sources[{part!r}].source_keys"
    if not isinstance(names, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        raise ConfigError(f"{where} must map native keys to source keys (strings)")
    layout, kind = record.get("layout"), "decoder" if part == "decoder" else "vision"
    if (kind, layout) not in TO_NATIVE:
        raise ConfigError(f"{origin}: sources[{part!r}].layout is {layout!r}, not a {kind} "
                          f"layout ({', '.join(sorted(lay for k, lay in TO_NATIVE if k == kind))})")
    prefix = "decoder." if part == "decoder" else FUSED_VISION_PREFIX
    held = {key.removeprefix(prefix) for key in keys if key.startswith(prefix)}
    if part == "decoder":
        held = {key for key in held if ".fusion_layer." not in key
                and not key.startswith("tok_embeddings.fusion_embedding.")}
    if set(names) != held:
        odd = sorted(set(names) ^ held)
        raise ConfigError(f"{where} names {len(names)} tensors, the weights hold {len(held)} "
                          f"{part} tensors (first difference: {odd[0]!r}); the config does not "
                          "belong to these weights")
    # a checkpoint an earlier fusesurgery wrote records its own spelling of a native key, and
    # a native source an earlier fusesurgery wrote has its own spelling as the source key
    legacy = (DECODER_FAMILIES[decoder_family].native_legacy_keys
              if kind == "decoder" and decoder_family in DECODER_FAMILIES else {})
    for native, source_key in names.items():
        parts = to_native_parts(source_key, layout, kind)
        try:
            mapped = to_native_key(source_key, layout, kind,
                                   decoder_family if kind == "decoder" else None
                                   ) if parts is None else (
                native if native in parts else f"one of {', '.join(parts)}")
        except FuseSurgeryError:
            mapped = None
        if mapped != native and (mapped is None or (legacy.get(native) != mapped
                                                    and legacy.get(mapped) != native)):
            raise ConfigError(
                f"{where}: {source_key!r} is recorded as the source of {native!r}, but the "
                f"{layout} key map gives {mapped!r} for it; the record is damaged (unfuse "
                "would write one tensor under another's name)")


def check_gates_against_weights(config: FusedConfig, gates: Mapping[str, float],
                                origin: str) -> None:
    """The ``trained`` flag and the recorded gate values against the gate scalars the
    weights hold (each gate read from its tensor, in the tensor's dtype widened to float).

    Args:
        config: the parsed config.
        gates: gate key -> the value the weights hold.
        origin: the config file, for messages.

    Raises:
        ConfigError: ``trained`` says no gate moved while one did (or the reverse), or a
            recorded gate differs from the weights (or names another set of gates).
    """
    moved = {key: value for key, value in gates.items() if value != 0.0}
    if not config.trained and moved:
        key, value = next(iter(sorted(moved.items())))
        raise ConfigError(f"{origin} says the fusion is untrained (every gate exactly zero), "
                          f"but {key} is {value!r} in the weights; the config does not belong "
                          "to these weights")
    if config.trained and gates and not moved and not config.trained_originals:
        # ``trained`` with every gate at zero is only consistent when original tensors
        # changed (``trained_originals``): that is what else sets the flag.
        raise ConfigError(f"{origin} says the fusion is trained, but all {len(gates)} gates "
                          "are exactly zero in the weights and no original tensor is recorded "
                          "as trained; the config does not belong to these weights")
    if not config.gates:
        return  # an older record with no gate values: the flag alone is checked
    if set(config.gates) != set(gates):
        odd = sorted(set(config.gates) ^ set(gates))
        raise ConfigError(f"{origin}: gates names {len(config.gates)} gates, the weights hold "
                          f"{len(gates)} (first difference: {odd[0]!r})")
    for key, value in sorted(gates.items()):
        recorded = config.gates[key]
        if recorded != value:
            raise ConfigError(f"{origin}: gates[{key!r}] is {recorded!r}, but the weights hold "
                              f"{value!r}; the config does not belong to these weights")


__all__ = [
    "EMBEDDING_INITS",
    "FORMAT_NAME",
    "FUSION_CONFIG_FILE",
    "FusedConfig",
    "NewToken",
    "PROJECTIONS",
    "SOURCE_FILES_DIR",
    "check_config_against_keys",
    "check_gates_against_weights",
    "fused_config_from_dict",
]

"""Architecture detection and config resolution from checkpoint metadata.

:func:`detect_model` looks at a checkpoint's keys and shapes, plus its config.json /
params.json if there is one, and answers: what is this (decoder, vision encoder or fused
model), in which key layout, of which family, with which config. Every config field carries
its provenance:

- ``given``: a user override (the CLI maps ``--num-heads`` etc. onto the overrides dict);
- ``read``: stated by the config file;
- ``inferred``: deduced from key names and tensor shapes;
- ``default``: neither stated nor deducible; the value the config file's own loader assumes,
  else fusesurgery's dataclass default.

That is also the order of precedence. What no source can supply (the head count of a
checkpoint without a config) is a :class:`ConfigError` naming the CLI flag that supplies it.
Whatever is resolved is then checked against every tensor's shape.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fusesurgery.config import DecoderConfig, FusionConfig, VisionEncoderConfig
from fusesurgery.convert.configs import (
    DECODER_FIELDS,
    NULL_MEANS_NONE,
    VISION_FAMILY_DEFAULTS,
    VISION_FIELDS,
    VISION_POST_NORM_HIDDEN,
    ConfigReading,
    coerce_rope_scaling,
    read_decoder_config,
    read_vision_config,
)
from fusesurgery.convert.keymaps import (
    FUSED_DECODER_PREFIX,
    FUSED_TORCHTUNE_VISION_PREFIX,
    FUSED_VISION_PREFIX,
    HF_VISION_PREFIX,
    KeyMapping,
    holds_wrapped_tower,
    is_wrapped_decoder,
    keys_to_native,
    split_layer_index,
)
from fusesurgery.convert.mllama import (
    is_mllama_keys,
    mllama_text_config,
    split_embedding_shapes,
)
from fusesurgery.convert.plan import check_native_shapes, legacy_native_renames
from fusesurgery.errors import ConfigError, UnrecognizedFormatError, UnsupportedFamilyError
from fusesurgery.families import (
    ADDING_A_FAMILY,
    DECODER_FAMILIES,
    FAMILIES,
    VISION_FAMILIES,
    Family,
    by_model_type,
    closest_family,
    dinov2,
)
from fusesurgery.io.tensor_info import TensorInfo

Provenance = Literal["given", "read", "inferred", "default"]
PROVENANCE_RANK: dict[str, int] = {"given": 3, "read": 2, "inferred": 1, "default": 0}

# The CLI option that supplies each field. Encoder options carry an ``--encoder-`` prefix so a
# command that takes a decoder and an encoder can have both.
DECODER_FLAGS: dict[str, str] = {name: "--" + name.replace("_", "-") for name in DECODER_FIELDS}
VISION_FLAGS: dict[str, str] = {
    name: "--encoder-" + name.replace("_", "-") for name in VISION_FIELDS
}

Shape = tuple[int, ...]


@dataclass(frozen=True)
class DetectedModel:
    """What a checkpoint holds, and the config that describes it.

    Args:
        kind: ``"decoder"``, ``"vision"`` or ``"fused"``.
        layout: key layout, ``"native"``, ``"hf"`` or ``"meta"`` (fused: ``"native"``).
        family: ``llama``/``mistral``/``qwen2``/``qwen3`` or ``clip``/``siglip``.
        config: the resolved config; for a fused model, its decoder's.
        provenance: config field -> ``"given"``, ``"read"``, ``"inferred"`` or ``"default"``;
            every field of ``config`` has an entry.
        config_source: the config file the ``read`` values came from, if any.
        fusion: a fused model's fusion layers, fusion vocabulary and encoder width.
        fused_style: ``"fusesurgery"`` (``encoder.vision.*``) or ``"torchtune"``
            (``encoder.clip.*``) for a fused model whose encoder keys say which.
        notes: settings read but deliberately not modelled, and other remarks for the user.
        differences: the notes on settings that make the native model compute something
            other than the source's own loader (a sliding window shorter than the model's
            positions); what ``convert`` and ``fuse`` report.
        unmodelled: settings the config file states that change the computation but have
            no field of ``config`` (``sliding_window``) -> their values.
    """

    kind: str
    layout: str
    family: str
    config: DecoderConfig | VisionEncoderConfig
    provenance: Mapping[str, str]
    config_source: str | None = None
    fusion: FusionConfig | None = None
    fused_style: str | None = None
    notes: tuple[str, ...] = ()
    differences: tuple[str, ...] = ()
    unmodelled: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))

    def fields_from(self, provenance: str) -> tuple[str, ...]:
        """Names of the config fields whose value came from ``provenance``."""
        return tuple(name for name, source in self.provenance.items() if source == provenance)

    def summary(self) -> str:
        """A few lines for people: what it is, then each field with its value and source."""
        head = f"{self.kind} ({self.family}, {self.layout} layout)"
        if self.config_source:
            head += f", config from {self.config_source}"
        lines = [head]
        for name, source in self.provenance.items():
            lines.append(f"  {name} = {getattr(self.config, name)!r} ({source})")
        if self.fusion is not None:
            lines.append(
                f"  fusion layers {list(self.fusion.fusion_layers)}, "
                f"fusion vocab {self.fusion.fusion_vocab_size}, "
                f"encoder dim {self.fusion.encoder_dim}"
            )
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass(frozen=True)
class PartialConfig:
    """What detection resolved before a field nothing supplies stopped it (the head count of
    a checkpoint without a config): carried by that :class:`ConfigError` as ``error.partial``,
    so that a metadata viewer (``inspect``) can still show what the weights tell.

    Args:
        values: config field -> value, for every field resolved.
        provenance: config field -> ``given`` / ``read`` / ``inferred`` / ``default``.
        missing: the fields nothing supplies, each with the option that supplies it
            (``{"num_heads": "--num-heads"}``), and the fields derived from them
            (``head_dim``, ``num_kv_heads``) that stay unknown with them.
        notes: the detection's notes so far (a family taken by default, ...).
    """

    values: Mapping[str, Any]
    provenance: Mapping[str, str]
    missing: Mapping[str, str]
    notes: tuple[str, ...] = ()


# Fields the shapes give only once the head count is known (q rows = heads x head_dim, k rows =
# kv heads x head_dim): unknown with it.
_DERIVED_FROM_HEADS: tuple[str, ...] = ("head_dim", "num_kv_heads")


# --------------------------------------------------------------------------------------------
# Layout detection.


def _sample(keys: list[str], limit: int = 5) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def detect_layout(keys: Iterable[str], want: str | None = None) -> tuple[str, str]:
    """Tell ``(kind, layout)`` from key names alone.

    Args:
        keys: the checkpoint's keys.
        want: the kind asked for (``"vision"`` for ``fuse``'s ENCODER): a multimodal
            checkpoint holding a part of that kind a family reads (a
            Gemma3ForConditionalGeneration's SigLIP tower) is read as that part; None: the
            kind the keys tell first (such a checkpoint's text half).

    Raises:
        UnrecognizedFormatError: the keys match no known model layout.
    """
    keys = list(keys)
    # (its text half told too: a LLaVA's vision_tower.* beside another text model keeps the
    # multimodal error below)
    if want == "vision" and holds_wrapped_tower(keys) and is_wrapped_decoder(keys):
        return "vision", "hf"
    key_set = set(keys)

    def any_starts(*prefixes: str) -> bool:
        return any(key.startswith(prefixes) for key in keys)

    def any_contains(fragment: str) -> bool:
        return any(fragment in key for key in keys)

    if any_starts(FUSED_DECODER_PREFIX):
        return "fused", "native"
    if is_mllama_keys(keys):
        return "fused", "mllama"
    if "model.embed_tokens.weight" in key_set or any_starts("model.layers."):
        return "decoder", "hf"
    # a bare transformers decoder (LlamaModel): HF names without the "model." prefix
    if "embed_tokens.weight" in key_set or (
        any_starts("layers.") and any_contains(".self_attn.q_proj.")
    ):
        return "decoder", "hf"
    if any_contains(".attention.wq.") or any_contains(".feed_forward.w1."):
        return "decoder", "meta"
    if "tok_embeddings.weight" in key_set or (
        any_contains(".attn.q_proj.") and any_contains(".sa_norm.scale")
    ):
        return "decoder", "native"
    if any_starts(HF_VISION_PREFIX, "embeddings.patch_embedding.", *(
            marker for family in VISION_FAMILIES.values()
            for marker in family.hf_layout_markers)):
        return "vision", "hf"
    if "conv.weight" in key_set:
        return "vision", "native"
    if any_starts("cross_attention_layers.") and any_starts("language_model."):
        raise UnrecognizedFormatError(
            "this is a fused model in the transformers layout (`fusesurgery convert --to "
            "transformers` or `fuse --format transformers` wrote it): load it with "
            "transformers' AutoModelForImageTextToText; `fusesurgery convert DIR --to native "
            "-o OUT` gives back the fused checkpoint of one that `convert` wrote"
        )
    if is_wrapped_decoder(keys):  # a Gemma3ForConditionalGeneration: its text half
        return "decoder", "hf"
    if holds_wrapped_tower(keys) and not any_starts("language_model.",
                                                    "model.language_model."):
        raise UnrecognizedFormatError(
            "this is a multimodal checkpoint's vision tower (vision_tower.* keys) without the "
            "text model beside it (language_model.*): a Gemma3ForConditionalGeneration is read "
            "whole, its text half missing here; give the whole checkpoint, or save the tower "
            "alone (SiglipVisionModel)"
        )
    if any_starts("language_model.", "model.language_model.", "model.vision_model."):
        raise UnrecognizedFormatError(
            "this looks like a multimodal model (LLaVA-style language_model.* keys); "
            "fusesurgery reads plain decoders, CLIP/SigLIP encoders, Mllama and fused "
            "checkpoints"
        )
    raise UnrecognizedFormatError(
        f"keys match no known decoder, vision encoder or fused layout: {_sample(sorted(keys))}"
    )


# --------------------------------------------------------------------------------------------
# Field resolution.


class _Fields:
    """Candidate values per config field; the best-ranked provenance wins."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.sources: dict[str, str] = {}

    def offer(self, name: str, value: Any, source: str) -> None:
        if value is None and name not in NULL_MEANS_NONE:
            return
        current = self.sources.get(name)
        if current is not None and PROVENANCE_RANK[current] >= PROVENANCE_RANK[source]:
            return
        self.values[name] = value
        self.sources[name] = source

    def offer_reading(self, reading: ConfigReading) -> None:
        for name, value in reading.read.items():
            self.offer(name, value, "read")
        for name, value in reading.defaults.items():
            self.offer(name, value, "default")

    def require(self, name: str, value: Any, origin: str, flags: Mapping[str, str]) -> None:
        """Offer a value the tensors fix (a count of layers); a stated value that differs is
        an error at once, before anything of the stated size is built or iterated.

        Raises:
            ConfigError: naming the file or option that states the other value.
        """
        source = self.sources.get(name)
        if source in ("read", "given") and self.values[name] != value:
            where = origin if source == "read" else flags[name]
            raise ConfigError(
                f"{where} gives {name} {self.values[name]!r}, but the checkpoint holds "
                f"{value}; the config does not belong to these weights"
            )
        self.offer(name, value, "inferred")

    def get(self, name: str) -> Any:
        return self.values.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.values


def _offer_overrides(
    fields: _Fields, overrides: Mapping[str, Any] | None, valid: tuple[str, ...], what: str
) -> None:
    for name, value in (overrides or {}).items():
        if name not in valid:
            raise ConfigError(
                f"unknown {what} setting {name!r}; valid: {', '.join(sorted(valid))}"
            )
        if value is None:  # an option the user did not set
            continue
        if name == "rope_scaling":
            value = coerce_rope_scaling(value)
        fields.offer(name, value, "given")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _build(
    cls: type, fields: _Fields, flags: Mapping[str, str], what: str, origin: str
) -> tuple[Any, dict[str, str]]:
    """The config dataclass from the resolved fields; a value it rejects is reported with
    where it came from (the config file, or the option that gave it).

    Raises:
        ConfigError: a field nothing supplies, or a value of the wrong type or range.
    """
    provenance: dict[str, str] = {}
    kwargs: dict[str, Any] = {}
    for spec in dataclasses.fields(cls):
        if spec.name in fields:
            kwargs[spec.name] = fields.get(spec.name)
            provenance[spec.name] = fields.sources[spec.name]
        elif spec.default is not dataclasses.MISSING:
            provenance[spec.name] = "default"
        else:
            error = ConfigError(
                f"cannot tell {spec.name} of the {what} from its keys and shapes, and no "
                "config file states it",
                flag=flags[spec.name],
            )
            missing = {name: flags[spec.name] for name in (spec.name, *_DERIVED_FROM_HEADS)
                       if name == spec.name or (spec.name == "num_heads" and name in flags
                                                and name not in fields)}
            error.partial = PartialConfig(
                values=types.MappingProxyType(dict(fields.values)),
                provenance=types.MappingProxyType(dict(fields.sources)),
                missing=types.MappingProxyType(missing))
            raise error
    try:
        config = cls(**kwargs)
    except ConfigError as error:
        name = getattr(error, "field", None)
        source = provenance.get(name)
        if source == "read":
            raise ConfigError(f"{origin}: {error}") from None
        if source == "given":
            raise ConfigError(f"{flags[name]}: {error}") from None
        raise
    return config, provenance


def _layer_count(native_shapes: Mapping[str, Shape], template: str, prefix: str = "") -> int:
    indices = set()
    for key in native_shapes:
        if not key.startswith(prefix):
            continue
        key_template, index = split_layer_index(key.removeprefix(prefix))
        if key_template == template and index is not None:
            indices.add(int(index))
    if indices and indices != set(range(max(indices) + 1)):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise ConfigError(f"checkpoint has layers up to {max(indices)} but lacks layers {missing}")
    return len(indices)


def _marker_matches(shape: Shape | None, wanted: bool | int) -> bool:
    if isinstance(wanted, bool):
        return (shape is not None) == wanted
    return shape is not None and len(shape) == wanted


def _offer_family(fields: _Fields, families: Mapping[str, Family],
                  shape_of: Callable[[str], Shape | None]) -> None:
    """Offer the family whose shape markers the checkpoint's native keys match (``inferred``),
    else the family declared the fallback (``default``); a family a config names wins."""
    for name, family in families.items():
        if family.shape_markers and all(_marker_matches(shape_of(key), wanted)
                                        for key, wanted in family.shape_markers.items()):
            fields.offer("family", name, "inferred")
            return
    for name, family in families.items():
        if getattr(family, "shape_fallback", False):
            fields.offer("family", name, "default")


def _check_named_family(fields: _Fields, shape_of: Callable[[str], Shape | None],
                        stated: str | None, origin: str) -> None:
    """A decoder family the user names (``family`` in the overrides, ``--family``) is checked
    against the registry, a family the config states, and the weights: the family's shape
    markers must all match, and what its transformers class always builds (q/k norms) must
    be what the tensors hold.

    Raises:
        ConfigError: an unknown family, one the config contradicts, or one the weights are
            not.
    """
    if fields.sources.get("family") != "given":
        return
    name = fields.get("family")
    if name not in DECODER_FAMILIES:
        raise _family_error(f"--family {name!r} is not a decoder family; valid: "
                            f"{', '.join(DECODER_FAMILIES)}")
    if stated is not None and stated != name:
        raise _family_error(f"--family {name} contradicts {origin}, which states {stated}; "
                            "leave --family out, or correct the config")
    family = DECODER_FAMILIES[name]
    for key, wanted in family.shape_markers.items():
        if not _marker_matches(shape_of(key), wanted):
            held = "lack" if wanted is True else "hold"
            raise _family_error(f"--family {name}: these weights are no "
                                f"{family.display_name} decoder: they {held} {key}")
    for field_name, value in family.fixed.items():
        if fields.sources.get(field_name) == "inferred" and fields.get(field_name) != value:
            raise _family_error(f"--family {name}: these weights are no "
                                f"{family.display_name} decoder: their shapes give "
                                f"{field_name} {fields.get(field_name)!r}, a "
                                f"{family.display_name} has {value!r}")


def _family_error(message: str) -> ConfigError:
    """A refused ``--family``, marked as such (``error.field == "family"``), so that a caller
    that needs nothing else of the config (a key-level ``diff``) still refuses it."""
    error = ConfigError(message)
    error.field = "family"
    return error


def _taken_as_fallback_note(layout: str) -> str:
    """What a config-less native decoder taken as the fallback family may be instead: the
    families whose native keys and shapes are the same (none of them told by markers), and
    how to name one."""
    fallback = next(f for f in DECODER_FAMILIES.values() if f.shape_fallback)
    alike = [f for f in DECODER_FAMILIES.values()
             if not f.shape_markers and not f.shape_fallback]
    other_rows = [f for f in alike if f.native_rope_style != fallback.native_rope_style]

    def listed(families: list[Family]) -> str:
        names = [f.display_name for f in families]
        return " and ".join(filter(None, (", ".join(names[:-1]), names[-1])))

    rows = (f" ({listed(other_rows)} keep q/k rows in rotate-half order, so read as "
            f"{fallback.display_name} they compute other logits)" if other_rows else "")
    example = (other_rows or alike)[0].name
    return (f"no config names the family: taken as {fallback.display_name}, whose {layout} "
            f"keys and shapes {listed(alike)} share{rows}; if it is one of those, name it "
            f"(--family {example}; family= in the overrides) or keep its config.json beside "
            "the weights")


# --------------------------------------------------------------------------------------------
# Decoders.


def _stated_by(fields: _Fields, name: str, origin: str) -> str:
    """Where a field's value came from, in the user's words, with the fix to name."""
    source = fields.sources.get(name)
    flag = DECODER_FLAGS[name]
    if source == "given":
        return f"from {flag}; give another {flag}"
    if source == "read":
        return f"stated by {origin}; correct it or override with {flag}"
    return f"{source}; give {flag}"


def _infer_decoder_fields(
    fields: _Fields,
    shapes: Mapping[str, Shape],
    names: Mapping[str, str],
    prefix: str,
    origin: str,
    stated_family: str | None = None,
) -> None:
    def shape(key: str) -> Shape | None:
        return shapes.get(prefix + key)

    def name(key: str) -> str:
        return names.get(prefix + key, prefix + key)

    embedding = shape("tok_embeddings.weight")
    if embedding is None:
        raise ConfigError(f"checkpoint has no token embedding ({name('tok_embeddings.weight')})")
    fields.offer("vocab_size", embedding[0], "inferred")
    fields.offer("embed_dim", embedding[1], "inferred")
    fields.require("num_layers", _layer_count(shapes, "layers.{i}.sa_norm.scale", prefix),
                   origin, DECODER_FLAGS)
    w1 = shape("layers.0.mlp.w1.weight")
    if w1 is not None:
        fields.offer("intermediate_dim", w1[0], "inferred")
    fields.offer("attn_bias", shape("layers.0.attn.q_proj.bias") is not None, "inferred")
    fields.offer("qk_norm", shape("layers.0.attn.q_norm.scale") is not None, "inferred")
    fields.offer("tie_word_embeddings", shape("output.weight") is None, "inferred")
    _offer_family(fields, DECODER_FAMILIES, shape)
    _check_named_family(fields, shape, stated_family, origin)

    q = shape("layers.0.attn.q_proj.weight")
    k = shape("layers.0.attn.k_proj.weight")
    num_heads = fields.get("num_heads")
    if q is None or k is None or not _positive_int(num_heads):
        return  # a bad stated value is reported, with its file, when the config is built
    if q[0] % num_heads:
        raise ConfigError(
            f"{name('layers.0.attn.q_proj.weight')} has {q[0]} rows, not a multiple of "
            f"num_heads {num_heads} ({_stated_by(fields, 'num_heads', origin)})")
    fields.offer("head_dim", q[0] // num_heads, "inferred")
    head_dim = fields.get("head_dim")
    if not _positive_int(head_dim):
        return
    if k[0] % head_dim:
        raise ConfigError(
            f"{name('layers.0.attn.k_proj.weight')} has {k[0]} rows, not a multiple of "
            f"head_dim {head_dim} ({_stated_by(fields, 'head_dim', origin)})")
    fields.offer("num_kv_heads", k[0] // head_dim, "inferred")


def _int_field(fields: _Fields, name: str) -> int | None:
    value = fields.get(name)
    return value if _positive_int(value) else None


def _head_dim(fields: _Fields) -> int | None:
    heads, width = _int_field(fields, "num_heads"), _int_field(fields, "embed_dim")
    derived = width // heads if heads and width and not width % heads else None
    return _int_field(fields, "head_dim") or derived


def _kv_rows(fields: _Fields) -> int | None:
    kv, head_dim = _int_field(fields, "num_kv_heads"), _head_dim(fields)
    return kv * head_dim if kv and head_dim else None


# The rows of a native tensor that a foreign one stacks with others (Phi-3's qkv_proj,
# gate_up_proj), from the config fields known before the shapes are read; None: not known,
# the parts without a known count share the rest equally (k and v are equally wide, as are
# w1 and w3).
_PART_ROWS: dict[str, Callable[[_Fields], int | None]] = {
    "layers.{i}.attn.q_proj.weight": lambda f: (
        _int_field(f, "num_heads") * _head_dim(f)
        if _int_field(f, "num_heads") and _head_dim(f) else None),
    "layers.{i}.attn.k_proj.weight": _kv_rows,
    "layers.{i}.attn.v_proj.weight": _kv_rows,
    "layers.{i}.mlp.w1.weight": lambda f: _int_field(f, "intermediate_dim"),
    "layers.{i}.mlp.w3.weight": lambda f: _int_field(f, "intermediate_dim"),
}


def _stacking_family(source: str) -> str | None:
    """The decoder family whose transformers layout stacks ``source`` (Phi-3's
    ``qkv_proj``), or None."""
    template = split_layer_index(source)[0]
    for name, family in DECODER_FAMILIES.items():
        for stacked in family.hf_fused_keys:
            if template == stacked or template.endswith("." + stacked.removeprefix("model.")) \
                    or template == stacked.removeprefix("model."):
                return name
    return None


# the parts whose rows only the head count gives; the others share what they leave
_ROWS_FROM_HEADS: frozenset[str] = frozenset({"layers.{i}.attn.q_proj.weight"})


def _split_stacked(fields: _Fields, mapping: KeyMapping, tensors: Mapping[str, TensorInfo],
                   shapes: dict[str, Shape], names: dict[str, str]) -> None:
    """Give each native part of a stacked source tensor its shape: its rows from what the
    config states (q: heads x head_dim, ...), the parts it does not state sharing the rest.

    Raises:
        ConfigError: the stated widths do not fit the stacked tensor's rows.
    """
    embedding = shapes.get("tok_embeddings.weight")
    if embedding is not None and len(embedding) == 2:
        fields.offer("embed_dim", embedding[1], "inferred")
    for source, parts in mapping.parts.items():
        stacking = _stacking_family(source)
        named = fields.get("family") if fields.sources.get("family") == "given" else None
        if stacking is not None and named in DECODER_FAMILIES and named != stacking:
            raise _family_error(
                f"--family {named}: these weights are no "
                f"{DECODER_FAMILIES[named].display_name} decoder: they hold {source}, which "
                f"only {DECODER_FAMILIES[stacking].display_name}'s layout stacks")
        if stacking is not None:  # only its layout stacks them: what the keys tell
            fields.offer("family", stacking, "inferred")
        shape = tuple(tensors[source].shape)
        known = {part: _PART_ROWS.get(split_layer_index(part)[0], lambda f: None)(fields)
                 for part in parts}
        unknown = [part for part, rows in known.items() if rows is None]
        if any(split_layer_index(part)[0] in _ROWS_FROM_HEADS for part in unknown):
            # q's rows are the head count's, which nothing states (a checkpoint without a
            # config): no share of the rest is q's, so the parts stay unsized and the head
            # count is asked for (inspect shows what the rest of the shapes give)
            continue
        rest = (shape[0] if shape else 0) - sum(rows for rows in known.values() if rows)
        if rest < 0 or (unknown and rest % len(unknown)) or (not unknown and rest):
            stated = ", ".join(f"{part} {rows}" for part, rows in known.items() if rows)
            raise ConfigError(f"{source} has shape {list(shape)}: its rows do not stack "
                              f"{', '.join(parts)} as the config gives them ({stated})")
        for part in parts:
            rows = known[part] or rest // len(unknown)
            shapes[part], names[part] = (rows, *shape[1:]), source


def _fusion_from_keys(
    shapes: Mapping[str, Shape], decoder: DecoderConfig
) -> tuple[FusionConfig, str | None]:
    fusion_layers = set()
    encoder_dim = None
    for key, shape in shapes.items():
        if not key.startswith(FUSED_DECODER_PREFIX):
            continue
        template, index = split_layer_index(key.removeprefix(FUSED_DECODER_PREFIX))
        if index is not None and template.startswith("layers.{i}.fusion_layer."):
            fusion_layers.add(int(index))
            if template == "layers.{i}.fusion_layer.attn.k_proj.weight":
                encoder_dim = shape[1]
    fusion_embedding = shapes.get(FUSED_DECODER_PREFIX + "tok_embeddings.fusion_embedding.weight")
    out_of_range = sorted(i for i in fusion_layers if i >= decoder.num_layers)
    if out_of_range:
        raise ConfigError(
            f"fusion layers {out_of_range} sit beyond the decoder's {decoder.num_layers} layers"
        )
    style = None
    if any(key.startswith(FUSED_VISION_PREFIX) for key in shapes):
        style = "fusesurgery"
    elif any(key.startswith(FUSED_TORCHTUNE_VISION_PREFIX) for key in shapes):
        style = "torchtune"
    fusion = FusionConfig(
        fusion_layers=tuple(sorted(fusion_layers)),
        encoder_dim=encoder_dim if encoder_dim is not None else decoder.embed_dim,
        fusion_vocab_size=0 if fusion_embedding is None else fusion_embedding[0],
    )
    return fusion, style


def _start_detection(
    tensors: Mapping[str, TensorInfo],
    layout: str,
    kind: str,
    reading: ConfigReading | None,
    overrides: Mapping[str, Any] | None,
    field_names: tuple[str, ...],
    what: str,
) -> tuple[KeyMapping, dict[str, Shape], dict[str, str], _Fields, list[str]]:
    """What decoder and vision detection both start from: the keys mapped to native names,
    native name -> shape and -> source name, the fields offered by the overrides and the
    config reading, and the reading's notes.

    Raises:
        KeyMapError: a key the layout does not know.
        ConfigError: an override that is not a field of ``what``.
    """
    mapping = keys_to_native(tensors, layout, kind)
    shapes = {native: tuple(tensors[source].shape) for source, native in mapping.mapping.items()}
    names = {native: source for source, native in mapping.mapping.items()}
    fields = _Fields()
    _offer_overrides(fields, overrides, field_names, what)
    notes: list[str] = []
    if reading is not None:
        fields.offer_reading(reading)
        notes.extend(reading.notes)
    return mapping, shapes, names, fields, notes


def _detect_decoder(
    tensors: Mapping[str, TensorInfo],
    kind: str,
    layout: str,
    reading: ConfigReading | None,
    origin: str,
    overrides: Mapping[str, Any] | None,
) -> DetectedModel:
    prefix = FUSED_DECODER_PREFIX if kind == "fused" else ""
    mapping, shapes, names, fields, notes = _start_detection(
        tensors, layout, kind, reading, overrides, DECODER_FIELDS, "decoder")
    _split_stacked(fields, mapping, tensors, shapes, names)
    if layout == "mllama":
        split_embedding_shapes(shapes, names)
    _infer_decoder_fields(fields, shapes, names, prefix, origin,
                          reading.read.get("family") if reading is not None else None)
    if layout == "native" and fields.sources.get("family") == "default":
        notes.append(_taken_as_fallback_note(layout))
    try:
        config, provenance = _build(DecoderConfig, fields, DECODER_FLAGS, "decoder", origin)
    except ConfigError as error:
        _add_notes(error, notes)
        raise
    if layout == "native":
        for old, new in legacy_native_renames(shapes, config, prefix).items():
            shapes[new] = shapes.pop(old)
            names[new] = names.pop(old, old)

    output_key = prefix + "output.weight"
    if layout == "hf" and not config.tie_word_embeddings and output_key not in shapes:
        raise ConfigError(
            f"{origin}: there is no lm_head.weight and the embeddings are not tied: a bare "
            "transformers decoder (such as LlamaModel) has no LM head; save the *ForCausalLM "
            "model instead, or set tie_word_embeddings in config.json if its head is the "
            "embedding table"
        )
    if config.tie_word_embeddings and output_key in shapes:
        notes.append(
            f"{names[output_key]} is present although the embeddings are tied; it is dropped"
        )
        del shapes[output_key]
    given = [f"{DECODER_FLAGS[n]} {getattr(config, n)}" for n in fields.sources
             if fields.sources[n] == "given" and n in DECODER_FLAGS]
    check_native_shapes(
        shapes, config, source_names=names, prefix=prefix, layout=layout,
        origin=f"{origin} with {', '.join(given)}" if given else origin,
    )

    fusion, style = (None, None)
    if kind == "fused":
        fusion, style = _fusion_from_keys(shapes, config)
    if layout == "mllama":  # one epsilon for every norm, the fusion's included
        fusion = dataclasses.replace(fusion, ca_norm_eps=config.norm_eps,
                                     qk_norm_eps=config.norm_eps)
        style = "mllama"
    return DetectedModel(
        kind=kind,
        layout=layout,
        family=config.family,
        config=config,
        provenance=types.MappingProxyType(provenance),
        config_source=origin if reading is not None else None,
        fusion=fusion,
        fused_style=style,
        notes=tuple(notes),
        differences=tuple(reading.differences) if reading is not None else (),
        unmodelled=types.MappingProxyType(dict(reading.unmodelled) if reading else {}),
    )


def _add_notes(error: ConfigError, notes: list[str]) -> None:
    """Give the detection's notes to the partial config a missing field's error carries."""
    partial = getattr(error, "partial", None)
    if partial is not None:
        error.partial = dataclasses.replace(partial, notes=(*partial.notes, *notes))


# --------------------------------------------------------------------------------------------
# Vision encoders.


def _infer_vision_fields(
    fields: _Fields, shapes: Mapping[str, Shape], names: Mapping[str, str], origin: str
) -> None:
    conv = shapes.get("conv.weight")
    if conv is not None and len(conv) == 2:  # NaFlex: a linear embedding of c*p*p pixels
        _infer_naflex_patch(fields, conv, names.get("conv.weight", "conv.weight"))
    elif conv is None or len(conv) != 4 or conv[2] != conv[3]:
        raise ConfigError(
            f"vision checkpoint has no square patch convolution "
            f"({names.get('conv.weight', 'conv.weight')}: {conv})"
        )
    else:
        fields.offer("embed_dim", conv[0], "inferred")
        fields.offer("num_channels", conv[1], "inferred")
        fields.offer("patch_size", conv[2], "inferred")
    class_token = "cls_token_embedding.weight" in shapes
    fields.offer("class_token", class_token, "inferred")
    fields.offer("patch_bias", "conv.bias" in shapes, "inferred")
    fields.offer("pre_norm", "ln_pre.weight" in shapes, "inferred")
    fields.require("num_layers", _layer_count(shapes, "layers.{i}.sa_norm.weight"), origin,
                   VISION_FLAGS)
    w1 = shapes.get("layers.0.mlp.w1.weight")
    if w1 is not None:
        fields.offer("intermediate_dim", w1[0], "inferred")
    # Each family file says what tells it by shapes (DINOv2: LayerScale and a position table;
    # DINOv3: LayerScale and a 2-D RoPE instead; SigLIP2 NaFlex: a linear patch embedding;
    # CLIP: a class token; SigLIP: none).
    layer_scale = "layers.0.sa_scale.gamma" in shapes
    fields.offer("layer_scale", layer_scale, "inferred")
    _offer_family(fields, VISION_FAMILIES, shapes.get)
    family = fields.get("family")
    registers = shapes.get("register_tokens.weight")
    num_registers = registers[1] if registers is not None and len(registers) == 3 else 0
    fields.offer("num_register_tokens", num_registers, "inferred")
    fields.offer("mask_token", "mask_token.weight" in shapes, "inferred")
    fields.offer("key_bias", "layers.0.attn.k_proj.bias" in shapes, "inferred")
    # DINOv2's registers came with transformers' antialiased resize (dinov2_with_registers)
    fields.offer("position_antialias", num_registers > 0 and family == dinov2.NAME,
                 "inferred")

    # The position table holds one row per patch of a square grid (plus the class token).
    # The side it gives may be a few pixels short of the configured one (384 px in 14 px
    # patches is a 27 x 27 grid, as is 378 px): either builds the same model.
    positions = shapes.get("token_pos_embedding.positional_embedding")
    if positions is not None and len(positions) >= 2:
        num_patches = positions[-2] - int(fields.get("class_token"))
        side = math.isqrt(max(num_patches, 0))
        if side * side == num_patches:
            fields.offer("image_size", side * fields.get("patch_size"), "inferred")


def _infer_naflex_patch(fields: _Fields, conv: Shape, name: str) -> None:
    """A NaFlex patch embedding ``[d_e, c*p*p]``: the width, and the patch side for the
    channels stated (else 3)."""
    fields.offer("embed_dim", conv[0], "inferred")
    fields.offer("num_channels", 3, "default")
    channels = fields.get("num_channels")
    side = math.isqrt(conv[1] // channels) if type(channels) is int and channels > 0 else 0
    if side * side * channels != conv[1]:
        raise ConfigError(f"{name} has shape {list(conv)}: {conv[1]} inputs are no "
                          f"{channels}-channel square patch")
    fields.offer("patch_size", side, "inferred")


def _detect_vision(
    tensors: Mapping[str, TensorInfo],
    layout: str,
    reading: ConfigReading | None,
    origin: str,
    overrides: Mapping[str, Any] | None,
) -> DetectedModel:
    mapping, shapes, names, fields, notes = _start_detection(
        tensors, layout, "vision", reading, overrides, VISION_FIELDS, "vision encoder")
    _infer_vision_fields(fields, shapes, names, origin)
    family = fields.get("family")
    for name, value in VISION_FAMILY_DEFAULTS[family].items():
        fields.offer(name, value, "default")
    fields.offer("post_norm_hidden", VISION_POST_NORM_HIDDEN[family], "inferred")
    try:
        config, provenance = _build(VisionEncoderConfig, fields, VISION_FLAGS,
                                    "vision encoder", origin)
    except ConfigError as error:
        _add_notes(error, notes)
        raise
    check_native_shapes(shapes, config, source_names=names, origin=origin, layout=layout)
    if mapping.dropped:
        notes.append(f"{len(mapping.dropped)} keys not part of the vision tower are dropped")
    return DetectedModel(
        kind="vision",
        layout=layout,
        family=config.family,
        config=config,
        provenance=types.MappingProxyType(provenance),
        config_source=origin if reading is not None else None,
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------------------------


def mllama_decoder_config(config: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """An Mllama config.json's text model as a Llama decoder config: ``num_hidden_layers``
    counts the self-attention layers only.

    Raises:
        ConfigError: ``cross_attention_layers`` is not a list of layer indices.
    """
    text = dict(mllama_text_config(config))
    cross = text.get("cross_attention_layers", [])
    if not isinstance(cross, list) or not all(type(i) is int for i in cross):
        raise ConfigError(f"{origin}: cross_attention_layers must be a list of layer indices")
    text["model_type"] = "llama"
    text.pop("architectures", None)
    if type(text.get("num_hidden_layers")) is int:
        text["num_hidden_layers"] -= len(cross)
    return text


# transformers class-name endings of a decoder with an LM head, and config fields only a
# vision tower states: how an architecture no family file knows is told a decoder or a tower.
_DECODER_ARCHITECTURE_ENDINGS = ("ForCausalLM", "LMHeadModel")
_VISION_CONFIG_FIELDS = ("image_size", "patch_size", "num_channels")


def _guess_kind(config: Mapping[str, Any], keys: Iterable[str]) -> str | None:
    architectures = config.get("architectures")
    names = [a for a in architectures if isinstance(a, str)] if isinstance(
        architectures, list) else []
    if any(name.endswith(_DECODER_ARCHITECTURE_ENDINGS) for name in names):
        return "decoder"
    if any(field in config for field in _VISION_CONFIG_FIELDS):
        return "vision"
    keys = list(keys)
    if any("embed_tokens." in key or key.startswith("lm_head.") for key in keys):
        return "decoder"
    if any("patch_embed" in key for key in keys):
        return "vision"
    return None


def unsupported_family(
    tensors: Mapping[str, TensorInfo], config: Mapping[str, Any] | None, origin: str
) -> UnsupportedFamilyError | None:
    """The error for a checkpoint whose config.json names an architecture no family file
    describes (``olmo2``, ``gemma3_text``, ``dinov2``): what it is, that it needs a native
    family of its own, the closest supported family and how to add one.

    Returns:
        The error to raise, or None: the config names a supported family, names none, or
        describes a multimodal model (a ``text_config`` beside its ``vision_config``), which
        no single family covers.
    """
    if not isinstance(config, Mapping):
        return None
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type in by_model_type(FAMILIES) \
            or "text_config" in config:
        return None
    kind = next((family.kind for family in FAMILIES.values()
                 if model_type in family.relatives), None) or _guess_kind(config, tensors)
    if kind is None:
        return UnsupportedFamilyError(
            f"{origin}: model_type {model_type!r} is neither a supported decoder "
            f"({', '.join(by_model_type(DECODER_FAMILIES))}) nor a supported vision encoder "
            f"({', '.join(by_model_type(VISION_FAMILIES))})", model_type=model_type)
    families = DECODER_FAMILIES if kind == "decoder" else VISION_FAMILIES
    what = "decoder" if kind == "decoder" else "vision encoder"
    closest = closest_family(kind, model_type, tensors)
    advice = closest.advice() if closest is not None else (
        f"no supported family shares its key names; to add one, see {ADDING_A_FAMILY}")
    return UnsupportedFamilyError(
        f"{origin}: model_type {model_type!r} is not a supported {what}; supported: "
        f"{', '.join(by_model_type(families))}. It needs a native {kind} family of its own: "
        f"{advice}", model_type=model_type, kind=kind,
        closest=closest.family.name if closest is not None else None)


def detect_model(
    tensors: Mapping[str, TensorInfo],
    config: Mapping[str, Any] | None = None,
    config_name: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    want: str | None = None,
) -> DetectedModel:
    """Detect what a checkpoint is and resolve its config, from metadata alone.

    Args:
        tensors: key -> metadata of every tensor in the checkpoint.
        config: the parsed config.json / params.json, if the checkpoint has one.
        config_name: that file's name, for messages (``"config.json"``, ``"params.json"``).
        overrides: config field -> value given by the user; None values are ignored (options
            left unset). Field names are those of ``DecoderConfig`` (decoders, fused models)
            or ``VisionEncoderConfig``.
        want: the kind asked for, for a checkpoint holding several (``detect_layout``).

    Returns:
        The detected model, its config, and where each config field came from.

    Raises:
        UnrecognizedFormatError: the keys match no known layout.
        KeyMapError: keys the detected layout does not know.
        ConfigError: the config and the shapes disagree (naming the key, the expected and the
            actual shape), an override name is unknown, or a value cannot be known (naming the
            flag that supplies it, e.g. ``--num-heads``).
    """
    origin = config_name or "the config"
    try:
        kind, layout = detect_layout(tensors, want)
    except UnrecognizedFormatError as error:
        raise (unsupported_family(tensors, config, origin) or error) from None
    if layout == "mllama" and config is not None:
        config = mllama_decoder_config(config, origin)
    reader = read_vision_config if kind == "vision" else read_decoder_config
    try:
        reading = None if config is None else reader(config, origin)
    except UnsupportedFamilyError as error:
        raise (unsupported_family(tensors, config, origin) or error) from None
    except (TypeError, ValueError, AttributeError, KeyError, ArithmeticError) as error:
        # a value of the wrong type met by a reader's arithmetic or lookups (a string where a
        # number belongs, a list where a name does): the file is at fault, not fusesurgery
        raise ConfigError(f"{origin}: a value has the wrong type or form ({error})") from None
    if kind == "vision":
        return _detect_vision(tensors, layout, reading, origin, overrides)
    return _detect_decoder(tensors, kind, layout, reading, origin, overrides)


__all__ = [
    "DECODER_FLAGS",
    "PROVENANCE_RANK",
    "VISION_FLAGS",
    "DetectedModel",
    "PartialConfig",
    "Provenance",
    "detect_layout",
    "detect_model",
    "unsupported_family",
]

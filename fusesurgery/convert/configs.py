"""Reading config.json / params.json dicts into fusesurgery config fields.

Each reader turns one parsed config file into a :class:`ConfigReading`: the fields the file
states ("read"), the values the file's own loader would assume for what it leaves out
("default", e.g. transformers' ``LlamaConfig`` class defaults), the family, and notes about
settings read but deliberately not modelled. Readers never look at tensors: shapes are
:mod:`fusesurgery.convert.detect`'s business, which also cross-checks the two.

Styles understood:

- ``hf``: transformers config.json of ``llama``, ``mistral``, ``qwen2``, ``qwen3`` decoders and of
  ``clip``/``siglip`` vision towers (bare ``*_vision_model`` or the full two-tower model with a
  ``vision_config``). RoPE settings in both spellings: transformers 4's ``rope_theta`` +
  ``rope_scaling`` (``rope_type`` or the older ``type``) and transformers 5's
  ``rope_parameters``.
- ``meta``: Meta's params.json (also Mistral's, which states ``hidden_dim`` and ``head_dim``).
- ``native``: fusesurgery's own field names (``embed_dim``, ``num_heads``, ...), optionally
  under ``"decoder"`` / ``"encoder"`` sub-dicts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fusesurgery.config import ROPE_TYPE_FIELDS, DecoderConfig, RopeScaling, VisionEncoderConfig
from fusesurgery.errors import ConfigError, UnsupportedFamilyError
from fusesurgery.families import (
    DECODER_FAMILIES,
    VISION_FAMILIES,
    by_model_type,
    decoder_family,
    vision_family,
)
from fusesurgery.families._spec import DecoderFamily, VisionFamily, WrappedCheckpoint

DECODER_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DecoderConfig))
VISION_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(VisionEncoderConfig))


@dataclass
class ConfigReading:
    """What one config file says about a model.

    Args:
        read: field -> value stated by the file.
        defaults: field -> value the file's loader assumes when the file is silent.
        notes: settings read but not modelled, and why that is safe; the differences too.
        differences: settings the native model does not compute as the file's own loader
            does (a sliding window shorter than the model's positions), one line each.
        unmodelled: setting -> value, for what the file states that changes the
            computation but has no field of the native config (``sliding_window``), so a
            report can show it beside the fields.
    """

    read: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    unmodelled: dict[str, Any] = field(default_factory=dict)


def config_style(config: Mapping[str, Any]) -> str:
    """Which kind of file a parsed config is: ``"hf"``, ``"meta"`` or ``"native"``.

    Raises:
        ConfigError: the dict looks like none of them.
    """
    if any(k in config for k in ("model_type", "hidden_size", "vision_config", "architectures")):
        return "hf"
    if "n_layers" in config or "dim" in config:
        return "meta"
    native = set(DECODER_FIELDS) | set(VISION_FIELDS) | {"decoder", "encoder"}
    if native & set(config):
        return "native"
    raise ConfigError(
        f"unrecognised config: keys {sorted(config)[:8]} look like neither a transformers "
        "config.json nor a Meta params.json"
    )


# --------------------------------------------------------------------------------------------
# Decoders.

# The tables below are read off the family files (fusesurgery.families), one row a family.
HF_DECODER_FAMILIES: dict[str, str] = by_model_type(DECODER_FAMILIES)
# ... and the model types of multimodal models whose text half a family reads (``gemma3``):
# a decoder with a native module too
HF_DECODER_FAMILIES.update({model_type: family.name for family in DECODER_FAMILIES.values()
                            for wrapped in family.hf_wrapped
                            for model_type in wrapped.model_types})
# transformers' names of the SiLU activation (ACT2CLS: both are torch's SiLU).
HF_SILU_NAMES: tuple[str, ...] = ("silu", "swish")
HF_DECODER_ARCHITECTURES: dict[str, str] = {
    architecture: family.name for family in DECODER_FAMILIES.values()
    for architecture in family.architectures
}

# transformers' class defaults for what a config.json may leave out and shapes cannot tell.
HF_DECODER_DEFAULTS: dict[str, dict[str, Any]] = {
    name: dict(family.hf_defaults) for name, family in DECODER_FAMILIES.items()}

# Architecture facts no config.json field switches: what the family's transformers class
# always builds. A config.json that names its family states them, so weights without them
# (a Qwen3 checkpoint lacking its q/k norms) are refused rather than read as another model.
HF_DECODER_FIXED: dict[str, dict[str, Any]] = {
    name: dict(family.fixed) for name, family in DECODER_FAMILIES.items()}

# What transformers' config class takes for a head_dim / num_key_value_heads that config.json
# leaves out (None: derived from the head count).
HF_UNSTATED_HEADS: dict[str, dict[str, int | None]] = {
    name: dict(family.unstated_heads) for name, family in DECODER_FAMILIES.items()}

def _rope_scaling(fields: Mapping[str, Any], origin: str) -> RopeScaling:
    try:
        return RopeScaling(**fields)
    except ConfigError as error:
        raise ConfigError(f"{origin}: {error}") from None


def _name(config: Mapping[str, Any], key: str, origin: str) -> str | None:
    """A config value that names something (a model type, an activation): a string or
    absent.

    Raises:
        ConfigError: any other JSON value.
    """
    value = config.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{origin}: {key} must be a string, got {value!r}")
    return value


def _rope_source(config: Mapping[str, Any], origin: str) -> tuple[Any, Any, bool, str]:
    """``(scaling dict or None, theta, whether the file states the scaling, its key)`` in
    either spelling: transformers 5's ``rope_parameters`` (theta inside) or transformers 4's
    ``rope_scaling`` beside ``rope_theta`` (which wins where both are, as in transformers)."""
    parameters = config.get("rope_parameters")
    if parameters is not None and not isinstance(parameters, Mapping):
        raise ConfigError(f"{origin}: rope_parameters must be an object, got {parameters!r}")
    if parameters is not None and "full_attention" in parameters:
        # keyed by layer type (Gemma 3): the global layers' are the decoder's RoPE; the
        # sliding layers' are the family's own field (local_rope_base)
        parameters = parameters["full_attention"]
        if parameters is not None and not isinstance(parameters, Mapping):
            raise ConfigError(f"{origin}: rope_parameters.full_attention must be an object, "
                              f"got {parameters!r}")
    legacy = config.get("rope_scaling")
    if parameters is not None and not legacy:
        return (parameters, parameters.get("rope_theta", config.get("rope_theta")), True,
                "rope_parameters")
    # transformers 5 too takes a non-empty rope_scaling over rope_parameters when both are there
    theta = config.get("rope_theta")
    if isinstance(legacy, Mapping):
        theta = legacy.get("rope_theta", theta)
    return legacy, theta, "rope_scaling" in config, "rope_scaling"


def _partial_rotary(config: Mapping[str, Any], source: Any, origin: str,
                    reading: ConfigReading) -> None:
    """``partial_rotary_factor`` (inside the RoPE parameters, as transformers 5 writes it, or
    at the top level, where transformers 4 reads it): read for a family whose transformers
    class rotates part of each head (Phi-3), refused for the others unless it is 1."""
    partial = source.get("partial_rotary_factor") if isinstance(source, Mapping) else None
    if partial is None:
        partial = config.get("partial_rotary_factor")
    if decoder_family(reading.read.get("family", "llama")).partial_rotary:
        if partial is not None:
            reading.read["partial_rotary_factor"] = partial  # checked by DecoderConfig
        return
    if partial is not None and partial != 1:
        raise ConfigError(f"{origin}: partial_rotary_factor {partial!r} is not supported for "
                          "this family (its transformers class rotates the whole head)")
    if "family" in reading.read:  # the named family's class always rotates whole heads
        reading.read["partial_rotary_factor"] = 1.0


def _rope_from_hf(config: Mapping[str, Any], origin: str, reading: ConfigReading) -> None:
    source, theta, stated, key = _rope_source(config, origin)
    if theta is not None:
        reading.read["rope_base"] = theta  # typed and range-checked by DecoderConfig
    _partial_rotary(config, source, origin, reading)
    if source is None:
        if stated:
            reading.read["rope_scaling"] = None
        return
    if not isinstance(source, Mapping):
        raise ConfigError(f"{origin}: {key} must be an object or null, got {source!r}")
    rope_type = _name(source, "rope_type", origin) or _name(source, "type", origin) or "default"
    if rope_type == "default":
        reading.read["rope_scaling"] = None
        return
    if rope_type not in ROPE_TYPE_FIELDS:
        raise ConfigError(f"{origin}: rope_type {rope_type!r} is not supported; supported: "
                          f"default, {', '.join(ROPE_TYPE_FIELDS)}")
    reads = ROPE_TYPE_FIELDS[rope_type]
    if rope_type == "dynamic":  # its context is max_position_embeddings, read below
        reads = tuple(name for name in reads if name != "original_max_position_embeddings")
    fields: dict[str, Any] = {"rope_type": rope_type}
    fields.update({name: source[name] for name in reads if source.get(name) is not None})
    if "truncate" in reads and "truncate" in source and source["truncate"] is None:
        fields["truncate"] = False  # transformers truncates only for a true value
    required = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                "longrope": ("short_factor", "long_factor"),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rope_type]
    missing = [name for name in required if name not in source]
    if missing:
        raise ConfigError(f"{origin}: {rope_type} rope scaling lacks {', '.join(missing)}")
    # What transformers takes for the context the scaling starts from: dynamic NTK always
    # max_position_embeddings; the others their own field, a top-level one first (the config
    # attribute transformers reads), else max_position_embeddings.
    if "original_max_position_embeddings" in ROPE_TYPE_FIELDS[rope_type]:
        if rope_type == "dynamic":
            fields["original_max_position_embeddings"] = _hf_max_positions(config, reading,
                                                                           origin)
        elif config.get("original_max_position_embeddings") is not None:
            fields["original_max_position_embeddings"] = config[
                "original_max_position_embeddings"]
        elif "original_max_position_embeddings" not in fields:
            fields["original_max_position_embeddings"] = _hf_max_positions(config, reading,
                                                                           origin)
        if rope_type in ("yarn", "longrope") and "factor" not in fields:
            original = fields["original_max_position_embeddings"]
            if not _positive_int(original):
                raise ConfigError(f"{origin}: original_max_position_embeddings must be a "
                                  f"positive integer, got {original!r}")
            stated = _hf_max_positions(config, reading, origin)
            if original > stated:  # the implicit factor would be below 1
                raise _original_context_error(rope_type, original, stated, origin)
            fields["factor"] = stated / original  # transformers' implicit factor
    ignored = sorted(set(source) - set(reads) - {"rope_type", "type", "rope_theta",
                                                 "partial_rotary_factor", "sliding_attention",
                                                 "full_attention"})
    if ignored:
        reading.notes.append(f"{key} {', '.join(ignored)} not read: {rope_type} scaling does "
                             "not use them (transformers ignores them too)")
    scaling = reading.read["rope_scaling"] = _rope_scaling(fields, origin)
    _check_original_context(config, scaling, reading, origin)
    if rope_type == "yarn" and scaling.factor > 1:
        # A max_position_embeddings equal to YaRN's original context states the length
        # before YaRN (Qwen2.5's config.json: 32768 and factor 4 for 131072 positions), as
        # transformers reads it; the native model gets the positions YaRN is for.
        stated = _hf_max_positions(config, reading, origin)
        if stated == scaling.original_max_position_embeddings and (
                scaling.factor * stated < float("inf")):
            reading.read["max_seq_len"] = int(scaling.factor * stated)
            reading.notes.append(
                f"max_seq_len {reading.read['max_seq_len']}: YaRN's factor "
                f"{scaling.factor:g} times the {stated} positions max_position_embeddings "
                "states (the context before YaRN, as its original_max_position_embeddings "
                "says)")


def _check_original_context(config: Mapping[str, Any], scaling: RopeScaling,
                            reading: ConfigReading, origin: str) -> None:
    """The context a scaling starts from against ``max_position_embeddings``, where
    transformers 5.25's rope validation weighs them. A yarn / longrope context above it (a
    scaling that would shorten the context) is refused. Where transformers only warns and the
    frequencies do not depend on it, a note says so: a llama3 context not below it (tiny test
    models keep Llama 3.1's 8192), a yarn factor other than their ratio (transformers uses
    the stated one; Qwen3's model card adds factor 4 over 32768 to a 40960-position config).

    Raises:
        ConfigError: a yarn or longrope original context above ``max_position_embeddings``.
    """
    rope_type, original = scaling.rope_type, scaling.original_max_position_embeddings
    if rope_type not in ("llama3", "yarn", "longrope"):
        return
    stated = _hf_max_positions(config, reading, origin)
    if rope_type == "llama3":
        if original >= stated:
            reading.notes.append(
                f"llama3 rope scaling's original_max_position_embeddings {original} is not "
                f"below max_position_embeddings {stated}: transformers warns and builds the "
                "same frequencies (llama3 scaling does not read max_position_embeddings)")
        return
    if original > stated:
        raise _original_context_error(rope_type, original, stated, origin)
    if rope_type == "yarn" and stated != original and stated / original != scaling.factor:
        reading.notes.append(
            f"yarn factor {scaling.factor:g} is not max_position_embeddings {stated} / "
            f"original_max_position_embeddings {original} = {stated / original:g}: the "
            "stated factor is used, as transformers does")


def _original_context_error(rope_type: str, original: int, stated: int,
                            origin: str) -> ConfigError:
    return ConfigError(f"{origin}: {rope_type} rope scaling's original_max_position_embeddings "
                       f"{original} must be at most max_position_embeddings {stated} (the "
                       "context it extends)")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _hf_max_positions(config: Mapping[str, Any], reading: ConfigReading, origin: str) -> int:
    """config.json's ``max_position_embeddings``, or the family's transformers default."""
    value = config.get("max_position_embeddings")
    if value is None:
        return HF_DECODER_DEFAULTS[reading.read.get("family", "llama")]["max_seq_len"]
    if not _positive_int(value):
        raise ConfigError(f"{origin}: max_position_embeddings (max_seq_len) must be a "
                          f"positive integer, got {value!r}")
    return value


# transformers' sliding windows (MistralConfig, Qwen2Config, Qwen3Config, SmolLM3Config): a
# Mistral config.json silent on it gets a 4096-token window on every layer; Qwen2, Qwen3 and
# SmolLM3 apply theirs only with use_sliding_window, to the layers layer_types names, else
# from max_window_layers on (Qwen) or those without RoPE (SmolLM3). The family file's
# hf_defaults["sliding_window"] is what a file silent on the window gets.
HF_SLIDING_WINDOW_DEFAULT = 4096
QWEN2_MAX_WINDOW_LAYERS_DEFAULT = 28
SLIDING, FULL = "sliding_attention", "full_attention"


def _window_value(config: Mapping[str, Any], origin: str,
                  default: int | None = HF_SLIDING_WINDOW_DEFAULT) -> int | None:
    window = config.get("sliding_window", default)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ConfigError(f"{origin}: sliding_window must be a positive integer or null, got "
                          f"{window!r}")
    return window


def check_layer_types(config: Mapping[str, Any], origin: str = "config.json") -> None:
    """Refuse a ``layer_types`` that does not name each layer, whatever the family, as every
    transformers config class does when it is built (a Qwen3 or Llama config.json without a
    window still fails to load with one); which kinds a family models is its own rule's
    business.

    Raises:
        ConfigError: ``layer_types`` not a list of names, or not one per
            ``num_hidden_layers``.
    """
    types = config.get("layer_types")
    if types is None:
        return
    if not isinstance(types, list) or not all(isinstance(kind, str) for kind in types):
        raise ConfigError(f"{origin}: layer_types must list {SLIDING!r} or {FULL!r} for "
                          f"each layer, got {types!r}")
    layers = config.get("num_hidden_layers")
    if type(layers) is int and len(types) != layers:
        raise ConfigError(f"{origin}: layer_types has {len(types)} entries for {layers} "
                          "layers")


def hf_window_layout(config: Mapping[str, Any], family: str, origin: str = "config.json"
                     ) -> tuple[int | None, tuple[int, ...] | None] | None:
    """``(sliding_window, the layers it applies to)`` as transformers reads a decoder
    config.json of a family whose window follows a rule (``always``, ``use_sliding_window``,
    ``layer_types``); the layers None when the file states too little to place them (no
    ``num_hidden_layers``); None for any other family.

    Raises:
        ConfigError: a ``sliding_window`` that is neither a positive integer nor null, or a
            malformed ``layer_types`` (one not naming each layer).
    """
    spec = decoder_family(family)
    rule = spec.hf_sliding_window
    if rule not in ("always", "use_sliding_window", "layer_types"):
        return None
    window = _window_value(config, origin,
                           spec.hf_defaults.get("sliding_window", HF_SLIDING_WINDOW_DEFAULT))
    layers = config.get("num_hidden_layers")
    every = tuple(range(layers)) if type(layers) is int else None
    types = config.get("layer_types")
    if rule == "always" or (rule == "layer_types" and types is None):
        return window, (() if window is None else every)
    if window is None or (rule == "use_sliding_window" and not config.get("use_sliding_window")):
        return window, ()
    if types is not None:
        if not isinstance(types, list) or any(kind not in (SLIDING, FULL) for kind in types):
            raise ConfigError(f"{origin}: layer_types must list {SLIDING!r} or {FULL!r} for "
                              f"each layer, got {types!r}")
        if every is not None and len(types) != len(every):
            raise ConfigError(f"{origin}: layer_types has {len(types)} entries for "
                              f"{len(every)} layers")
        return window, tuple(i for i, kind in enumerate(types) if kind == SLIDING)
    if every is None:
        return window, None
    if spec.hf_window_layers == "no_rope_layers":
        return window, spec.hf_config_fields["no_rope_layers"].read(config, origin)
    first = config.get("max_window_layers", QWEN2_MAX_WINDOW_LAYERS_DEFAULT)
    if type(first) is not int:
        raise ConfigError(f"{origin}: max_window_layers must be an integer, got {first!r}")
    return window, every[max(first, 0):]


def hf_sliding_window(config: Mapping[str, Any], family: str,
                      origin: str = "config.json") -> int | None:
    """The sliding window transformers applies for a decoder config.json, or None when every
    layer attends to all earlier tokens.

    Raises:
        ConfigError: a ``sliding_window`` that is neither a positive integer nor null.
    """
    layout = hf_window_layout(config, family, origin)
    if layout is None:
        return None
    window, layers = layout
    return window if layers is None or layers else None


def _hf_window_spelling(config: DecoderConfig) -> dict[str, Any]:
    """The config.json entries that state ``config``'s window in its family's spelling
    (nothing for a family whose window is fixed or its own fields).

    Raises:
        ConfigError: a window on some layers only, for Mistral (whose window is on all or
            none).
    """
    rule = decoder_family(config.family).hf_sliding_window
    layers, window = config.sliding_layers, config.sliding_window
    if rule == "always":
        if layers and layers != tuple(range(config.num_layers)):
            raise ConfigError(f"a {config.family} config.json applies its sliding window to "
                              f"every layer or none, not to layers {list(layers)} alone")
        return {"sliding_window": window if layers else None}
    if rule == "layer_types":  # MinistralConfig's spelling: always the list
        return {"sliding_window": window,
                "layer_types": [SLIDING if i in layers else FULL
                                for i in range(config.num_layers)]}
    if rule == "use_sliding_window":
        out: dict[str, Any] = {"use_sliding_window": bool(layers), "sliding_window": window}
        if layers:
            out["layer_types"] = [SLIDING if i in layers else FULL
                                  for i in range(config.num_layers)]
        return out
    return {}


def _sliding_window_notes(window: int | None, max_positions: Any, loader: str,
                          reading: ConfigReading) -> None:
    # A causal sliding window of w tokens attends to exactly what full causal attention does
    # for sequences of at most w tokens; the native model has full attention, so it computes
    # the file's model only up to there. A window no shorter than the longest sequence the
    # model is made for changes nothing.
    if window is None:
        return
    reading.unmodelled["sliding_window"] = window
    if isinstance(max_positions, int) and window >= max_positions:
        reading.notes.append(f"sliding_window {window} read: no shorter than the "
                             f"{max_positions} positions the model has, so full attention "
                             "computes the same")
        return
    reading.differences.append(
        f"sliding_window {window} is not modelled: {loader} applies it, the native model "
        "attends to every earlier token, so the two agree only on sequences of at most "
        f"{window} tokens"
    )


# native fields a config.json may leave out (for the default) but not state as null
NULL_REFUSED: frozenset[str] = frozenset({"norm_eps"})
# Fields whose null a config states for "none" (no RoPE scaling, no window, no capping), not
# for "unknown": a stated null is a value, which a default does not replace.
NULL_MEANS_NONE: frozenset[str] = frozenset({
    "rope_scaling", "query_pre_attn_scalar", "attn_softcap", "final_softcap", "sliding_window",
    "local_rope_base"})


# kind -> model_type / architecture of a multimodal model one of whose parts a family reads
# -> (that family, how it is wrapped); from the family files' ``hf_wrapped``.
HF_WRAPPED_PARTS: dict[str, dict[str, tuple[DecoderFamily | VisionFamily,
                                            WrappedCheckpoint]]] = {
    kind: {name: (family, wrapped) for family in families.values()
           for wrapped in family.hf_wrapped
           for name in (*wrapped.model_types, *wrapped.architectures)}
    for kind, families in (("decoder", DECODER_FAMILIES), ("vision", VISION_FAMILIES))}


def part_config(config: Mapping[str, Any], kind: str,
                origin: str = "config.json") -> Mapping[str, Any]:
    """The config.json of the ``kind`` part (``decoder``, ``vision``) a multimodal model holds
    (a ``Gemma3ForConditionalGeneration``'s ``text_config`` / ``vision_config``), made a
    config of its own: the family's model type and class (what its keys, renamed, load
    into), the section's fields, and the whole's dtype and version where the section does
    not state them. A decoder's tying is the whole's where the whole states it, as
    transformers 5.25 ties the whole model's head by the whole's ``tie_word_embeddings``
    (the section's otherwise). ``config`` itself when it is no such model.

    Raises:
        ConfigError: such a model's config without the part's section (or not an object):
            transformers would build the part from its defaults, which no checkpoint's
            weights are.
    """
    wrapped_parts = HF_WRAPPED_PARTS.get(kind, {})
    names = [config.get("model_type"), *(config.get("architectures") or ())]
    found = next((wrapped_parts[name] for name in names
                  if isinstance(name, str) and name in wrapped_parts), None)
    if found is None:
        return config
    family, wrapped = found
    section = config.get(wrapped.config_section)
    if not isinstance(section, Mapping):
        whole = next(name for name in names if isinstance(name, str) and name in wrapped_parts)
        stated = ("is missing" if section is None
                  else f"is {type(section).__name__} {section!r}, not an object")
        raise ConfigError(f"{origin}: {whole} holds its {kind} part's config in "
                          f"{wrapped.config_section}, which {stated}")
    model_type = family.model_types[0] if kind == "decoder" else family.hf_model_type
    part = {"architectures": [family.architectures[0]], "model_type": model_type,
            **{key: value for key, value in section.items() if key != "architectures"}}
    if kind == "decoder" and isinstance(config.get("tie_word_embeddings"), bool):
        part["tie_word_embeddings"] = config["tie_word_embeddings"]
    for key in ("dtype", "torch_dtype", "transformers_version"):
        if key in config and key not in part:
            part[key] = config[key]
    return part


def decoder_text_config(config: Mapping[str, Any],
                        origin: str = "config.json") -> Mapping[str, Any]:
    """``part_config(config, "decoder")``: a multimodal model's text half's own config.

    Raises:
        ConfigError: such a model's config without its ``text_config`` object.
    """
    return part_config(config, "decoder", origin)


def read_hf_decoder_config(config: Mapping[str, Any], origin: str = "config.json") -> ConfigReading:
    """Read a transformers decoder config.json (transformers 4 or 5 style), or the text
    section of a multimodal model whose text half a family reads (``decoder_text_config``).

    Raises:
        ConfigError: an unsupported model type, activation, MLP bias or RoPE type.
    """
    config = decoder_text_config(config, origin)
    check_layer_types(config, origin)
    reading = ConfigReading()
    model_type = _name(config, "model_type", origin)
    if model_type is not None:
        if model_type not in HF_DECODER_FAMILIES:
            raise UnsupportedFamilyError(
                f"{origin}: model_type {model_type!r} is not a supported decoder; supported: "
                f"{', '.join(HF_DECODER_FAMILIES)}", model_type=model_type, kind="decoder")
        reading.read["family"] = HF_DECODER_FAMILIES[model_type]
    else:
        for architecture in config.get("architectures") or ():
            if architecture in HF_DECODER_ARCHITECTURES:
                reading.read["family"] = HF_DECODER_ARCHITECTURES[architecture]
                break
    family = reading.read.get("family", "llama")
    spec = decoder_family(family)
    if "mlp_activation" not in spec.hf_config_fields and (
            _name(config, "hidden_act", origin) or "silu") not in HF_SILU_NAMES:
        raise ConfigError(f"{origin}: hidden_act {config['hidden_act']!r} is not supported "
                          "(Llama-family decoders use silu)")
    if config.get("mlp_bias"):
        raise ConfigError(f"{origin}: mlp_bias true is not supported")
    if config.get("attention_bias") and not spec.hf_defaults["attn_bias"]:
        # transformers' Llama/Mistral attention_bias also puts a bias on o_proj, which the
        # native attention (Qwen2-style q/k/v biases only) does not have.
        raise ConfigError(f"{origin}: attention_bias true (biases on q/k/v and o_proj) is not "
                          "supported")
    for key, name in spec.hf_config_keys.items():
        if config.get(key) is not None:
            reading.read[name] = config[key]
        elif key in config and name in NULL_REFUSED:
            # transformers keeps the null and fails in the forward; a default would hide it
            raise ConfigError(f"{origin}: {key} is null: transformers cannot run a model with "
                              "it; state its value (or remove the key for the default)")
        elif key in config and name in NULL_MEANS_NONE:
            reading.read[name] = None
    for name, spelling in spec.hf_config_fields.items():
        reading.read[name] = spelling.read(config, origin)
    _rope_from_hf(config, origin, reading)
    if "family" in reading.read:
        reading.read.update(HF_DECODER_FIXED[family])
    reading.defaults.update(HF_DECODER_DEFAULTS[family])
    layout = hf_window_layout(config, family, origin)
    if layout is not None:
        window, layers = layout
        reading.read["sliding_window"] = window
        if layers is not None:
            reading.read["sliding_layers"] = layers
        else:  # which layers it is on cannot be told: not applied, and said so
            _sliding_window_notes(
                window, reading.read.get("max_seq_len", reading.defaults["max_seq_len"]),
                "transformers", reading)
    reading.notes.extend(reading.differences)
    return reading


def meta_intermediate_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU hidden width Meta's reference code derives from params.json.

    Two thirds of ``4 * dim``, scaled by ``ffn_dim_multiplier`` if given, rounded up to a
    multiple of ``multiple_of`` (Llama 3.1 405B: 16384, 4096, 1.2 -> 53248).
    """
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


META_DECODER_KEYS: dict[str, str] = {
    "dim": "embed_dim",
    "n_layers": "num_layers",
    "n_heads": "num_heads",
    "n_kv_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "hidden_dim": "intermediate_dim",
    "norm_eps": "norm_eps",
    "rope_theta": "rope_base",
    "max_seq_len": "max_seq_len",
}

# Meta's ModelArgs defaults for what params.json may leave out (Llama 2 files have no
# rope_theta; multiple_of defaults to 256).
META_DECODER_DEFAULTS: dict[str, Any] = {
    "norm_eps": 1e-5, "rope_base": 10_000.0, "rope_scaling": None, "attn_bias": False,
}


def read_meta_decoder_config(
    config: Mapping[str, Any], origin: str = "params.json"
) -> ConfigReading:
    """Read a Meta (or Mistral) params.json.

    ``vocab_size`` of -1 means "set by the tokenizer": it is left to the embedding shape.
    ``use_scaled_rope`` gives Llama 3.1 scaling with factor ``rope_scaling_factor`` if the file
    has one, else 8 (Llama 3.2 1B/3B use 32: give it as an override).

    Raises:
        ConfigError: ``dim`` is missing while ``multiple_of`` needs it.
    """
    reading = ConfigReading()
    for key, name in META_DECODER_KEYS.items():
        if config.get(key) is not None:
            reading.read[name] = config[key]
    vocab = config.get("vocab_size")
    if vocab is not None and vocab > 0:
        reading.read["vocab_size"] = vocab
    elif vocab is not None:
        reading.notes.append(f"vocab_size {vocab} in {origin}: taken from the embedding shape")
    if "intermediate_dim" not in reading.read and "dim" in config:
        reading.read["intermediate_dim"] = meta_intermediate_dim(
            config["dim"], config.get("multiple_of", 256), config.get("ffn_dim_multiplier")
        )
    if "use_scaled_rope" in config:
        if config["use_scaled_rope"]:
            factor = config.get("rope_scaling_factor")
            reading.read["rope_scaling"] = _rope_scaling(
                {} if factor is None else {"factor": factor}, origin
            )
            if factor is None:
                reading.notes.append(
                    f"use_scaled_rope in {origin} without rope_scaling_factor: factor 8 "
                    "assumed (Llama 3.1); Llama 3.2 1B/3B need 32"
                )
        else:
            reading.read["rope_scaling"] = None
    # Mistral's params.json states hidden_dim; Meta's derive it from multiple_of.
    reading.read["family"] = meta_family(config)
    if config.get("sliding_window") is not None:  # Mistral's reference code: no default
        window, layers = _window_value(config, origin), config.get("n_layers")
        reading.read["sliding_window"] = window
        if type(layers) is int and layers > 0:  # on every layer, as Mistral's code applies it
            reading.read["sliding_layers"] = tuple(range(layers))
        else:
            _sliding_window_notes(window, config.get("max_seq_len"),
                                  "Mistral's reference code", reading)
            reading.notes.extend(reading.differences)
    reading.defaults.update(META_DECODER_DEFAULTS)
    return reading


def meta_family(config: Mapping[str, Any]) -> str:
    """The family of a params.json: the one whose marker key it has (Mistral's
    ``hidden_dim``), else the Meta-layout family without a marker (Llama)."""
    meta = [family for family in DECODER_FAMILIES.values() if family.meta_layout]
    for family in meta:
        if family.meta_params_marker is not None and family.meta_params_marker in config:
            return family.name
    return next(family.name for family in meta if family.meta_params_marker is None)


def coerce_rope_scaling(value: Any) -> RopeScaling | None:
    """Accept a RopeScaling, a mapping of its fields (without ``rope_type``: Llama 3.1's, as
    fusesurgery wrote them before it read other types; ``rope_type: default``: None), or None.

    Raises:
        ConfigError: anything else.
    """
    if value is None or isinstance(value, RopeScaling):
        return value
    if isinstance(value, Mapping):
        if value.get("rope_type") == "default":
            return None  # plain RoPE, as transformers spells it
        known = {f.name for f in dataclasses.fields(RopeScaling)}
        return _rope_scaling({k: v for k, v in value.items() if k in known}, "rope_scaling")
    raise ConfigError(f"rope_scaling must be a mapping or null, got {value!r}")


def read_native_config(
    config: Mapping[str, Any], kind: str, origin: str = "config.json"
) -> ConfigReading:
    """Read fusesurgery's own field names (``kind``: ``"decoder"`` or ``"vision"``).

    A ``"decoder"`` (or ``"encoder"`` for vision) sub-dict is used when present, as in a fused
    checkpoint's config.
    """
    section = "decoder" if kind == "decoder" else "encoder"
    if isinstance(config.get(section), Mapping):
        config = config[section]
    names = DECODER_FIELDS if kind == "decoder" else VISION_FIELDS
    reading = ConfigReading()
    for name in names:
        if name in config:
            reading.read[name] = config[name]
    if "rope_scaling" in reading.read:
        reading.read["rope_scaling"] = coerce_rope_scaling(reading.read["rope_scaling"])
    return reading


def read_decoder_config(config: Mapping[str, Any], origin: str) -> ConfigReading:
    """Read any decoder config dict, choosing the reader by its contents."""
    style = config_style(config)
    if style == "hf":
        return read_hf_decoder_config(config, origin)
    if style == "meta":
        return read_meta_decoder_config(config, origin)
    return read_native_config(config, "decoder", origin)


# --------------------------------------------------------------------------------------------
# Vision encoders.

HF_VISION_FAMILIES: dict[str, str] = by_model_type(VISION_FAMILIES)
HF_ACTIVATIONS: dict[str, str] = {
    "quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
# config.json key -> VisionEncoderConfig field: CLIP's spelling, which the towers share.
HF_VISION_KEYS: dict[str, str] = dict(vision_family("clip").hf_config_keys)
# transformers' CLIPVisionConfig / SiglipVisionConfig defaults for what shapes cannot tell.
VISION_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    name: dict(family.hf_defaults) for name, family in VISION_FAMILIES.items()}
# Architecture facts that no config states: CLIP norms only its pooled class token, SigLIP
# norms every output token.
VISION_POST_NORM_HIDDEN: dict[str, bool] = {
    name: family.post_norm_hidden for name, family in VISION_FAMILIES.items()}


def read_hf_vision_config(config: Mapping[str, Any], origin: str = "config.json") -> ConfigReading:
    """Read a CLIP/SigLIP config.json: a bare vision model's or a two-tower model's.

    Raises:
        ConfigError: an unsupported model type or activation.
    """
    config = part_config(config, "vision", origin)  # a multimodal model's tower alone
    reading = ConfigReading()
    model_type = config.get("model_type")
    own = VISION_FAMILIES.get(HF_VISION_FAMILIES.get(model_type)) if isinstance(
        model_type, str) else None
    if own is not None and own.hf_config_reader is not None:  # a config.json of its own kind
        read, defaults = own.hf_config_reader(config, origin)
        reading.read.update(read)
        reading.defaults.update(defaults)
        return reading
    model_type = _name(config, "model_type", origin)
    tower = config.get("vision_config")
    if isinstance(tower, Mapping):
        model_type = model_type or _name(tower, "model_type", origin)
    else:
        tower = config
    if model_type is not None:
        if model_type not in HF_VISION_FAMILIES:
            raise UnsupportedFamilyError(
                f"{origin}: model_type {model_type!r} is not a supported vision encoder; "
                f"supported: {', '.join(HF_VISION_FAMILIES)}", model_type=model_type,
                kind="vision")
        reading.read["family"] = HF_VISION_FAMILIES[model_type]
    keys = (vision_family(reading.read["family"]).hf_config_keys if "family" in reading.read
            else HF_VISION_KEYS)
    for key, name in keys.items():
        if tower.get(key) is not None:
            reading.read[name] = tower[key]
    positions = tower.get("num_patches")  # NaFlex: a square grid of positions, not a size
    if positions is not None:
        side = math.isqrt(positions) if type(positions) is int and positions > 0 else 0
        if side * side != positions:
            raise ConfigError(f"{origin}: num_patches {positions!r} is not a square grid")
        reading.read["image_size"] = side * tower.get("patch_size", 16)
    if _name(tower, "hidden_act", origin) is not None:
        try:
            reading.read["activation"] = HF_ACTIVATIONS[tower["hidden_act"]]
        except KeyError:
            raise ConfigError(
                f"{origin}: hidden_act {tower['hidden_act']!r} is not supported; supported: "
                f"{', '.join(HF_ACTIVATIONS)}"
            ) from None
    family = reading.read.get("family")
    if family is not None:
        reading.defaults.update(VISION_FAMILY_DEFAULTS[family])
    return reading


def read_vision_config(config: Mapping[str, Any], origin: str) -> ConfigReading:
    """Read any vision config dict, choosing the reader by its contents.

    Raises:
        ConfigError: a Meta params.json (no Meta vision layout exists) or an unknown style.
    """
    style = config_style(config)
    if style == "hf":
        return read_hf_vision_config(config, origin)
    if style == "native":
        return read_native_config(config, "vision", origin)
    raise ConfigError(f"{origin} is a Meta params.json, which describes no vision encoder")


__all__ = [
    "DECODER_FIELDS",
    "VISION_FIELDS",
    "ConfigReading",
    "coerce_rope_scaling",
    "config_style",
    "check_layer_types",
    "decoder_text_config",
    "hf_config_dict",
    "hf_max_position_embeddings",
    "hf_rope_scaling",
    "hf_sliding_window",
    "hf_window_layout",
    "native_config_dict",
    "meta_intermediate_dim",
    "part_config",
    "read_decoder_config",
    "read_hf_decoder_config",
    "read_hf_vision_config",
    "read_meta_decoder_config",
    "read_native_config",
    "read_vision_config",
    "set_hf_dtype",
]


# --------------------------------------------------------------------------------------------
# Writing configs: the reading tables inverted, so each name is spelled once.

HF_MODEL_TYPES: dict[str, str] = {
    name: family.model_types[0] for name, family in DECODER_FAMILIES.items()
} | {name: family.hf_model_type for name, family in VISION_FAMILIES.items()}
HF_ARCHITECTURES: dict[str, str] = {
    name: family.architectures[0] for name, family in DECODER_FAMILIES.items()
} | {name: family.architectures[0] for name, family in VISION_FAMILIES.items()}


def _first_spelling(table: Mapping[str, str]) -> dict[str, str]:
    """Invert ``spelling -> value``, keeping the first spelling of each value."""
    inverse: dict[str, str] = {}
    for spelling, value in table.items():
        inverse.setdefault(value, spelling)
    return inverse


def native_config_dict(config: DecoderConfig | VisionEncoderConfig) -> dict[str, Any]:
    """fusesurgery's own config.json for ``config`` (read back by ``read_native_config``)."""
    section = "decoder" if isinstance(config, DecoderConfig) else "encoder"
    return {"fusesurgery_version": 1, section: dataclasses.asdict(config)}


def _meta_ffn_fields(dim: int, intermediate_dim: int) -> dict[str, Any] | None:
    """``multiple_of`` / ``ffn_dim_multiplier`` from which Meta's formula gives back
    ``intermediate_dim``, or None when none is found."""
    base = int(2 * (4 * dim) / 3)
    for multiple_of in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        for multiplier in (None, round(intermediate_dim / base, 6), intermediate_dim / base):
            if meta_intermediate_dim(dim, multiple_of, multiplier) == intermediate_dim:
                return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    return None


def meta_config_dict(config: DecoderConfig) -> dict[str, Any]:
    """A Meta params.json for ``config`` (read back by ``read_meta_decoder_config``).

    Raises:
        ConfigError: a vision tower, q/k/v biases, q/k norms, or RoPE scaling other than Meta's own
            (low/high frequency factors 1 and 4, 8192 original positions), which params.json
            cannot express.
    """
    if not isinstance(config, DecoderConfig):
        raise ConfigError("the Meta layout holds decoders only, not vision towers")
    if config.attn_bias:
        raise ConfigError(f"a Meta params.json cannot express q/k/v biases ({config.family})")
    if config.qk_norm:
        raise ConfigError(f"a Meta params.json cannot express per-head q/k norms "
                          f"({config.family})")
    if config.no_rope_layers:
        raise ConfigError(f"a Meta params.json cannot express layers without RoPE "
                          f"({config.family})")
    every_layer = decoder_family(config.family).hf_sliding_window == "always"  # Mistral's
    if config.sliding_layers and (not every_layer or config.sliding_layers != tuple(
            range(config.num_layers))):
        raise ConfigError(f"a Meta params.json cannot express a sliding window on layers "
                          f"{list(config.sliding_layers)} ({config.family}); Mistral's states one "
                          "for every layer")
    out: dict[str, Any] = {meta: getattr(config, name) for meta, name in META_DECODER_KEYS.items()
                           if name != "intermediate_dim"}
    out["vocab_size"] = config.vocab_size
    family = decoder_family(config.family)
    if not family.meta_layout:
        raise ConfigError(f"the Meta layout holds no {family.display_name} decoder")
    ffn = None if family.meta_params_marker == "hidden_dim" else _meta_ffn_fields(
        config.embed_dim, config.intermediate_dim)
    if ffn is None:  # Mistral's spelling: the width itself
        out["hidden_dim"] = config.intermediate_dim
    else:
        out.update(ffn)
    scaling = config.rope_scaling
    out["use_scaled_rope"] = scaling is not None
    if scaling is not None:
        if scaling.rope_type != "llama3" or (
                scaling.low_freq_factor, scaling.high_freq_factor,
                scaling.original_max_position_embeddings) != (1.0, 4.0, 8192):
            raise ConfigError(f"a Meta params.json cannot express this RoPE scaling "
                              f"({scaling.summary()}): only Llama 3.1's (llama3, low 1, high 4, "
                              "orig 8192)")
        out["rope_scaling_factor"] = scaling.factor
    if config.sliding_layers:
        out["sliding_window"] = config.sliding_window
    return out


def hf_config_dict(
    config: DecoderConfig | VisionEncoderConfig, base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A transformers config.json (transformers 4 style, which 5 reads too) for ``config``.

    Args:
        config: the model.
        base: a decoder's own transformers config.json (the source's, or the one a conversion
            kept beside a native or Meta checkpoint). Every field it states stays as it is
            (token ids, ``sliding_window``, dtype, transformers 5's ``rope_parameters``
            spelling, ...) except those whose meaning differs from ``config``, which are
            written in its spelling. A base of another family is not used.

    Raises:
        ConfigError: a setting transformers' class for the family cannot express (a Llama
            with q/k/v biases but none on the output projection, a Qwen2 without biases, a
            Llama with q/k norms or a Qwen3 without), or
            a base that is no valid decoder config.json.
    """
    if isinstance(config, VisionEncoderConfig) and (
            vision_family(config.family).hf_config_writer is not None):
        return vision_family(config.family).hf_config_writer(config)
    if isinstance(config, VisionEncoderConfig):
        out: dict[str, Any] = {
            key: getattr(config, name)
            for key, name in vision_family(config.family).hf_config_keys.items()
        }
        out["hidden_act"] = _first_spelling(HF_ACTIVATIONS)[config.activation]
        if config.naflex:  # its position table's size, not an image size
            out["num_patches"] = config.num_patches
            del out["image_size"]
    else:
        if base is not None:  # a multimodal source's: its text model's own config
            base = decoder_text_config(base)
        if config.attn_bias != HF_DECODER_DEFAULTS[config.family]["attn_bias"]:
            raise ConfigError(
                f"a {config.family} config.json cannot express attn_bias={config.attn_bias}"
            )
        if config.partial_rotary_factor != 1 and not decoder_family(
                config.family).partial_rotary:
            raise ConfigError(f"a {config.family} config.json cannot express "
                              f"partial_rotary_factor={config.partial_rotary_factor}")
        for name, fixed in HF_DECODER_FIXED[config.family].items():
            if getattr(config, name) != fixed:  # (qk_norm, layers without RoPE, Gemma's)
                raise ConfigError(f"a {config.family} config.json cannot express "
                                  f"{name}={getattr(config, name)}")
        family = decoder_family(config.family)
        if base is not None and read_hf_decoder_config(base).read.get(
                "family", "llama") == config.family:
            return _over_base(config, base)
        out = {key: getattr(config, name) for key, name in family.hf_config_keys.items()
               if name != "attn_bias" or family.hf_attention_bias_switch}
        if "mlp_activation" not in family.hf_config_fields:
            out["hidden_act"] = "silu"
        out["max_position_embeddings"] = hf_max_position_embeddings(config)
        for name, spelling in family.hf_config_fields.items():
            out.update(spelling.write(getattr(config, name), config.num_layers))
        out.update(_hf_rope(config))
        out.update(_hf_window_spelling(config))
        out.update({key: value(config) if callable(value) else value
                    for key, value in family.hf_written_defaults.items()})
        if family.partial_rotary:
            out["partial_rotary_factor"] = config.partial_rotary_factor
    return {"architectures": [HF_ARCHITECTURES[config.family]],
            "model_type": HF_MODEL_TYPES[config.family], **out}


def hf_rope_scaling(scaling: RopeScaling | None) -> dict[str, Any] | None:
    """A RoPE scaling as transformers' ``rope_scaling`` states it (None for plain RoPE).
    Dynamic NTK's original context is not in it: transformers takes the config's
    ``max_position_embeddings`` (see :func:`hf_max_position_embeddings`)."""
    if scaling is None:
        return None
    out = scaling.parameters()
    if scaling.rope_type == "dynamic":
        del out["original_max_position_embeddings"]
    return out


def hf_max_position_embeddings(config: DecoderConfig) -> int:
    """The ``max_position_embeddings`` a transformers config.json states for ``config``:
    ``max_seq_len``, except under dynamic NTK scaling, where transformers reads it as the
    context past which the base grows (the scaling's original context)."""
    scaling = config.rope_scaling
    if scaling is not None and scaling.rope_type == "dynamic":
        return scaling.original_max_position_embeddings
    return config.max_seq_len


def _hf_rope(config: DecoderConfig) -> dict[str, Any]:
    return {"rope_theta": config.rope_base, "rope_scaling": hf_rope_scaling(config.rope_scaling)}


def _over_base(config: DecoderConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with each field whose meaning differs from ``config`` rewritten."""
    reading = read_hf_decoder_config(base)
    meant = {**reading.defaults, **reading.read}
    # what transformers takes when these are left out (derived from the widths written)
    unstated = HF_UNSTATED_HEADS[config.family]
    meant.setdefault("num_kv_heads", unstated["num_kv_heads"] or config.num_heads)
    meant.setdefault("head_dim", unstated["head_dim"] or config.embed_dim // config.num_heads)
    out = dict(base)
    family = decoder_family(config.family)
    for key, name in family.hf_config_keys.items():
        if name == "attn_bias" and not family.hf_attention_bias_switch:
            continue  # the family fixes it (hf_config_dict checked it)
        if name not in meant or meant[name] != getattr(config, name):
            out[key] = getattr(config, name)
    for name, spelling in family.hf_config_fields.items():
        if meant.get(name) != getattr(config, name):
            out.update(spelling.write(getattr(config, name), config.num_layers))
    window = (config.sliding_window, config.sliding_layers)
    if (meant.get("sliding_window"), meant.get("sliding_layers", ())) != window:
        out.update(_hf_window_spelling(config))
    if (meant["max_seq_len"], meant["rope_scaling"]) != (config.max_seq_len,
                                                         config.rope_scaling):
        # in transformers' sense (dynamic NTK's context, whatever the native length); the
        # base's own value where it is that already
        positions = hf_max_position_embeddings(config)
        stated = base.get("max_position_embeddings",
                          HF_DECODER_DEFAULTS[config.family]["max_seq_len"])
        if positions != stated:
            out["max_position_embeddings"] = positions
        elif "max_position_embeddings" in base:
            out["max_position_embeddings"] = base["max_position_embeddings"]
        else:
            out.pop("max_position_embeddings", None)
    if family.partial_rotary and meant.get("partial_rotary_factor", 1.0) != (
            config.partial_rotary_factor):
        out["partial_rotary_factor"] = config.partial_rotary_factor
        if isinstance(out.get("rope_parameters"), Mapping):
            out["rope_parameters"] = {**out["rope_parameters"],
                                      "partial_rotary_factor": config.partial_rotary_factor}
    if (meant["rope_base"], meant["rope_scaling"]) != (config.rope_base, config.rope_scaling):
        rope = _hf_rope(config)
        parameters = base.get("rope_parameters")
        if isinstance(parameters, Mapping):  # transformers 5's spelling
            scaling_keys = {"type", *(f.name for f in dataclasses.fields(RopeScaling))}
            kept = {k: v for k, v in parameters.items() if k not in scaling_keys}
            out["rope_parameters"] = {**kept, "rope_theta": rope["rope_theta"],
                                      **(rope["rope_scaling"] or {"rope_type": "default"})}
            out.pop("rope_scaling", None)  # transformers would read a stale one over these
        else:
            out.update(rope)
        scaling = config.rope_scaling
        if "original_max_position_embeddings" in base and scaling is not None and (
                scaling.rope_type != "dynamic"):
            # the top-level field (Phi-3's) is the one transformers reads: it must agree
            out["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    return out


def set_hf_dtype(document: dict[str, Any], dtype_name: str) -> None:
    """State ``dtype_name`` (``"bfloat16"``) as a config.json's dtype, in its own spelling
    (transformers 5's ``dtype`` where it has one, else ``torch_dtype``)."""
    key = "dtype" if "dtype" in document else "torch_dtype"
    document.pop("torch_dtype" if key == "dtype" else "dtype", None)
    document[key] = dtype_name

"""What a family declares: the two frozen dataclasses every family file fills in.

A family is data the generic machinery reads (``convert`` for config fields, key maps, shapes
and transforms; ``modules`` for the native module's options; ``surgery`` for fusion
defaults). Nothing here imports anything of fusesurgery beyond ``errors``: families sit just
above the base of the import flow, below ``config``.

Key tables map a foreign key template to a native one, ``{i}`` standing for a layer index;
their inverses are derived by code (:func:`fusesurgery.convert.keymaps.invert_key_map`),
never written.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

RopeStyle = Literal["interleaved", "half"]
SlidingWindowRule = Literal["none", "always", "use_sliding_window", "layer_types", "modelled"]
WindowLayers = Literal["max_window_layers", "no_rope_layers"]


def frozen(table: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only view of ``table``, so a family's data cannot be changed by a caller."""
    return types.MappingProxyType(dict(table))


@dataclass(frozen=True)
class ConfigField:
    """A native config field a family's ``config.json`` spells in its own way (not a value
    copied as it is): the two small functions that translate it.

    Args:
        read: ``(config.json, origin) -> value``, raising ``ConfigError`` on a malformed one.
        write: ``(value, num_layers) -> config.json entries``.
    """

    read: Callable[[Mapping[str, Any], str], Any]
    write: Callable[[Any, int], dict[str, Any]]


@dataclass(frozen=True)
class WrappedCheckpoint:
    """A transformers model that holds a decoder (or a vision tower) of the family as one of
    its parts (Gemma 3's ``Gemma3ForConditionalGeneration``: a SigLIP tower and a projector
    beside the text model), read as that part alone: its config section made a config of its
    own, its keys renamed to the part's own, the other parts dropped and listed (as a
    ``CLIPModel``'s text tower is).

    Args:
        model_types: the whole model's ``model_type`` values (``"gemma3"``).
        architectures: the whole model's transformers classes.
        config_section: the ``config.json`` section that is the part's config
            (``"text_config"``, ``"vision_config"``).
        key_prefixes: a key prefix of the whole -> the part's own spelling of it, tried in
            order (transformers 4's ``language_model.model.`` and 5's
            ``model.language_model.`` -> ``model.``).
        dropped: key patterns of the other parts (``*`` matches dots too) -> why they are
            dropped.
    """

    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    config_section: str
    key_prefixes: Mapping[str, str]
    dropped: Mapping[str, str]


@dataclass(frozen=True)
class DecoderFamily:
    """A Llama-shaped decoder family (pre-norm RMSNorm layers, SwiGLU MLP, RoPE attention).

    Args:
        name: the native ``DecoderConfig.family`` value (``"qwen3"``).
        display_name: how people write it (``"Qwen3"``).
        model_types: transformers ``model_type`` values this family reads; the first is
            written.
        architectures: transformers classes (``config.json``'s ``architectures``); the first
            is written, any is read when ``model_type`` is missing.
        hf_config_keys: ``config.json`` key -> ``DecoderConfig`` field, for values copied as
            they are (read, and written back).
        hf_defaults: field -> the value transformers' config class assumes when
            ``config.json`` leaves it out (provenance ``default``). Not the head count: it
            belongs to one model size, so a file silent on it is asked for it.
        fixed: field -> value the family's transformers class always builds, whatever the
            config says (provenance ``read`` when the file names the family): weights that
            lack them belong to another model and are refused.
        unstated_heads: ``head_dim`` / ``num_kv_heads`` transformers takes when
            ``config.json`` leaves them out; None: derived from the width and head count.
        hf_config_fields: native field -> how ``config.json`` spells it, for fields that are
            not copied as they are (SmolLM3's ``no_rope_layers`` flags). Every other family
            states such a field in ``fixed`` (Llama: ``no_rope_layers`` empty).
        hf_attention_bias_switch: ``config.json``'s ``attention_bias`` is this family's
            switch (and is written): true puts a bias on the output projection too, which
            the native attention does not have, so true is refused. A family whose q/k/v
            biases are fixed (``hf_defaults["attn_bias"]`` true) ignores the key.
        hf_sliding_window: how transformers applies ``sliding_window``: ``"none"`` (never),
            ``"always"`` (Mistral, Phi-3: every layer; a missing key means
            ``hf_defaults["sliding_window"]``: 4096 for Mistral, none for Phi-3),
            ``"use_sliding_window"`` (Qwen2/3, SmolLM3: only with that switch, to the layers
            ``layer_types`` or ``hf_window_layers`` names), ``"layer_types"`` (Ministral: the
            layers ``layer_types`` names, every layer when it is absent, none when the window
            is null), or ``"modelled"``: the family reads
            ``sliding_window`` and ``sliding_layers`` itself (Gemma). Each rule's window and
            layers are read into the native config (``sliding_window``, ``sliding_layers``)
            and written back in the family's spelling.
        hf_window_layers: under ``use_sliding_window`` without ``layer_types``, the layers that
            slide: from ``max_window_layers`` on (Qwen2/3) or those without RoPE (SmolLM3).
        meta_layout: Meta's ``consolidated.*.pth`` + ``params.json`` can hold it.
        meta_params_marker: a ``params.json`` key that tells this family's file from
            Meta's own (Mistral's ``hidden_dim``); None for the family such a file is
            otherwise taken to be.
        hf_keys: transformers key template -> native key template (``model.`` prefixed; a
            bare ``LlamaModel``'s keys are read by adding the prefix).
        own_hf_names: some transformers names mean something else than in Llama (Gemma's
            ``post_attention_layernorm`` norms the attention output, Llama's the MLP input),
            so ``hf_keys`` is kept out of the shared table: a key set holding one of
            ``hf_layout_markers`` is read, and this family written, with it alone.
        hf_layout_markers: transformers key templates only this family has, which tell its
            key set apart (``own_hf_names`` families).
        hf_fused_keys: transformers key template -> the native key templates whose rows it
            stacks, in order (Phi-3's ``qkv_proj``: q, k, v; ``gate_up_proj``: w1, w3). Each
            part's rows are what the native config gives that key, so reading splits the
            tensor into byte ranges and writing concatenates the parts back, bitwise.
        hf_written_defaults: ``config.json`` entries written where no transformers config of
            the model's own is kept (a native checkpoint without ``hf_config.json``), in place
            of what the family's config class would assume for an absent key: Phi-3's token
            ids (32000 of Phi-3-mini's vocabulary, a wrong token or none at all in another's)
            are written null rather than claimed. A callable value is computed from the
            ``DecoderConfig`` (Phi-3's top-level ``original_max_position_embeddings``, which
            its config class puts over the one inside ``rope_scaling``).
        partial_rotary: transformers' class for the family rotates only the first
            ``partial_rotary_factor`` of each head (Phi-3); a factor other than 1 is refused
            for the other families, whose classes rotate the whole head.
        meta_keys: Meta key template -> native key template, when ``meta_layout``.
        native_rope_style: the RoPE pairing of the native layout: ``"interleaved"`` (Meta,
            torchtune's Llama and Mistral: HF q/k rows are permuted on the way) or ``"half"``
            (transformers' rotate-half, torchtune's Qwen2/Qwen3: rows kept as they are).
        shape_markers: native key (layer 0) -> whether it is present, for telling this family
            from the others by shapes alone when no config names it; every entry must match.
            Empty: never inferred from shapes.
        shape_fallback: the family a decoder is taken to be when no config names one and no
            family's markers match (provenance ``default``).
        torchtune_model: the torchtune module whose checkpoint converter the native layout
            follows, names and values (``torchtune.models.qwen2``), or None.
        native_final_norm: the native key of the final norm's weight: ``norm.scale``, or
            torchtune's ``norm.rms_norm.scale`` where its model keeps that norm inside a
            module of its own (Gemma 2's, which also caps the hidden state).
        native_legacy_keys: native key -> the key it is now, for spellings an earlier
            fusesurgery wrote in this family's native (and fused) checkpoints; still read.
        mllama_text_model: transformers' Mllama text model (a Llama) can hold this family's
            decoder, so a fused model exports ``--to mllama`` (other blockers aside).
        relatives: transformers ``model_type`` values not supported here whose checkpoints
            are closest to this family -> what differs; named when such a checkpoint is met.
        hf_wrapped: transformers models that hold this family's decoder as their text half
            (Gemma 3's ``Gemma3ForConditionalGeneration``), read as the decoder alone.
    """

    name: str
    display_name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    hf_config_keys: Mapping[str, str]
    hf_defaults: Mapping[str, Any]
    fixed: Mapping[str, Any]
    unstated_heads: Mapping[str, int | None]
    hf_keys: Mapping[str, str]
    native_rope_style: RopeStyle
    hf_config_fields: Mapping[str, ConfigField] = field(default_factory=lambda: frozen({}))
    hf_fused_keys: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: frozen({}))
    hf_written_defaults: Mapping[str, Any] = field(default_factory=lambda: frozen({}))
    partial_rotary: bool = False
    hf_attention_bias_switch: bool = False
    hf_sliding_window: SlidingWindowRule = "none"
    hf_window_layers: WindowLayers = "max_window_layers"
    own_hf_names: bool = False
    hf_layout_markers: tuple[str, ...] = ()
    meta_layout: bool = False
    meta_params_marker: str | None = None
    meta_keys: Mapping[str, str] = field(default_factory=lambda: frozen({}))
    shape_markers: Mapping[str, bool] = field(default_factory=lambda: frozen({}))
    shape_fallback: bool = False
    torchtune_model: str | None = None
    native_final_norm: str = "norm.scale"
    native_legacy_keys: Mapping[str, str] = field(default_factory=lambda: frozen({}))
    mllama_text_model: bool = False
    relatives: Mapping[str, str] = field(default_factory=lambda: frozen({}))
    hf_wrapped: tuple[WrappedCheckpoint, ...] = ()

    kind = "decoder"


@dataclass(frozen=True)
class VisionFamily:
    """A ViT vision tower family (patch convolution, LayerNorm pre-norm layers, GELU MLP).

    Args:
        name: the native ``VisionEncoderConfig.family`` value (``"siglip"``).
        display_name: how people write it (``"SigLIP"``).
        model_types: transformers ``model_type`` values this family reads (the vision
            model's and the two-tower model's, whose ``vision_config`` is read).
        hf_model_type: the ``model_type`` written for the tower alone.
        architectures: transformers classes of the tower alone; the first is written.
        hf_config_keys: ``config.json`` key -> ``VisionEncoderConfig`` field.
        hf_defaults: field -> transformers' class default for what shapes cannot tell.
        post_norm_hidden: the final LayerNorm applies to every output token (SigLIP), not
            only to the pooled class token (CLIP): an architecture fact no config states.
        hf_keys: transformers key template (``vision_model.`` prefixed) -> native template.
        hf_dropped: transformers key patterns (``*`` matches dots too) the native tower has
            no use for -> why they are dropped (the other tower, buffers, pooling heads).
        shape_markers: native key -> whether it is present (a bool) or present with that
            many dimensions (an int), to tell the family by shapes; every entry must match.
        encoder_layer_default: the hidden layer that feeds the fusion, in transformers'
            ``hidden_states[k]`` numbering; None: the final hidden states.
        encoder_tokens_default: which output tokens feed the fusion by default (``all``,
            ``cls_and_patches``: registers left out, ``patches``).
        pooling_head: the transformers tower ends in an attention-pooling head, which
            ``convert`` carries in a file beside the native weights.
        own_hf_names: its transformers names are its own, not CLIP's spelling (DINOv2): read
            after the shared table, written from its own.
        hf_layout_markers: key prefixes only this family's transformers checkpoints have, which
            tell the layout apart when they are not CLIP's spelling.
        hf_config_reader: for a config.json of its own kind, ``(config, origin) -> (read,
            defaults)`` in place of the generic reading; None: ``hf_config_keys`` and
            ``hf_defaults``.
        hf_config_writer: the matching ``VisionEncoderConfig -> config.json``; None: generic.
        batch_dim_tables: the class token and position table keep a leading batch dim
            (``[1, 1, d_e]``, ``[1, n, d_e]``), as DINOv2's checkpoints store them.
        naflex: the tower takes pre-cut patches (SigLIP2 NaFlex: a linear patch embedding, the
            position table resized per image).
        torchtune_model: the torchtune module whose names the native layout follows, or None.
        relatives: unsupported ``model_type`` values closest to this family -> what differs.
        hf_wrapped: transformers models that hold this family's tower as their vision part
            (Gemma 3's ``Gemma3ForConditionalGeneration``), read as the tower alone where a
            vision tower is asked for (``fuse``'s ENCODER, ``load_encoder``).
    """

    name: str
    display_name: str
    model_types: tuple[str, ...]
    hf_model_type: str
    architectures: tuple[str, ...]
    hf_config_keys: Mapping[str, str]
    hf_defaults: Mapping[str, Any]
    post_norm_hidden: bool
    hf_keys: Mapping[str, str]
    hf_dropped: Mapping[str, str]
    shape_markers: Mapping[str, bool | int]
    encoder_layer_default: int | None
    encoder_tokens_default: str = "all"
    pooling_head: bool = False
    own_hf_names: bool = False
    hf_layout_markers: tuple[str, ...] = ()
    hf_config_reader: Callable[[Mapping[str, Any], str],
                               tuple[dict[str, Any], dict[str, Any]]] | None = None
    hf_config_writer: Callable[[Any], dict[str, Any]] | None = None
    batch_dim_tables: bool = False
    naflex: bool = False
    torchtune_model: str | None = None
    relatives: Mapping[str, str] = field(default_factory=lambda: frozen({}))
    hf_wrapped: tuple[WrappedCheckpoint, ...] = ()

    kind = "vision"


Family = DecoderFamily | VisionFamily

__all__ = [
    "ConfigField", "DecoderFamily", "Family", "RopeStyle", "SlidingWindowRule", "VisionFamily",
    "WindowLayers", "WrappedCheckpoint", "frozen",
]

"""State-dict key maps between the native layout and Hugging Face / Meta layouts.

The maps are data: module-level dicts from a foreign key template to the native key template,
where ``{i}`` stands for a layer index. Their inverses are derived by :func:`invert_key_map`,
which refuses a table that is not one-to-one, so a typo that sends two keys to one name fails
at import instead of silently overwriting a tensor.

Keys a layout holds but the native model has no use for (RoPE frequency buffers, the text
tower of a CLIP checkpoint, SigLIP's pooling head) are listed in ``DROPPED_KEYS`` with the
reason, and every conversion reports them. Any other key a map does not know is an error.

A foreign tensor may stack several native ones (Phi-3's ``qkv_proj``: q, k and v rows;
``gate_up_proj``: w1, then w3), declared by its family file (``hf_fused_keys``):
:func:`keys_to_native` lists such a key under ``KeyMapping.parts``, and
:func:`stacked_key` says which stacked tensor a native key is written into; the rows of each
part come from the config (``convert.plan.stacked_row_ranges``).
(``convert`` carries SigLIP's head in a file beside the native weights rather than dropping
it: see :mod:`fusesurgery.convert.pooling_head`.)

Kinds and layouts:

- ``decoder``: ``native`` (torchtune names), ``hf`` (transformers ``*ForCausalLM``; a bare
  ``LlamaModel`` / ``Qwen2Model`` saved without the ``model.`` prefix is read too), ``meta``
  (``consolidated.*.pth``, also Mistral's ``consolidated.safetensors``).
- ``vision``: ``native`` and ``hf`` (``vision_model.*`` of ``CLIPVisionModel``,
  ``SiglipVisionModel``, ``CLIPModel``, ``SiglipModel``). transformers 5 saves the bare vision
  models without the ``vision_model.`` prefix; both spellings are read, the prefixed one (which
  transformers 4 and 5 both load) is written.
- ``fused``: ``native``: ``decoder.*`` and ``encoder.*`` keys of a fused checkpoint, kept
  as they are; ``mllama``: transformers' ``MllamaForCausalLM`` /
  ``MllamaForConditionalGeneration`` (see :mod:`fusesurgery.convert.mllama`; its layer
  renumbering needs the whole key set, so it maps through :func:`keys_to_native` only).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from fusesurgery.convert.mllama import mllama_to_native
from fusesurgery.errors import KeyMapError
from fusesurgery.families import DECODER_FAMILIES, VISION_FAMILIES, dinov2

Kind = Literal["decoder", "vision", "fused"]
Layout = Literal["native", "hf", "meta", "mllama"]

KINDS: tuple[str, ...] = ("decoder", "vision", "fused")
LAYOUTS: tuple[str, ...] = ("native", "hf", "meta", "mllama")
FUSED_LAYOUTS: tuple[str, ...] = ("native", "mllama")

LAYER = "{i}"

# --------------------------------------------------------------------------------------------
# Native templates (the names the modules use).

NATIVE_DECODER_KEYS: tuple[str, ...] = (
    "tok_embeddings.weight",
    "layers.{i}.sa_norm.scale",
    "layers.{i}.attn.q_proj.weight",
    "layers.{i}.attn.q_proj.bias",
    "layers.{i}.attn.k_proj.weight",
    "layers.{i}.attn.k_proj.bias",
    "layers.{i}.attn.v_proj.weight",
    "layers.{i}.attn.v_proj.bias",
    "layers.{i}.attn.output_proj.weight",
    "layers.{i}.attn.q_norm.scale",  # Qwen3's per-head q/k RMSNorms (torchtune's names)
    "layers.{i}.attn.k_norm.scale",
    "layers.{i}.mlp_norm.scale",
    "layers.{i}.mlp.w1.weight",
    "layers.{i}.mlp.w2.weight",
    "layers.{i}.mlp.w3.weight",
    "layers.{i}.sa_scale.scale",  # Gemma's post-attention / post-feedforward norms (torchtune's
    "layers.{i}.mlp_scale.scale",  # Gemma 2 names)
    "norm.scale",
    "norm.rms_norm.scale",  # torchtune's Gemma 2 final norm (inside the module that caps)
    "output.weight",
)

# Keys a fused decoder adds to the native decoder keys (SPEC.md section 3). The q/k/v biases
# are accepted for fusion layers built on a biased (Qwen2) decoder.
NATIVE_FUSION_KEYS: tuple[str, ...] = (
    "tok_embeddings.fusion_embedding.weight",
    "layers.{i}.fusion_layer.ca_norm.scale",
    "layers.{i}.fusion_layer.attn.q_proj.weight",
    "layers.{i}.fusion_layer.attn.q_proj.bias",
    "layers.{i}.fusion_layer.attn.k_proj.weight",
    "layers.{i}.fusion_layer.attn.k_proj.bias",
    "layers.{i}.fusion_layer.attn.v_proj.weight",
    "layers.{i}.fusion_layer.attn.v_proj.bias",
    "layers.{i}.fusion_layer.attn.output_proj.weight",
    "layers.{i}.fusion_layer.attn.q_norm.scale",
    "layers.{i}.fusion_layer.attn.k_norm.scale",
    "layers.{i}.fusion_layer.ca_scale.scale",
    "layers.{i}.fusion_layer.mlp_norm.scale",
    "layers.{i}.fusion_layer.mlp.w1.weight",
    "layers.{i}.fusion_layer.mlp.w2.weight",
    "layers.{i}.fusion_layer.mlp.w3.weight",
    "layers.{i}.fusion_layer.mlp_scale.scale",
)

NATIVE_VISION_KEYS: tuple[str, ...] = (
    "conv.weight",
    "conv.bias",
    "cls_token_embedding.weight",
    "token_pos_embedding.positional_embedding",
    "ln_pre.weight",
    "ln_pre.bias",
    "layers.{i}.sa_norm.weight",
    "layers.{i}.sa_norm.bias",
    "layers.{i}.attn.q_proj.weight",
    "layers.{i}.attn.q_proj.bias",
    "layers.{i}.attn.k_proj.weight",
    "layers.{i}.attn.k_proj.bias",
    "layers.{i}.attn.v_proj.weight",
    "layers.{i}.attn.v_proj.bias",
    "layers.{i}.attn.output_proj.weight",
    "layers.{i}.attn.output_proj.bias",
    "layers.{i}.mlp_norm.weight",
    "layers.{i}.mlp_norm.bias",
    "layers.{i}.mlp.w1.weight",
    "layers.{i}.mlp.w1.bias",
    "layers.{i}.mlp.w2.weight",
    "layers.{i}.mlp.w2.bias",
    "ln_post.weight",
    "ln_post.bias",
    *dinov2.NATIVE_KEYS,
)

# Prefixes inside a fused checkpoint.
FUSED_DECODER_PREFIX = "decoder."
FUSED_ENCODER_PREFIX = "encoder."
FUSED_VISION_PREFIX = "encoder.vision."  # fusesurgery's encoder
FUSED_TORCHTUNE_VISION_PREFIX = "encoder.clip."  # torchtune's llama3_2_vision encoder
FUSED_PROJECTION_PREFIX = "encoder.projection."

# --------------------------------------------------------------------------------------------
# Foreign -> native tables: the union of every family file's rows for the layout. A key spells
# one thing in every family that has it, so a checkpoint's keys map before its family is known
# (and tell it: Qwen2's biases, Qwen3's q/k norms).


def union_key_map(tables: Iterable[tuple[str, Mapping[str, str]]], what: str) -> dict[str, str]:
    """Merge the families' ``foreign -> native`` tables of one layout.

    Args:
        tables: ``(family name, table)`` pairs.
        what: the layout, for the message.

    Raises:
        KeyMapError: two families map one foreign key to different native keys.
    """
    merged: dict[str, str] = {}
    owner: dict[str, str] = {}
    for family, table in tables:
        for source, target in table.items():
            if merged.setdefault(source, target) != target:
                raise KeyMapError(f"{what} key {source!r} maps to {merged[source]!r} in "
                                  f"{owner[source]} but to {target!r} in {family}")
            owner.setdefault(source, family)
    return merged


HF_DECODER_TO_NATIVE: dict[str, str] = union_key_map(
    ((name, family.hf_keys) for name, family in DECODER_FAMILIES.items()
     if not family.own_hf_names), "hf decoder")
# Decoder families whose transformers names mean other things than the shared table's (Gemma's
# post_attention_layernorm): family -> foreign template -> native template. A key set holding
# one of the family's layout markers is read with its table alone; the family is written so.
HF_DECODER_FAMILY_TO_NATIVE: dict[str, dict[str, str]] = {
    name: dict(family.hf_keys) for name, family in DECODER_FAMILIES.items()
    if family.own_hf_names}

META_DECODER_TO_NATIVE: dict[str, str] = union_key_map(
    ((name, family.meta_keys) for name, family in DECODER_FAMILIES.items()
     if family.meta_layout), "meta decoder")

# Foreign tensors that stack several native ones (Phi-3's ``qkv_proj``, ``gate_up_proj``):
# foreign template -> the native templates of its row blocks, in order. Reading splits such a
# tensor; writing the family's layout concatenates the parts back.
HF_DECODER_SPLITS: dict[str, tuple[str, ...]] = {}
for _name, _family in DECODER_FAMILIES.items():
    for _source, _parts in _family.hf_fused_keys.items():
        if HF_DECODER_SPLITS.setdefault(_source, tuple(_parts)) != tuple(_parts):
            raise KeyMapError(f"hf decoder key {_source!r} stacks different keys in {_name}")
        if _source in HF_DECODER_TO_NATIVE:
            raise KeyMapError(f"hf decoder key {_source!r} is both whole and stacked")

# family -> native template -> (foreign template, its part index, every part's template): what
# a native key is written into in the family's transformers layout when that stacks it.
HF_DECODER_MERGES: dict[str, dict[str, tuple[str, int, tuple[str, ...]]]] = {
    name: {part: (source, index, tuple(parts))
           for source, parts in family.hf_fused_keys.items()
           for index, part in enumerate(parts)}
    for name, family in DECODER_FAMILIES.items() if family.hf_fused_keys}

HF_VISION_PREFIX = "vision_model."

# (the towers spelled as CLIP is; a family with transformers names of its own, DINOv2 and
# DINOv3, has its own table below)
HF_VISION_TO_NATIVE: dict[str, str] = union_key_map(
    ((name, family.hf_keys) for name, family in VISION_FAMILIES.items()
     if not family.own_hf_names), "hf vision")

# Top-level module names of a transformers 5 CLIPVisionModel / SiglipVisionModel, whose keys
# are saved without the ``vision_model.`` prefix.
HF_VISION_BARE_ROOTS: tuple[str, ...] = (
    "embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.", "head.",
)
HF_DECODER_PREFIX = "model."
# Top-level module names of a bare transformers decoder (``LlamaModel``, ``Qwen2Model``, ...
# saved on their own, without a ``*ForCausalLM`` around them), whose keys lack ``model.``.
HF_DECODER_BARE_ROOTS: tuple[str, ...] = ("embed_tokens.", "layers.", "norm.")

# A multimodal checkpoint whose text half a decoder family reads, or whose vision part a tower
# family reads (Gemma 3's Gemma3ForConditionalGeneration): kind -> its key prefix -> the
# part's own spelling, tried in order, from the family files' ``hf_wrapped`` entries.
HF_WRAPPED_PREFIXES: dict[str, dict[str, str]] = {"decoder": {}, "vision": {}}
for _family in (*DECODER_FAMILIES.values(), *VISION_FAMILIES.values()):
    for _wrapped in _family.hf_wrapped:
        for _prefix, _own in _wrapped.key_prefixes.items():
            if HF_WRAPPED_PREFIXES[_family.kind].setdefault(_prefix, _own) != _own:
                raise KeyMapError(f"wrapped key prefix {_prefix!r} renamed two ways")
HF_DECODER_WRAPPED_PREFIXES = HF_WRAPPED_PREFIXES["decoder"]

# kind -> (the prefix transformers' wrapper model adds, the roots of the bare model's keys).
# Bare keys are read by adding the prefix; the prefixed spelling, which loads into both the
# bare and the wrapped model, is the one written.
HF_BARE_ROOTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "vision": (HF_VISION_PREFIX, HF_VISION_BARE_ROOTS),
    "decoder": (HF_DECODER_PREFIX, HF_DECODER_BARE_ROOTS),
}

# Keys dropped on purpose: glob pattern (``*`` matches anything, dots included) -> reason.
DROPPED_KEYS: dict[tuple[str, str], dict[str, str]] = {
    ("decoder", "hf"): {
        "model.layers.*.self_attn.rotary_emb.inv_freq": "RoPE frequency buffer, recomputed",
        "model.rotary_emb.inv_freq": "RoPE frequency buffer, recomputed",
        # the other parts of a multimodal checkpoint whose text half is read
        **{pattern: reason for family in DECODER_FAMILIES.values()
           for wrapped in family.hf_wrapped for pattern, reason in wrapped.dropped.items()},
    },
    ("decoder", "meta"): {
        "rope.freqs": "RoPE frequency buffer, recomputed",
    },
    ("vision", "hf"): {pattern: reason for family in VISION_FAMILIES.values()
                       for pattern, reason in (
                           *family.hf_dropped.items(),
                           *(item for wrapped in family.hf_wrapped
                             for item in wrapped.dropped.items()))},
}

# --------------------------------------------------------------------------------------------
# Derived tables.


def invert_key_map(table: Mapping[str, str]) -> dict[str, str]:
    """Invert a key table, checking it is one-to-one and keeps its layer placeholders.

    Args:
        table: foreign key template -> native key template.

    Returns:
        native key template -> foreign key template.

    Raises:
        KeyMapError: two keys map to one name, or one side of an entry has a ``{i}`` layer
            placeholder and the other does not.
    """
    inverse: dict[str, str] = {}
    for source, target in table.items():
        if source.count(LAYER) != target.count(LAYER) or source.count(LAYER) > 1:
            raise KeyMapError(
                f"key map entry {source!r} -> {target!r} must carry one {LAYER} on both sides "
                "or none"
            )
        if target in inverse:
            raise KeyMapError(
                f"key map is not one-to-one: {inverse[target]!r} and {source!r} both map to "
                f"{target!r}"
            )
        inverse[target] = source
    return inverse


def _identity_map(templates: Iterable[str]) -> dict[str, str]:
    return {template: template for template in templates}


# (kind, layout) -> foreign template -> native template.
TO_NATIVE: dict[tuple[str, str], dict[str, str]] = {
    ("decoder", "native"): _identity_map(NATIVE_DECODER_KEYS),
    ("decoder", "hf"): HF_DECODER_TO_NATIVE,
    ("decoder", "meta"): META_DECODER_TO_NATIVE,
    ("vision", "native"): _identity_map(NATIVE_VISION_KEYS),
    ("vision", "hf"): HF_VISION_TO_NATIVE,
}
FROM_NATIVE: dict[tuple[str, str], dict[str, str]] = {
    kind_layout: invert_key_map(table) for kind_layout, table in TO_NATIVE.items()
}
# Vision families whose transformers names differ from CLIP's and SigLIP's: family -> foreign
# template -> native template. Reading tries them after the CLIP/SigLIP table (their foreign
# names are distinct); writing takes the family's own table.
HF_VISION_FAMILY_TO_NATIVE: dict[str, dict[str, str]] = {
    name: dict(family.hf_keys) for name, family in VISION_FAMILIES.items()
    if family.own_hf_names}
HF_VISION_FAMILY_FROM_NATIVE: dict[str, dict[str, str]] = {
    family: invert_key_map(table) for family, table in HF_VISION_FAMILY_TO_NATIVE.items()
}
HF_DECODER_FAMILY_FROM_NATIVE: dict[str, dict[str, str]] = {
    family: invert_key_map(table) for family, table in HF_DECODER_FAMILY_TO_NATIVE.items()
}
# (kind, family) -> that family's own table, both ways
_OWN_TO_NATIVE = {**{("vision", f): t for f, t in HF_VISION_FAMILY_TO_NATIVE.items()},
                  **{("decoder", f): t for f, t in HF_DECODER_FAMILY_TO_NATIVE.items()}}
_OWN_FROM_NATIVE = {**{("vision", f): t for f, t in HF_VISION_FAMILY_FROM_NATIVE.items()},
                    **{("decoder", f): t for f, t in HF_DECODER_FAMILY_FROM_NATIVE.items()}}
_HF_DECODER_LAYOUT_MARKERS: dict[str, tuple[str, ...]] = {
    name: family.hf_layout_markers for name, family in DECODER_FAMILIES.items()
    if family.own_hf_names}
_NATIVE_TEMPLATES = {"decoder": set(NATIVE_DECODER_KEYS), "vision": set(NATIVE_VISION_KEYS)}
for (_kind, _layout), _table in [*TO_NATIVE.items(), *(
        (("vision", family), table) for family, table in HF_VISION_FAMILY_TO_NATIVE.items()), *(
        (("decoder", family), table) for family, table in HF_DECODER_FAMILY_TO_NATIVE.items())]:
    _strays = set(_table.values()) - _NATIVE_TEMPLATES[_kind]
    assert not _strays, f"{_kind}/{_layout} key map names non-native keys: {sorted(_strays)}"

_strays = {part for parts in HF_DECODER_SPLITS.values() for part in parts} - set(
    NATIVE_DECODER_KEYS)
assert not _strays, f"stacked hf decoder keys name non-native keys: {sorted(_strays)}"
assert all(source.count(LAYER) == part.count(LAYER) <= 1
           for source, parts in HF_DECODER_SPLITS.items() for part in parts), (
    "a stacked key and its parts must carry one {i} on both sides or none")

_FUSED_DECODER_TEMPLATES = frozenset(NATIVE_DECODER_KEYS) | frozenset(NATIVE_FUSION_KEYS)

# A layer index: a run of digits between dots.
_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def split_layer_index(key: str) -> tuple[str, str | None]:
    """Split a key into its template and its layer index.

    ``"model.layers.12.mlp.up_proj.weight"`` -> ``("model.layers.{i}.mlp.up_proj.weight",
    "12")``; a key with no index comes back whole with ``None``. A key with two indices keeps
    them (no table has such a template, so it stays unknown).
    """
    indices = _LAYER_INDEX.findall(key)
    if len(indices) != 1:
        return key, None
    return _LAYER_INDEX.sub(LAYER, key), indices[0]


def _fill(template: str, index: str | None) -> str:
    return template if index is None else template.replace(LAYER, index)


def _check_kind_layout(kind: str, layout: str) -> None:
    if kind not in KINDS:
        raise KeyMapError(f"unknown model kind {kind!r}; valid: {', '.join(KINDS)}")
    if layout not in LAYOUTS:
        raise KeyMapError(f"unknown key layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if kind == "fused" and layout not in FUSED_LAYOUTS:
        raise KeyMapError(f"fused checkpoints have the native and mllama layouts, not {layout!r}")
    if kind != "fused" and (kind, layout) not in TO_NATIVE:
        raise KeyMapError(f"there is no {layout!r} layout for a {kind} model")


def _normalize_hf_key(key: str, layout: str, kind: str) -> str:
    """A bare transformers key with its wrapper's prefix added, a multimodal checkpoint's
    text-half key in the decoder's own spelling (other keys as they are)."""
    if layout != "hf" or kind not in HF_BARE_ROOTS:
        return key
    unwrapped = unwrapped_hf_key(key, kind)
    if unwrapped != key:
        return unwrapped
    prefix, roots = HF_BARE_ROOTS[kind]
    if not key.startswith(prefix) and key.startswith(roots):
        return prefix + key
    return key


def dropped_reason(key: str, layout: str, kind: str = "decoder") -> str | None:
    """Why ``key`` of a ``kind`` checkpoint in ``layout`` is dropped on purpose, or None."""
    key = _normalize_hf_key(key, layout, kind)
    for pattern, reason in DROPPED_KEYS.get((kind, layout), {}).items():
        if fnmatchcase(key, pattern):
            return reason
    return None


def _fused_key_is_known(key: str) -> bool:
    if key.startswith(FUSED_ENCODER_PREFIX):
        # Encoder internals belong to whichever encoder the fused model was built with
        # (fusesurgery's ``encoder.vision``, torchtune's tiled ``encoder.clip``); they pass
        # through unchanged, so nothing is lost by not knowing each one.
        return True
    if key.startswith(FUSED_DECODER_PREFIX):
        template, _ = split_layer_index(key.removeprefix(FUSED_DECODER_PREFIX))
        return template in _FUSED_DECODER_TEMPLATES
    return False


def _lookup(key: str, table: Mapping[str, str]) -> str | None:
    template, index = split_layer_index(key)
    target = table.get(template)
    return None if target is None else _fill(target, index)


def hf_decoder_family_of(keys: Iterable[str]) -> str | None:
    """The decoder family with transformers names of its own (``own_hf_names``) whose layout
    markers a transformers key set holds, or None: the shared table reads it. Of families
    sharing markers (Gemma 2 and 3), the first whose table names every key."""
    keys = list(keys)
    templates = {split_layer_index(_normalize_hf_key(key, "hf", "decoder"))[0] for key in keys}
    marked = [family for family, markers in _HF_DECODER_LAYOUT_MARKERS.items()
              if templates & set(markers)]
    for family in marked:
        table = HF_DECODER_FAMILY_TO_NATIVE[family]
        if all(template in table or dropped_reason(key, "hf") is not None
               for key, template in zip(keys, _templates_of(keys), strict=True)):
            return family
    return marked[0] if marked else None


def unwrapped_hf_key(key: str, kind: str = "decoder") -> str:
    """A multimodal checkpoint's key of its ``kind`` part in that part's own transformers
    spelling (``language_model.model.norm.weight`` -> ``model.norm.weight``: what the text
    model alone loads; ``vision_tower.encoder.*`` -> ``vision_model.encoder.*``); any other
    key as it is."""
    for wrapped, own in HF_WRAPPED_PREFIXES.get(kind, {}).items():
        if key.startswith(wrapped):
            return own + key.removeprefix(wrapped)
    return key


def holds_wrapped_tower(keys: Iterable[str]) -> bool:
    """The keys hold a multimodal checkpoint's vision part that a tower family reads (a
    Gemma3ForConditionalGeneration's SigLIP tower)."""
    prefixes = tuple(HF_WRAPPED_PREFIXES["vision"])
    return bool(prefixes) and any(key.startswith(prefixes) for key in keys)


def is_wrapped_decoder(keys: Iterable[str]) -> bool:
    """The keys are a multimodal checkpoint whose text half a decoder family reads (a
    Gemma3ForConditionalGeneration's): some carry a wrapped prefix, and the text half holds
    the layout markers of a family that declares that wrapping."""
    keys = list(keys)
    prefixes = {prefix for prefix in HF_DECODER_WRAPPED_PREFIXES
                if any(key.startswith(prefix) for key in keys)}
    family = hf_decoder_family_of(keys) if prefixes else None
    return family is not None and any(
        prefixes & set(wrapped.key_prefixes)
        for wrapped in DECODER_FAMILIES[family].hf_wrapped)


def _templates_of(keys: list[str]) -> list[str]:
    return [split_layer_index(_normalize_hf_key(key, "hf", "decoder"))[0] for key in keys]


def to_native_key(key: str, layout: str, kind: str = "decoder",
                  family: str | None = None) -> str | None:
    """The native name of one key.

    Args:
        key: a state-dict key in ``layout``.
        layout: ``"native"``, ``"hf"`` or ``"meta"``.
        kind: ``"decoder"``, ``"vision"`` or ``"fused"``.
        family: the checkpoint's family, for a decoder family with transformers names of its
            own (``HF_DECODER_FAMILY_TO_NATIVE``: Gemma's norms), whose keys only its table
            reads right; None or another family reads with the shared table.

    Returns:
        The native key, or None when the key is dropped on purpose (see ``DROPPED_KEYS``).

    Raises:
        KeyMapError: the key is unknown to the map, or the kind/layout pair does not exist.
    """
    _check_kind_layout(kind, layout)
    if layout == "mllama":
        raise KeyMapError("Mllama keys map only as a whole set (keys_to_native): their layer "
                          "numbers depend on where the cross-attention layers are")
    if kind == "fused":
        if _fused_key_is_known(key):
            return key
        raise KeyMapError(f"unknown key {key!r} for a fused checkpoint (native layout)")
    table = TO_NATIVE[kind, layout]
    if layout == "hf" and (kind, family) in _OWN_TO_NATIVE and kind == "decoder":
        table = _OWN_TO_NATIVE[kind, family]
    native = _lookup(_normalize_hf_key(key, layout, kind), table)
    if native is not None:
        return native
    if kind == "vision" and layout == "hf":
        for table in HF_VISION_FAMILY_TO_NATIVE.values():
            native = _lookup(key, table)
            if native is not None:
                return native
    if dropped_reason(key, layout, kind) is not None:
        return None
    raise KeyMapError(f"unknown key {key!r} for a {kind} checkpoint in the {layout} layout")


def to_native_parts(key: str, layout: str, kind: str = "decoder") -> tuple[str, ...] | None:
    """The native keys whose rows one foreign tensor stacks, in order (Phi-3's
    ``model.layers.0.self_attn.qkv_proj.weight`` -> ``layers.0.attn.q_proj.weight``, ``k_proj``,
    ``v_proj``), or None for a key that is not such a tensor."""
    if kind != "decoder" or layout != "hf":
        return None
    template, index = split_layer_index(_normalize_hf_key(key, layout, kind))
    parts = HF_DECODER_SPLITS.get(template)
    return None if parts is None else tuple(_fill(part, index) for part in parts)


@dataclass(frozen=True)
class StackedKey:
    """Where a native key lies in a foreign tensor that stacks several native ones.

    Args:
        key: the foreign tensor's key.
        index: this native key's place among the parts.
        parts: every part's native key, in the order their rows are stacked.
    """

    key: str
    index: int
    parts: tuple[str, ...]


def stacked_key(key: str, layout: str, kind: str = "decoder",
                family: str | None = None) -> StackedKey | None:
    """The foreign tensor ``family``'s ``layout`` stacks native ``key`` into (Phi-3's
    ``layers.0.attn.k_proj.weight`` -> ``qkv_proj``, part 1 of 3), or None when it is written
    on its own."""
    if kind != "decoder" or layout != "hf" or family not in HF_DECODER_MERGES:
        return None
    template, index = split_layer_index(key)
    found = HF_DECODER_MERGES[family].get(template)
    if found is None:
        return None
    source, position, parts = found
    return StackedKey(_fill(source, index), position,
                      tuple(_fill(part, index) for part in parts))


def from_native_key(key: str, layout: str, kind: str = "decoder",
                    family: str | None = None) -> str:
    """The ``layout`` name of one native key.

    Args:
        key: a native state-dict key.
        layout: the target layout, ``"native"``, ``"hf"`` or ``"meta"``.
        kind: ``"decoder"``, ``"vision"`` or ``"fused"``.
        family: the model's family, for a family with transformers names of its own
            (``HF_VISION_FAMILY_TO_NATIVE``, ``HF_DECODER_FAMILY_TO_NATIVE``) and for a decoder
            family that stacks native tensors (Phi-3: q/k/v go into ``qkv_proj``, which is the
            name returned, for each part); None or another family takes the shared names
            (CLIP's, Llama's).

    Raises:
        KeyMapError: the key is not a native key of that kind, or has no name in ``layout``
            (e.g. Qwen2's q bias in the Meta layout).
    """
    _check_kind_layout(kind, layout)
    if layout == "mllama":
        raise KeyMapError("native keys map to Mllama names with the fusion layers known: see "
                          "fusesurgery.convert.mllama.native_to_mllama")
    if kind == "fused":
        if _fused_key_is_known(key):
            return key
        raise KeyMapError(f"unknown key {key!r} for a fused checkpoint (native layout)")
    stacked = stacked_key(key, layout, kind, family)
    if stacked is not None:
        return stacked.key
    table = FROM_NATIVE[kind, layout]
    if layout == "hf" and (kind, family) in _OWN_FROM_NATIVE:
        table = _OWN_FROM_NATIVE[kind, family]
    foreign = _lookup(key, table)
    if foreign is None:
        raise KeyMapError(f"native {kind} key {key!r} has no name in the {layout} layout")
    return foreign


@dataclass(frozen=True)
class KeyMapping:
    """How a whole set of keys maps, and what was dropped on the way.

    Args:
        mapping: source key -> target key, in the order the source keys came.
        dropped: source key -> why it was dropped.
        parts: source key -> the target keys whose rows it stacks, in order, for a source
            tensor that holds several (Phi-3's ``qkv_proj``); such a key is not in
            ``mapping``.
    """

    mapping: dict[str, str]
    dropped: dict[str, str]
    parts: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def sources(self) -> dict[str, str]:
        """target key -> the source key holding it (a stacked part: the stacked tensor)."""
        out = {target: source for source, target in self.mapping.items()}
        for source, targets in self.parts.items():
            out.update(dict.fromkeys(targets, source))
        return out


def _describe_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{shown}{more}"


def _map_all(
    keys: Iterable[str],
    map_one: Callable[[str], str | None],
    why_dropped: Callable[[str], str],
    what: str,
) -> KeyMapping:
    mapping: dict[str, str] = {}
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    claimed: dict[str, str] = {}
    for key in keys:
        try:
            target = map_one(key)
        except KeyMapError:
            unknown.append(key)
            continue
        if target is None:
            dropped[key] = why_dropped(key)
            continue
        if target in claimed:
            raise KeyMapError(
                f"keys {claimed[target]!r} and {key!r} both map to {target!r}; the checkpoint "
                "holds the same tensor twice under two spellings"
            )
        claimed[target] = key
        mapping[key] = target
    if unknown:
        raise KeyMapError(f"{len(unknown)} keys unknown to the {what}: {_describe_keys(unknown)}")
    return KeyMapping(mapping=mapping, dropped=dropped)


# kind -> key patterns dropped as another part of a multimodal checkpoint (Gemma 3's tower
# beside its text half): dropped only where the key set is such a checkpoint.
_WRAPPED_DROPPED: dict[str, tuple[str, ...]] = {
    kind: tuple(pattern for family in families.values() for wrapped in family.hf_wrapped
                for pattern in wrapped.dropped)
    for kind, families in (("decoder", DECODER_FAMILIES), ("vision", VISION_FAMILIES))}


def _check_wrapped_drops(keys: list[str], result: KeyMapping, layout: str, kind: str) -> None:
    """The other parts of a multimodal checkpoint are dropped only from one (a key carries a
    wrapped prefix of the part read): beside a plain checkpoint, such keys are unknown.

    Raises:
        KeyMapError: keys dropped as another part in a key set that is no multimodal one.
    """
    if layout != "hf" or not _WRAPPED_DROPPED.get(kind):
        return
    if any(key.startswith(tuple(HF_WRAPPED_PREFIXES[kind])) for key in keys):
        return
    strays = [key for key in result.dropped
              if any(fnmatchcase(key, pattern) for pattern in _WRAPPED_DROPPED[kind])]
    if strays:
        raise KeyMapError(f"{len(strays)} keys unknown to the {kind} {layout} key map: "
                          f"{_describe_keys(strays)}")


def keys_to_native(keys: Iterable[str], layout: str, kind: str = "decoder") -> KeyMapping:
    """Map every key of a checkpoint to its native name. A transformers decoder key set
    holding a family's layout markers (:func:`hf_decoder_family_of`) maps with that family's
    own table.

    Args:
        keys: the checkpoint's keys (a state dict or a ``{name: TensorInfo}`` dict works too).
        layout: the checkpoint's layout.
        kind: ``"decoder"``, ``"vision"`` or ``"fused"``.

    Returns:
        source key -> native key, plus the keys dropped on purpose with their reasons.

    Raises:
        KeyMapError: some keys are unknown (the message shows the first few and the count), or
            two keys map to one native name.
    """
    _check_kind_layout(kind, layout)
    if layout == "mllama":
        mapping, dropped = mllama_to_native(keys)
        return KeyMapping(mapping=mapping, dropped=dropped)
    keys = list(keys)
    family = hf_decoder_family_of(keys) if (kind, layout) == ("decoder", "hf") else None
    whole, parts = [], {}
    for key in keys:
        stacked = to_native_parts(key, layout, kind)
        if stacked is None:
            whole.append(key)
        else:
            parts[key] = stacked
    result = _map_all(
        whole,
        lambda key: to_native_key(key, layout, kind, family),
        lambda key: dropped_reason(key, layout, kind) or "dropped",
        f"{kind} {layout} key map",
    )
    _check_wrapped_drops(keys, result, layout, kind)
    claimed = {target: source for source, target in result.mapping.items()}
    for source, targets in parts.items():
        for target in targets:
            if target in claimed:
                raise KeyMapError(
                    f"keys {claimed[target]!r} and {source!r} both hold {target!r}; the "
                    "checkpoint holds the same tensor twice under two spellings")
            claimed[target] = source
    return dataclasses.replace(result, parts=parts)


def keys_from_native(keys: Iterable[str], layout: str, kind: str = "decoder",
                     family: str | None = None) -> KeyMapping:
    """Map every native key to its name in ``layout`` (nothing is dropped this way); ``family``
    as for :func:`from_native_key`.

    Raises:
        KeyMapError: some keys are not native keys of that kind or have no ``layout`` name.
    """
    _check_kind_layout(kind, layout)
    return _map_all(
        keys,
        lambda key: from_native_key(key, layout, kind, family),
        lambda key: "dropped",
        f"native {kind} key map (to {layout})",
    )


__all__ = [
    "DROPPED_KEYS",
    "FROM_NATIVE",
    "HF_DECODER_BARE_ROOTS",
    "HF_DECODER_FAMILY_FROM_NATIVE",
    "HF_DECODER_FAMILY_TO_NATIVE",
    "HF_DECODER_MERGES",
    "HF_DECODER_PREFIX",
    "HF_DECODER_SPLITS",
    "HF_DECODER_TO_NATIVE",
    "HF_VISION_FAMILY_FROM_NATIVE",
    "HF_VISION_FAMILY_TO_NATIVE",
    "HF_VISION_TO_NATIVE",
    "KINDS",
    "LAYOUTS",
    "META_DECODER_TO_NATIVE",
    "NATIVE_DECODER_KEYS",
    "NATIVE_FUSION_KEYS",
    "NATIVE_VISION_KEYS",
    "TO_NATIVE",
    "KeyMapping",
    "StackedKey",
    "Kind",
    "Layout",
    "dropped_reason",
    "from_native_key",
    "hf_decoder_family_of",
    "invert_key_map",
    "keys_from_native",
    "keys_to_native",
    "split_layer_index",
    "stacked_key",
    "to_native_key",
    "to_native_parts",
]

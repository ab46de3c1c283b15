"""transformers' Mllama (Llama 3.2 Vision) layout of a fused decoder, both ways.

Mllama keeps its cross-attention layers as extra entries of one layer list
(``text_config.cross_attention_layers``, e.g. 3, 8, 13, ... for 11B). HF layer ``L`` is native
layer ``L - #(cross layers < L)``; a cross layer's keys go under the ``fusion_layer.`` of the
native layer that follows it (fusion before the original layer). The embedding is one
``[vocab + 8, d]`` table: rows ``[0, vocab)`` are the original table, the last 8 the fusion
tokens. The vision tower and ``multi_modal_projector`` have no native module here; they travel
as opaque ``encoder.*`` tensors under their own names.

Key tables are data (one per layer kind); the layer renumbering is the only code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fusesurgery.errors import KeyMapError

MLLAMA_EXTRA_ROWS = 8  # transformers' MllamaTextModel: nn.Embedding(vocab_size + 8, d)
MLLAMA_GATE_SHAPE = (1,)

# Self-attention layer: Mllama local name -> native local name.
MLLAMA_SELF_LAYER: dict[str, str] = {
    "input_layernorm.weight": "sa_norm.scale",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.output_proj.weight",
    "post_attention_layernorm.weight": "mlp_norm.scale",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
}
# Cross-attention layer: Mllama local name -> native local name under ``fusion_layer.``.
MLLAMA_CROSS_LAYER: dict[str, str] = {
    "input_layernorm.weight": "ca_norm.scale",
    "cross_attn.q_proj.weight": "attn.q_proj.weight",
    "cross_attn.k_proj.weight": "attn.k_proj.weight",
    "cross_attn.v_proj.weight": "attn.v_proj.weight",
    "cross_attn.o_proj.weight": "attn.output_proj.weight",
    "cross_attn.q_norm.weight": "attn.q_norm.scale",
    "cross_attn.k_norm.weight": "attn.k_norm.scale",
    "cross_attn_attn_gate": "ca_scale.scale",
    "post_attention_layernorm.weight": "mlp_norm.scale",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
    "cross_attn_mlp_gate": "mlp_scale.scale",
}
# Outside the layers: Mllama local name (under the text model) -> native fused name.
MLLAMA_TEXT_GLOBALS: dict[str, str] = {
    "embed_tokens.weight": "decoder.tok_embeddings.weight",  # the whole [vocab + 8, d] table
    "norm.weight": "decoder.norm.scale",
}
MLLAMA_DROPPED: dict[str, str] = {
    "rotary_emb.inv_freq": "RoPE frequency buffer, recomputed",
}
FUSED_EMBEDDING = "decoder.tok_embeddings.weight"
FUSED_FUSION_EMBEDDING = "decoder.tok_embeddings.fusion_embedding.weight"
# Opaque encoder tensors keep their transformers-4 names under ``encoder.``.
MLLAMA_VISION_ROOTS: tuple[str, ...] = ("vision_model.", "multi_modal_projector.")
OPAQUE_ENCODER_PREFIX = "encoder."


def split_embedding_shapes(shapes: dict, names: dict) -> None:
    """Mllama's one ``[vocab + 8, d]`` table as the native fused pair, in a native key ->
    shape dict: the original rows and the fusion tokens (both read from the one source
    tensor, whose name ``names`` gives for both).

    Raises:
        KeyMapError: a table with no more than 8 rows.
    """
    rows, dim = shapes[FUSED_EMBEDDING]
    if rows <= MLLAMA_EXTRA_ROWS:
        raise KeyMapError(f"{names.get(FUSED_EMBEDDING, FUSED_EMBEDDING)} has {rows} rows; an "
                          f"Mllama table has vocab + {MLLAMA_EXTRA_ROWS}")
    shapes[FUSED_EMBEDDING] = (rows - MLLAMA_EXTRA_ROWS, dim)
    shapes[FUSED_FUSION_EMBEDDING] = (MLLAMA_EXTRA_ROWS, dim)
    if FUSED_EMBEDDING in names:
        names[FUSED_FUSION_EMBEDDING] = names[FUSED_EMBEDDING]


def _check_one_to_one(*tables: Mapping[str, str]) -> None:
    for table in tables:
        if len(set(table.values())) != len(table):
            raise KeyMapError("an Mllama key table is not one-to-one")  # caught at import


_check_one_to_one(MLLAMA_SELF_LAYER, MLLAMA_CROSS_LAYER, MLLAMA_TEXT_GLOBALS)
NATIVE_TO_MLLAMA_SELF = {v: k for k, v in MLLAMA_SELF_LAYER.items()}
NATIVE_TO_MLLAMA_CROSS = {v: k for k, v in MLLAMA_CROSS_LAYER.items()}
NATIVE_TO_MLLAMA_GLOBALS = {v: k for k, v in MLLAMA_TEXT_GLOBALS.items()}


@dataclass(frozen=True)
class MllamaSpelling:
    """Where a checkpoint keeps its text model, its LM head and its vision side.

    Args:
        name: ``causal`` (``MllamaForCausalLM``), ``conditional`` (transformers 4's
            ``MllamaForConditionalGeneration``), ``conditional-v5`` (its transformers 5 names).
        text: prefix of the text model's keys.
        head: the LM head's key.
        vision: prefix put before the vision roots.
    """

    name: str
    text: str
    head: str
    vision: str


SPELLINGS: tuple[MllamaSpelling, ...] = (
    MllamaSpelling("conditional", "language_model.model.", "language_model.lm_head.weight", ""),
    MllamaSpelling("conditional-v5", "model.language_model.", "lm_head.weight", "model."),
    MllamaSpelling("causal", "model.", "lm_head.weight", ""),
)


def is_mllama_keys(keys: Iterable[str]) -> bool:
    """Whether the keys are an Mllama checkpoint's (a cross-attention gate is the mark)."""
    return any(key.endswith(".cross_attn_attn_gate") for key in keys)


def mllama_spelling(keys: Iterable[str]) -> MllamaSpelling:
    """Which spelling the keys use.

    Raises:
        KeyMapError: none fits.
    """
    keys = list(keys)
    for spelling in SPELLINGS:
        if any(key.startswith(spelling.text + "layers.") and key.endswith(".cross_attn_attn_gate")
               for key in keys):
            return spelling
    raise KeyMapError("no Mllama text model found among the keys")


def cross_layers_of(keys: Iterable[str], spelling: MllamaSpelling) -> tuple[int, ...]:
    """The HF indices of the cross-attention layers, from the gate keys."""
    prefix = spelling.text + "layers."
    found = set()
    for key in keys:
        if key.startswith(prefix) and key.endswith(".cross_attn_attn_gate"):
            found.add(int(key[len(prefix):].split(".", 1)[0]))
    return tuple(sorted(found))


def native_index(hf_layer: int, cross_layers: Sequence[int]) -> int:
    """The native layer an HF layer belongs to (a cross layer: the one it runs before)."""
    return hf_layer - sum(1 for c in cross_layers if c < hf_layer)


def hf_cross_layers(fusion_layers: Sequence[int]) -> tuple[int, ...]:
    """Mllama's ``cross_attention_layers`` for native fusion layers (fusion before the layer):
    native layer ``f`` gets its cross layer at HF index ``f + #(fusion layers < f)``."""
    ordered = sorted(fusion_layers)
    return tuple(f + i for i, f in enumerate(ordered))


def hf_self_layer(native: int, fusion_layers: Sequence[int]) -> int:
    """The HF index of native self-attention layer ``native``."""
    return native + sum(1 for f in fusion_layers if f <= native)


def mllama_to_native(keys: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Map an Mllama checkpoint's keys to the native fused names.

    Returns:
        ``(source key -> fused key, dropped source key -> reason)``; the embedding maps to
        ``decoder.tok_embeddings.weight`` whole (its split is the plan's).

    Raises:
        KeyMapError: a key no table knows.
    """
    keys = list(keys)
    spelling = mllama_spelling(keys)
    cross = set(cross_layers_of(keys, spelling))
    layer_prefix = spelling.text + "layers."
    hf_layers = {int(key[len(layer_prefix):].split(".", 1)[0]) for key in keys
                 if key.startswith(layer_prefix) and key[len(layer_prefix):].split(".", 1)[0]
                 .isdigit()}
    trailing = [c for c in cross if c + 1 not in hf_layers or c + 1 in cross]
    if trailing:
        raise KeyMapError(f"Mllama cross-attention layer {trailing[0]} is not followed by a "
                          "self-attention layer; a fusion layer runs before a decoder layer")
    mapping: dict[str, str] = {}
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        if key == spelling.head:
            mapping[key] = "decoder.output.weight"
        elif key.startswith(layer_prefix):
            index, _, local = key[len(layer_prefix):].partition(".")
            if not index.isdigit():
                unknown.append(key)
                continue
            hf_layer = int(index)
            table = MLLAMA_CROSS_LAYER if hf_layer in cross else MLLAMA_SELF_LAYER
            if local in table:
                native = native_index(hf_layer, sorted(cross))
                middle = "fusion_layer." if hf_layer in cross else ""
                mapping[key] = f"decoder.layers.{native}.{middle}{table[local]}"
            elif any(local.endswith(k) for k in MLLAMA_DROPPED):
                dropped[key] = next(v for k, v in MLLAMA_DROPPED.items() if local.endswith(k))
            else:
                unknown.append(key)
        elif key.startswith(spelling.text):
            local = key[len(spelling.text):]
            if local in MLLAMA_TEXT_GLOBALS:
                mapping[key] = MLLAMA_TEXT_GLOBALS[local]
            elif local in MLLAMA_DROPPED:
                dropped[key] = MLLAMA_DROPPED[local]
            else:
                unknown.append(key)
        elif key.removeprefix(spelling.vision).startswith(MLLAMA_VISION_ROOTS):
            mapping[key] = OPAQUE_ENCODER_PREFIX + key.removeprefix(spelling.vision)
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5
                                          else "")
        raise KeyMapError(f"{len(unknown)} keys unknown to the Mllama key map: {shown}")
    return mapping, dropped


def native_to_mllama(fused_key: str, fusion_layers: Sequence[int],
                     spelling: MllamaSpelling = SPELLINGS[-1]) -> str:
    """The Mllama name of a native fused key (the embedding: the merged table's).

    Raises:
        KeyMapError: a key with no Mllama name.
    """
    if fused_key == "decoder.output.weight":
        return spelling.head
    if fused_key in NATIVE_TO_MLLAMA_GLOBALS:
        return spelling.text + NATIVE_TO_MLLAMA_GLOBALS[fused_key]
    if fused_key.startswith("decoder.layers."):
        index, _, local = fused_key.removeprefix("decoder.layers.").partition(".")
        native = int(index)
        if local.startswith("fusion_layer."):
            local = local.removeprefix("fusion_layer.")
            if local in NATIVE_TO_MLLAMA_CROSS and native in fusion_layers:
                hf = native + sum(1 for f in fusion_layers if f < native)
                return f"{spelling.text}layers.{hf}.{NATIVE_TO_MLLAMA_CROSS[local]}"
        elif local in NATIVE_TO_MLLAMA_SELF:
            return f"{spelling.text}layers.{hf_self_layer(native, fusion_layers)}." \
                   f"{NATIVE_TO_MLLAMA_SELF[local]}"
    if fused_key.startswith(OPAQUE_ENCODER_PREFIX) and fused_key.removeprefix(
            OPAQUE_ENCODER_PREFIX).startswith(MLLAMA_VISION_ROOTS):
        return spelling.vision + fused_key.removeprefix(OPAQUE_ENCODER_PREFIX)
    raise KeyMapError(f"{fused_key!r} has no name in the Mllama layout")


def mllama_text_config(config: Mapping) -> Mapping:
    """The text model's section of an Mllama config.json (``text_config``, or the file itself
    for an ``MllamaForCausalLM``)."""
    text = config.get("text_config")
    return text if isinstance(text, Mapping) else config


def is_mllama_config(config: Mapping | None) -> bool:
    if not isinstance(config, Mapping):
        return False
    model_type = config.get("model_type")
    return model_type in ("mllama", "mllama_text_model") or "cross_attention_layers" in (
        mllama_text_config(config))


__all__ = [
    "MLLAMA_CROSS_LAYER",
    "MLLAMA_EXTRA_ROWS",
    "MLLAMA_SELF_LAYER",
    "MLLAMA_TEXT_GLOBALS",
    "SPELLINGS",
    "MllamaSpelling",
    "cross_layers_of",
    "hf_cross_layers",
    "hf_self_layer",
    "is_mllama_config",
    "is_mllama_keys",
    "mllama_spelling",
    "mllama_text_config",
    "mllama_to_native",
    "native_index",
    "native_to_mllama",
    "split_embedding_shapes",
]

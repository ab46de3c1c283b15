"""The model card (``README.md``) of a pushed fused checkpoint, built with huggingface_hub's
``ModelCard`` / ``ModelCardData`` so that its YAML metadata is the client's own rendering.

The metadata names both sources as ``base_model`` with ``base_model_relation: finetune``. The
Hub infers ``merge`` when a card lists several base models and no relation; a merge (mergekit's
sense) combines the weights of several models into one set, which is not what a fusion does.
The documented values are ``adapter``, ``merge``, ``quantized`` and ``finetune``; a fused
checkpoint keeps both sources' tensors unchanged, adds new parameters meant to be trained on
top of them, and is a complete model on its own (not an adapter loaded over a base), which is
what ``finetune`` describes: a model derived from its bases by further training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from fusesurgery._sizes import format_bytes
from fusesurgery.surgery.fused_config import FusedConfig

if TYPE_CHECKING:
    from fusesurgery.validate.checks import Check

BASE_MODEL_RELATION = "finetune"
PIPELINE_TAG = "image-text-to-text"
LIBRARY_NAME = "fusesurgery"
REASON_WHAT = (
    "no weights were merged: both sources' tensors are kept unchanged, and new gated "
    "cross-attention layers, token embeddings and a projection head were added to be trained "
    "on top of them; the checkpoint is a complete model, not an adapter loaded over a base."
)


def relation_reason(base_models: Sequence[str]) -> str:
    """Why the card sets ``base_model_relation: finetune``, for one base model or several."""
    if len(base_models) > 1:
        return ("`base_model_relation: finetune`: the Hub reads several base models without a "
                f"relation as a *merge*, but {REASON_WHAT}")
    return ("`base_model_relation: finetune`, set rather than left for the Hub to guess from "
            f"the files (a *merge* or an *adapter* would be wrong): {REASON_WHAT}")


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _source_line(part: str, record: Mapping[str, Any], hub_id: str | None,
                 config: FusedConfig, endpoint: str) -> str:
    family = record.get("family") or "?"
    if part == "decoder":
        d = config.decoder
        shape = f"{d.num_layers} layers, width {d.embed_dim}, vocab {d.vocab_size}"
    elif config.encoder is not None:
        e = config.encoder
        shape = f"{e.num_layers} layers, width {e.embed_dim}, {e.image_size}px images"
    else:
        shape = "Mllama vision model"
    # a local source is named by its last path component only: the card is public, the
    # user's directory layout is not
    local_name = PurePath(str(record.get("path", "?"))).name or "?"
    where = f"[`{hub_id}`]({endpoint}/{hub_id})" if hub_id else \
        f"`{local_name}` (a local checkpoint)"
    return f"| {part} | {where} | {_cell(family)} | {shape} |"


def _gate_state(config: FusedConfig, forward_checked: bool) -> str:
    values = [float(v) for v in config.gates.values()]
    if config.trained_originals:  # zero gates or not, the decoder is no longer the source's
        return (f"trained: {len(config.trained_originals)} original tensors differ from the "
                f"sources', {sum(v != 0.0 for v in values)} of {len(values)} gates nonzero")
    if not values:
        return "unknown (no gates recorded)"
    if all(v == 0.0 for v in values):
        if not forward_checked:
            return (f"all {len(values)} tanh gates exactly 0 (the forward checks that prove "
                    "the model computes what the decoder computed were not run: --quick)")
        return (f"all {len(values)} tanh gates exactly 0: the model computes exactly what the "
                "decoder computed")
    nonzero = sum(v != 0.0 for v in values)
    return (f"trained: {nonzero} of {len(values)} gates nonzero (|gate| up to "
            f"{max(abs(v) for v in values):.4g})")


def fusion_rows(config: FusedConfig, forward_checked: bool = True) -> list[tuple[str, str]]:
    """The fusion as (what, value) rows: layers, position, new tokens, projection, encoder
    layer, trainable parts and gate state (``forward_checked``: validate's forward checks
    ran, so a zero-gate identity was proven, not only read off the gates)."""
    fusion = config.fusion
    layers = ", ".join(map(str, fusion.fusion_layers))
    position = ("before the original layer (`fusion_first`)" if fusion.fusion_first
                else "after the original layer")
    tokens = ", ".join(f"`{t.token}` = {t.id}" for t in config.new_tokens) or "none"
    width = config.decoder.embed_dim
    if config.encoder is None:
        projection, layer = "Mllama's own projector", "Mllama's vision model"
    else:
        projection = (f"`{config.projection}`, {config.encoder.embed_dim} -> "
                      f"{fusion.encoder_dim}" if config.projection else "none")
        layer = ("final hidden states" if config.encoder.output_layer is None
                 else f"`hidden_states[{config.encoder.output_layer}]`")
    trainable = ("the fusion layers, the new token embeddings and the projection head; the "
                 "decoder and the vision encoder are frozen (torchtune's defaults)")
    return [
        ("fusion layers", f"{layers} (of {config.decoder.num_layers}), width {width}"),
        ("position", position),
        ("new tokens", f"{tokens} (input-only: the output projection is unchanged)"),
        ("projection", projection),
        ("encoder layer", layer),
        ("trainable", trainable),
        ("gates", _gate_state(config, forward_checked)),
        ("dtypes", ", ".join(f"{k} {v}" for k, v in config.dtypes.items()) or "as stored"),
    ]


def _relation(base_models: Sequence[str]) -> str:
    """What the card says of its ``base_model`` list (or of its absence)."""
    return relation_reason(base_models) if base_models else (
        "No `base_model` is listed: the sources were local checkpoints with no Hub id (push "
        "with `--base-model ID` for each source to name them).")


def _validation_section(name: str, validated_with: str, checks: Sequence[Check]) -> str:
    """How to repeat the checks, and the table of those run before the upload."""
    report = "\n".join(
        f"| {c.status.upper()} | {_cell(c.name)} | {_cell(c.figure)} | {_cell(c.detail)} |"
        for c in checks)
    return (f"`fusesurgery validate {name}/` repeats the checks below; `fusesurgery unfuse "
            f"{name}/ -o\n")+f"""decoder/` gives the original decoder back, bit for bit.

## Validation

Run by {validated_with} before the upload.

| status | check | figure | detail |
|---|---|---|---|
{report}"""


def build_model_card(
    config: FusedConfig,
    *,
    repo_id: str,
    base_models: Sequence[str],
    hub_ids: Mapping[str, str],
    checks: Sequence[Check],
    files: Sequence[tuple[str, int]],
    validated_with: str,
    forward_checked: bool = True,
    endpoint: str = "https://huggingface.co",
    license: str | None = None,
) -> Any:
    """The ``huggingface_hub.ModelCard`` of a fused checkpoint.

    Args:
        config: the checkpoint's ``fusion_config.json``.
        repo_id: where it is pushed (its title).
        base_models: Hub ids of the sources, decoder first; empty when none is known.
        hub_ids: ``{"decoder", "encoder"}`` -> Hub id, for the sources that have one.
        checks: the validation report's rows (``ValidationReport.checks``).
        files: ``(path in repo, size)`` of every uploaded file but the card.
        validated_with: what ran the checks (version, device), for the report's heading.
        forward_checked: validate's forward checks ran (not ``--quick``).
        endpoint: the Hub the links point to.
        license: an SPDX-style license id for the metadata, if the user gave one.

    Returns:
        A ``ModelCard``; ``str(card)`` is the README.md text.
    """
    from huggingface_hub import ModelCard, ModelCardData

    families = sorted({str(r.get("family")) for r in config.sources.values() if r.get("family")})
    extra: dict[str, Any] = {}
    if base_models:
        extra["base_model_relation"] = BASE_MODEL_RELATION
    data = ModelCardData(
        base_model=list(base_models) or None,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        license=license,
        tags=["fusesurgery", "torchtune", "deep-fusion", "cross-attention", "multimodal",
              "vision-language", "safetensors", *families],
        **extra,
    )
    name = repo_id.split("/")[-1]
    sources = "\n".join(_source_line(part, config.sources.get(part, {}), hub_ids.get(part),
                                     config, endpoint) for part in ("decoder", "encoder"))
    fusion = "\n".join(f"| {what} | {_cell(value)} |"
                       for what, value in fusion_rows(config, forward_checked))
    total = sum(size for _, size in files)
    relation = _relation(base_models)
    body = f"""
# {name}

A vision encoder fused into an LLM decoder, Flamingo / Llama 3.2 Vision style, by
fusesurgery {config.version or ''}: gated cross-attention fusion layers in the decoder, new
token embeddings in a second table, the original checkpoint keys unchanged (torchtune's fused
layout).

## Sources

| part | source | family | shape |
|---|---|---|---|
{sources}

{relation}

## The fusion

| | |
|---|---|
{fusion}

## Load it

```python
from huggingface_hub import snapshot_download
import fusesurgery

path = snapshot_download("{repo_id}")
model = fusesurgery.load_fused(path)      # a DeepFusionModel, trainable parts as above
```

{_validation_section(name, validated_with, checks)}

## Files

{len(files)} files besides this card, {format_bytes(total)}. `fusion_config.json` holds
everything needed to rebuild the model; `source/` keeps the sources' own config and tokenizer
files.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def build_export_card(
    document: Mapping[str, Any],
    *,
    repo_id: str,
    base_models: Sequence[str],
    checks: Sequence[Check],
    files: Sequence[tuple[str, int]],
    validated_with: str,
    license: str | None = None,
) -> Any:
    """The ``huggingface_hub.ModelCard`` of a transformers export (its config.json is
    ``document``); see :func:`build_model_card` for the other arguments."""
    from huggingface_hub import ModelCard, ModelCardData

    text, vision = document.get("text_config") or {}, document.get("vision_config") or {}
    families = sorted({str(c.get("model_type")) for c in (text, vision) if c.get("model_type")})
    extra: dict[str, Any] = {"base_model_relation": BASE_MODEL_RELATION} if base_models else {}
    data = ModelCardData(
        base_model=list(base_models) or None, library_name="transformers",
        pipeline_tag=PIPELINE_TAG, license=license,
        tags=["fusesurgery", "deep-fusion", "cross-attention", "multimodal", "vision-language",
              "safetensors", "custom_code", *families],
        **extra,
    )
    name = repo_id.split("/")[-1]
    tokens = ", ".join(f"`{t.get('token')}` = {t.get('id')}"
                       for t in document.get("new_tokens") or []) or "none"
    rows = [
        ("text model", f"{text.get('model_type')} ({text.get('num_hidden_layers')} layers, "
                       f"width {text.get('hidden_size')}, vocab {text.get('vocab_size')})"),
        ("vision tower", f"{vision.get('model_type')} ({vision.get('num_hidden_layers')} "
                         f"layers, width {vision.get('hidden_size')})"),
        ("fusion layers", f"{document.get('fusion_layers')} ("
                          f"{'before' if document.get('fusion_first') else 'after'} the "
                          "decoder layer)"),
        ("cross-attention", f"{document.get('fusion_num_heads')} heads, "
                            f"{document.get('fusion_num_kv_heads')} key-value heads, head "
                            f"width {document.get('fusion_head_dim')}, SwiGLU width "
                            f"{document.get('fusion_intermediate_size')}"),
        ("projection", f"{document.get('projection')} from the tower's "
                       + ("final hidden states" if document.get("vision_feature_layer") is None
                          else f"hidden_states[{document.get('vision_feature_layer')}]")),
        ("new tokens", tokens),
    ]
    fusion = "\n".join(f"| {what} | {_cell(value)} |" for what, value in rows)
    total = sum(size for _, size in files)
    relation = _relation(base_models)
    body = f"""
# {name}

A vision tower fused into a causal language model by gated cross-attention (Flamingo / Llama
3.2 Vision style) with fusesurgery, as a transformers model: the text model and the tower are
transformers' own classes with the sources' tensors unchanged; fusion adds the gated
cross-attention layers, the new tokens' embedding rows and a projection head.

{relation}

## The fusion

| | |
|---|---|
{fusion}

## Load it

```python
from transformers import AutoModelForImageTextToText

model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True)
```

{_validation_section(name, validated_with, checks)}

## Files

{len(files)} files besides this card, {format_bytes(total)}; `source/` keeps the sources' own
config and tokenizer files.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")

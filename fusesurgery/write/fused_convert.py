"""Fused checkpoints between layouts: fusesurgery's native fused layout and transformers'
Mllama (``MllamaForCausalLM``, or ``MllamaForConditionalGeneration`` when the Mllama vision
side travels with it), streaming, atomic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from fusesurgery import _json as standard_json
from fusesurgery.convert.configs import (
    config_style,
    hf_max_position_embeddings,
    hf_rope_scaling,
    set_hf_dtype,
)
from fusesurgery.convert.mllama import (
    FUSED_EMBEDDING,
    FUSED_FUSION_EMBEDDING,
    MLLAMA_EXTRA_ROWS,
    OPAQUE_ENCODER_PREFIX,
    SPELLINGS,
    hf_cross_layers,
    native_to_mllama,
)
from fusesurgery.convert.plan import PlanEntry, _rope_transform
from fusesurgery.convert.transforms import IDENTITY
from fusesurgery.errors import ConfigError
from fusesurgery.families import VISION_FAMILIES, decoder_family
from fusesurgery.io import TensorInfo
from fusesurgery.io.checkpoint import FUSION_CONFIG_FILE
from fusesurgery.surgery.fused import FusedView, open_fused
from fusesurgery.surgery.fused_config import SOURCE_FILES_DIR, FusedConfig
from fusesurgery.write.plan_sources import plan_entry_source
from fusesurgery.write.safetensors_writer import WriteResult, write_safetensors
from fusesurgery.write.shard_plan import DEFAULT_MAX_SHARD_SIZE
from fusesurgery.write.side_files import (
    DECODER_SIDE_FILES,
    HF_CONFIG_SIDE_FILE,
    TOKEN_ID_FIELDS,
    read_json_side_file,
    read_kept_source_files,
    read_side_files,
)

FUSED_TARGETS: tuple[str, ...] = ("native", "mllama")


def mllama_blockers(config: FusedConfig) -> list[str]:
    """What about a fused decoder transformers' Mllama cannot express (empty: nothing)."""
    d, f = config.decoder, config.fusion
    problems = []
    if not f.fusion_first:
        problems.append("its fusion layers run after their decoder layers (Mllama's run before)")
    if d.tie_word_embeddings:
        problems.append("its embeddings are tied (Mllama's LM head has vocab rows, its "
                        f"embedding vocab + {MLLAMA_EXTRA_ROWS})")
    if d.attn_bias:
        problems.append(f"its q/k/v projections have biases ({d.family})")
    family = decoder_family(d.family)
    if not family.mllama_text_model and not d.qk_norm:  # (q/k norms say why on their own)
        problems.append(f"it is a {family.display_name} decoder (Mllama's text model is a "
                        "Llama)")
    if d.qk_norm:
        problems.append(f"its self-attention normalises each q/k head ({d.family})")
    if d.no_rope_layers and family.mllama_text_model:
        problems.append(f"its layers {list(d.no_rope_layers)} apply no RoPE")
    if d.sliding_layers and family.mllama_text_model and d.sliding_window < d.max_seq_len:
        problems.append(f"its layers attend through a sliding window of {d.sliding_window} "
                        f"tokens (Mllama's attend to all {d.max_seq_len})")
    if f.fusion_vocab_size > MLLAMA_EXTRA_ROWS:
        problems.append(f"it has {f.fusion_vocab_size} new tokens (Mllama has room for "
                        f"{MLLAMA_EXTRA_ROWS})")
    if d.head_dim * d.num_heads != d.embed_dim:
        problems.append(f"its head_dim {d.head_dim} is not embed_dim / num_heads")
    if not (f.ca_norm_eps == f.qk_norm_eps == d.norm_eps):
        problems.append(f"its fusion norms' epsilons ({f.ca_norm_eps}, {f.qk_norm_eps}) differ "
                        f"from the decoder's {d.norm_eps} (Mllama has one rms_norm_eps)")
    return problems


def mllama_text_config_dict(config: FusedConfig, base: Mapping[str, Any] | None) -> dict:
    """A transformers ``MllamaTextConfig`` for the fused decoder (``base``: a source config's
    text section whose other fields, token ids included, are kept)."""
    d, f = config.decoder, config.fusion
    out: dict[str, Any] = {key: value for key, value in (base or {}).items()
                           if key not in ("rope_parameters", "rope_scaling", "rope_theta")}
    out.update({
        "architectures": ["MllamaForCausalLM"],
        "model_type": "mllama_text_model",
        "vocab_size": d.vocab_size,
        "hidden_size": d.embed_dim,
        "intermediate_size": d.intermediate_dim,
        "num_hidden_layers": d.num_layers + len(f.fusion_layers),
        "num_attention_heads": d.num_heads,
        "num_key_value_heads": d.num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": d.norm_eps,
        "max_position_embeddings": hf_max_position_embeddings(d),
        "cross_attention_layers": list(hf_cross_layers(f.fusion_layers)),
        "tie_word_embeddings": False,
        "rope_theta": d.rope_base,
        "rope_scaling": hf_rope_scaling(d.rope_scaling),
    })
    # token ids transformers would otherwise default to Llama 3's (128000, 128001, 128004),
    # which name other tokens, or no row at all, in another vocabulary: unknown ids are null.
    # The padding row is an original token's: a fusion row is a new token, never padding.
    for key in ("bos_token_id", "eos_token_id"):
        out.setdefault(key, None)
    pad = out.get("pad_token_id")
    if not (isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < d.vocab_size):
        out["pad_token_id"] = None
    return out


# What a decoder's own transformers config.json says that MllamaTextConfig also holds and the
# fused config does not: token ids, initialisation and cache settings. (Its dtype is not
# carried: fuse may have cast the tensors; the output states theirs.)
MLLAMA_CARRIED_FIELDS: tuple[str, ...] = (
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
)


def _source_decoder_fields(directory: Path) -> dict[str, Any]:
    """The :data:`MLLAMA_CARRIED_FIELDS` a fused checkpoint's decoder source stated: in its
    own config.json (an hf source) or the ``hf_config.json`` a conversion kept beside a native
    or Meta one, then (token ids only) in its generation config.

    Raises:
        ConfigError: a kept config file that is not valid JSON.
    """
    found: dict[str, Any] = {}
    kept = directory / SOURCE_FILES_DIR / "decoder"
    for name in ("config.json", HF_CONFIG_SIDE_FILE):
        document = read_json_side_file(kept / name)
        if document is not None and config_style(document) == "hf":
            found = {k: document[k] for k in MLLAMA_CARRIED_FIELDS if k in document}
            break
    for path in (kept / "generation_config.json", directory / "generation_config.json"):
        generation = read_json_side_file(path)
        for key in TOKEN_ID_FIELDS if generation is not None else ():
            if key in generation and found.get(key) is None:
                found[key] = generation[key]
    return found


def _kept_config(view: FusedView, config: FusedConfig) -> dict | None:
    """The Mllama config.json the fused checkpoint came from, if any (an Mllama directory's
    own, or the one a conversion kept under ``source/decoder/``)."""
    if view.layout == "mllama":
        return dict(view.source.config or {}) or None
    directory = _directory(view)
    kept = directory / SOURCE_FILES_DIR / "decoder" / "config.json"
    if kept.is_file() and config.encoder is None:
        return json.loads(kept.read_text())
    return None


def _directory(view: FusedView) -> Path:
    path = Path(view.path)
    return path if path.is_dir() else path.parent


def _to_mllama(view: FusedView, config: FusedConfig):
    """``(infos, producers, config.json, notes)`` of the Mllama form."""
    problems = mllama_blockers(config)
    if problems:
        raise ConfigError(f"transformers' Mllama cannot express this fused decoder: "
                          f"{problems[0]}")
    infos = view.infos()
    opaque = [k for k in infos if k.startswith(OPAQUE_ENCODER_PREFIX)
              and not k.startswith(("encoder.vision.", "encoder.projection."))]
    spelling = SPELLINGS[0] if opaque else SPELLINGS[-1]  # conditional when vision travels
    fusion_layers = config.fusion.fusion_layers
    notes = []
    left_out = [k for k in infos if k.startswith(("encoder.vision.", "encoder.projection."))]
    if left_out:
        family = config.encoder.family if config.encoder is not None else None
        tower = VISION_FAMILIES[family].display_name if family in VISION_FAMILIES else "vision"
        notes.append(
            f"left out the {tower} tower and projection ({len(left_out)} tensors, "
            "encoder.vision.* and encoder.projection.*): Mllama's vision model is not a "
            "CLIP/SigLIP tower, so the output is MllamaForCausalLM, the fused decoder alone")
    out_infos: list[TensorInfo] = []
    producers: dict[str, Callable[[], Any]] = {}
    d = config.decoder
    embed_name = native_to_mllama(FUSED_EMBEDDING, fusion_layers, spelling)
    table, extra = infos[FUSED_EMBEDDING], infos.get(FUSED_FUSION_EMBEDDING)

    def merged() -> torch.Tensor:
        parts = [view.get_tensor(FUSED_EMBEDDING)]
        if extra is not None:
            parts.append(view.get_tensor(FUSED_FUSION_EMBEDDING).to(table.dtype))
        rows = sum(p.shape[0] for p in parts)
        if rows < d.vocab_size + MLLAMA_EXTRA_ROWS:  # unused fusion rows: zeros
            parts.append(torch.zeros(d.vocab_size + MLLAMA_EXTRA_ROWS - rows, d.embed_dim,
                                     dtype=table.dtype))
        return torch.cat(parts, dim=0)

    if extra is None or extra.shape[0] < MLLAMA_EXTRA_ROWS:
        notes.append(f"{MLLAMA_EXTRA_ROWS - (0 if extra is None else extra.shape[0])} unused "
                     "fusion rows of the Mllama table are zeros")
    for key, info in infos.items():
        if key == FUSED_FUSION_EMBEDDING or key.startswith(("encoder.vision.",
                                                            "encoder.projection.")):
            continue
        if key == FUSED_EMBEDDING:
            out_infos.append(TensorInfo(embed_name, (d.vocab_size + MLLAMA_EXTRA_ROWS,
                                                     d.embed_dim), table.dtype))
            producers[embed_name] = merged
            continue
        name = native_to_mllama(key, fusion_layers, spelling)
        transform = (IDENTITY,)
        if key.startswith("decoder.") and ".fusion_layer." not in key:
            transform = _rope_transform(key.removeprefix("decoder."), "native", "hf", d)
        entry = PlanEntry(target_key=name, source_key=key, transform=transform,
                          source_shape=tuple(info.shape), source_dtype=info.dtype,
                          shape=tuple(info.shape), dtype=info.dtype)
        out_infos.append(TensorInfo(name, tuple(info.shape), info.dtype))
        producers[name] = lambda e=entry: plan_entry_source(e, view)
    base = _kept_config(view, config)
    if opaque:
        if base is None or not isinstance(base.get("text_config"), dict):
            raise ConfigError("the Mllama vision side travels without its config.json (no "
                              "source/decoder/config.json): cannot write "
                              "MllamaForConditionalGeneration")
        document = {**base, "text_config": mllama_text_config_dict(config, base["text_config"])}
        notes.append("load it with transformers' MllamaForConditionalGeneration (or "
                     "AutoModelForImageTextToText)")
    else:
        text_base = base.get("text_config", base) if base else _source_decoder_fields(
            _directory(view))
        document = mllama_text_config_dict(config, text_base)
        if base is None:
            set_hf_dtype(document, str(table.dtype).removeprefix("torch."))
        notes.append("load it with transformers' MllamaForCausalLM: AutoModelForCausalLM does "
                     "not take its config (MllamaTextConfig, model_type mllama_text_model)")
    return out_infos, producers, document, notes


def _to_native(view: FusedView, config: FusedConfig):
    infos = view.infos()
    producers = {key: (lambda k=key: plan_entry_source(view.entry(k), view.source))
                 for key in infos}
    return list(infos.values()), producers, None, []


def convert_fused(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    to: str = "native",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    on_tensor_written: Callable[[TensorInfo], None] | None = None,
    durable: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[FusedConfig, WriteResult, tuple[str, ...]]:
    """Rewrite a fused checkpoint in another fused layout.

    Args:
        path: a fusesurgery fused checkpoint or a transformers Mllama checkpoint.
        out_dir: the output directory (atomic; never over an input).
        to: ``native`` (fusesurgery's fused layout, with ``fusion_config.json``; an Mllama
            vision side stays opaque ``encoder.*`` tensors) or ``mllama`` (transformers'
            ``MllamaForCausalLM``, or ``MllamaForConditionalGeneration`` when the Mllama
            vision side is there: one ``[vocab + 8, d]`` embedding, cross-attention layers
            renumbered, the tokenizer carried).
        max_shard_size: largest shard.
        overwrite: replace an earlier fusesurgery output.
        on_tensor_written: progress callback, after each tensor.
        on_progress: called with ``(bytes written, total bytes)`` after each tensor.
        durable: fsync before the output appears.

    Returns:
        The fusion config, the files written and notes (what the target cannot hold).

    Raises:
        FuseSurgeryError: an unknown target, a decoder Mllama cannot express (the message
            names the property), or an output that cannot be written.
    """
    if to not in FUSED_TARGETS:
        raise ConfigError(f"a fused checkpoint converts to {', '.join(FUSED_TARGETS)} or "
                          f"transformers (convert --to transformers, fusesurgery.export), not "
                          f"{to!r}")
    with open_fused(path) as (view, config):
        directory = _directory(view)
        if to == "mllama":
            infos, producers, document, notes = _to_mllama(view, config)
            extra: dict[str, bytes | str] = {
                "config.json": standard_json.dumps(document, indent=2) + "\n"}
        else:
            infos, producers, _, notes = _to_native(view, config)
            extra = {}
            if view.layout == "mllama":  # keep the Mllama config for the way back
                extra[f"{SOURCE_FILES_DIR}/decoder/config.json"] = standard_json.dumps(
                    view.source.config or {}, indent=2) + "\n"
                record = {**config.sources.get("decoder", {}), "config_file": "config.json",
                          "kept_files": ["config.json"]}
                config = config.replace(sources={**config.sources, "decoder": record})
            else:
                extra.update(read_kept_source_files(directory, config.sources))
            extra[FUSION_CONFIG_FILE] = standard_json.dumps(config.to_dict(), indent=2) + "\n"
        extra.update(read_side_files(directory, DECODER_SIDE_FILES))
        written = write_safetensors(
            out_dir, infos, lambda key: producers[key](), max_shard_size=max_shard_size,
            extra_files=extra, overwrite=overwrite, on_tensor_written=on_tensor_written,
            on_progress=on_progress, durable=durable, inputs=(directory, *view.paths_read))
    return config, written, tuple(notes)


__all__ = ["FUSED_TARGETS", "convert_fused", "mllama_blockers", "mllama_text_config_dict"]

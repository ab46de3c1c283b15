"""Load a checkpoint of any supported form into the native modules, lazily.

The model is built on the ``meta`` device (no memory), the checkpoint's tensors are read
mmap-backed one at a time, converted by the key-map plan, and assigned into the module with
``load_state_dict(assign=True)``: parameters share the file's pages instead of copying them.
Tensors the conversion must rewrite are the exception: the RoPE-permuted q/k projections of a
Hugging Face Llama or Mistral checkpoint (a Qwen2 one keeps its rows: its native layout is
rotate-half, as torchtune's), and every tensor when a ``dtype`` cast is asked for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fusesurgery.convert import apply_plan, detect_model, plan_conversion
from fusesurgery.convert.detect import DetectedModel
from fusesurgery.convert.tied_output import resolve_stored_output
from fusesurgery.errors import ConfigError
from fusesurgery.io import open_checkpoint
from fusesurgery.modules import (
    TransformerDecoder,
    VisionTransformer,
    build_decoder,
    build_vision_encoder,
    init_non_persistent_buffers,
)


def detect_checkpoint(
    path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None
) -> DetectedModel:
    """What the checkpoint at ``path`` is and its resolved config, from metadata alone.

    Raises:
        FuseSurgeryError: the checkpoint cannot be read or recognised, or its config is
            incomplete (the message names the option that supplies a missing value).
    """
    with open_checkpoint(path) as source:
        return detect_model(source.infos(), source.config, source.config_file, overrides)


def _load(
    path: str | os.PathLike[str],
    kind: str,
    overrides: Mapping[str, Any] | None,
    dtype: torch.dtype | None,
    device: torch.device | str,
    configure=None,
) -> nn.Module:
    with open_checkpoint(path) as source:
        infos = source.infos()
        detected = detect_model(infos, source.config, source.config_file, overrides,
                                want=kind)
        detected, _ = resolve_stored_output(source, detected)  # a stored head as transformers
        if detected.kind != kind:
            raise ConfigError(
                f"{path} holds a {detected.kind} checkpoint ({detected.family}), not a {kind}"
            )
        config = detected.config if configure is None else configure(detected.config)
        plan = plan_conversion(infos, detected.layout, config, target_layout="native",
                               kind=kind, dtype=dtype)
        with torch.device("meta"):
            model = build_decoder(config) if kind == "decoder" else build_vision_encoder(config)
        state = dict(apply_plan(plan, source.get_tensor))
    # strict: the plan already checked names and shapes against the config
    model.load_state_dict(state, strict=True, assign=True)
    init_non_persistent_buffers(model, device)
    return model.to(device)


def load_decoder(
    path: str | os.PathLike[str],
    *,
    overrides: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> TransformerDecoder:
    """Load a Llama-family decoder (Hugging Face, Meta or native layout) as a native
    ``TransformerDecoder``.

    Args:
        path: a checkpoint file or directory (see ``fusesurgery.io.open_checkpoint``).
        overrides: ``DecoderConfig`` fields that replace or supply config values, e.g.
            ``{"num_heads": 32}`` for a checkpoint without a config.
        dtype: cast floating-point tensors to this dtype (copies them); None keeps the
            stored dtypes and shares the file's memory.
        device: where the model ends up.

    Returns:
        The decoder, in ``eval``-ready state; ``model(tokens)`` gives ``[b, s, v]`` logits.

    Raises:
        FuseSurgeryError: unreadable or unrecognised checkpoint, unknown keys, config and
            shapes that disagree, or a checkpoint that holds no decoder.
    """
    return _load(path, "decoder", overrides, dtype, device)


def load_encoder(
    path: str | os.PathLike[str],
    *,
    overrides: Mapping[str, Any] | None = None,
    output_layer: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> VisionTransformer:
    """Load a CLIP or SigLIP vision tower (``CLIPVisionModel``, ``SiglipVisionModel``, or the
    vision half of a ``CLIPModel`` / ``SiglipModel``) as a native ``VisionTransformer``.

    Args:
        path: a checkpoint file or directory.
        overrides: ``VisionEncoderConfig`` fields that replace or supply config values.
        output_layer: return hidden states after this many layers (transformers'
            ``hidden_states[k]``; -2 is the penultimate layer LLaVA uses); None for the final
            hidden states.
        dtype: cast floating-point tensors to this dtype; None keeps the stored dtypes.
        device: where the model ends up.

    Returns:
        The encoder: ``model(images [b, c, h, w])`` gives ``[b, s_e, d_e]``.

    Raises:
        FuseSurgeryError: as ``load_decoder``, or a checkpoint that holds no vision tower.
    """
    def configure(config):
        return config if output_layer is None else config.replace(output_layer=output_layer)

    return _load(path, "vision", overrides, dtype, device, configure)

"""Fused checkpoints as models: rebuild the ``DeepFusionModel`` a ``fusion_config.json``
describes and load its tensors into it, mmap-backed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fusesurgery.convert.plan import check_cast_dtype
from fusesurgery.errors import ConfigError, ShapeError
from fusesurgery.io import CheckpointSource, open_checkpoint
from fusesurgery.io.checkpoint import FUSION_CONFIG_FILE
from fusesurgery.modules import (
    DeepFusionModel,
    build_deep_fusion_model,
    init_non_persistent_buffers,
)
from fusesurgery.surgery.fused_config import FusedConfig, fused_config_from_dict


@contextmanager
def open_fused(path: str | os.PathLike[str]) -> Iterator[tuple[CheckpointSource, FusedConfig]]:
    """Open a fused checkpoint written by fusesurgery: its lazy source and its config.

    Raises:
        FuseSurgeryError: unreadable, or no (valid) ``fusion_config.json`` beside the weights.
    """
    with open_checkpoint(path) as source:
        if source.config_file != FUSION_CONFIG_FILE or source.config is None:
            raise ConfigError(
                f"{path} is not a fused checkpoint written by fusesurgery: it has no "
                f"{FUSION_CONFIG_FILE} beside its weights (found "
                f"{source.config_file or 'no config'})")
        directory = Path(source.path) if Path(source.path).is_dir() else Path(source.path).parent
        yield source, fused_config_from_dict(source.config, str(directory / FUSION_CONFIG_FILE))


def read_fused_config(path: str | os.PathLike[str]) -> FusedConfig:
    """The parsed ``fusion_config.json`` of the fused checkpoint at ``path``.

    Raises:
        FuseSurgeryError: as :func:`open_fused`.
    """
    with open_fused(path) as (_, config):
        return config


def build_fused_model(config: FusedConfig, **trainable: bool) -> DeepFusionModel:
    """The ``DeepFusionModel`` ``config`` describes, on the current default device (build it
    under ``torch.device("meta")`` to allocate nothing), trainable flags as given (defaults:
    only the fusion parameters train)."""
    return build_deep_fusion_model(config.decoder, config.encoder, config.fusion,
                                   projection=config.projection, **trainable)


def load_fused(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
) -> DeepFusionModel:
    """Load a fused checkpoint as a ``DeepFusionModel``.

    Built on the meta device, every tensor assigned from the checkpoint's memory map
    (``strict=True``: the keys, shapes and dtypes must be exactly the model's), so loading
    costs no memory until pages are touched; with ``dtype`` or a non-CPU ``device``, tensors
    are copied.

    Args:
        path: the fused checkpoint directory (or its index / safetensors file).
        device: where the model ends up.
        dtype: cast every floating-point tensor; None keeps the stored dtypes.
        decoder_trainable: train the decoder's original parameters too.
        encoder_trainable: train the encoder's original parameters too.
        fusion_trainable: train the fusion parameters (new layers, tokens, projection).

    Returns:
        The model; ``model.fused_config`` is its :class:`FusedConfig` and
        ``model.fused_path`` the directory it came from (``save_fused`` reads both).

    Raises:
        FuseSurgeryError: not a fusesurgery fused checkpoint, or tensors that do not match the
            model the config describes.
    """
    check_cast_dtype(dtype)
    with open_fused(path) as (source, config):
        with torch.device("meta"):
            model = build_fused_model(config, decoder_trainable=decoder_trainable,
                                      encoder_trainable=encoder_trainable,
                                      fusion_trainable=fusion_trainable)
        expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
        infos = source.infos()
        missing = sorted(set(expected) - set(infos))
        unexpected = sorted(set(infos) - set(expected))
        if missing or unexpected:
            raise ShapeError(
                f"{path}: the checkpoint's keys are not the model's: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}")
        for key, (shape, _) in expected.items():
            if tuple(infos[key].shape) != shape:
                raise ShapeError(f"{path}: {key} is {list(infos[key].shape)}, the model "
                                 f"needs {list(shape)}")
        state = {}
        for key in expected:
            tensor = source.get_tensor(key)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state[key] = tensor
        directory = Path(source.path) if Path(source.path).is_dir() else Path(source.path).parent
    model.load_state_dict(state, strict=True, assign=True)
    init_non_persistent_buffers(model, device)
    model = model.to(device)
    model.fused_config = config
    model.fused_path = directory
    return model


__all__ = ["build_fused_model", "load_fused", "open_fused", "read_fused_config"]

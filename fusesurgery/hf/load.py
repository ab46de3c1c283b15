"""``fusesurgery.load_fused``: a fused checkpoint as the native model, whichever layout holds
it. fusesurgery's own and Mllama's are read by :mod:`fusesurgery.surgery.fused`; a
transformers export by :func:`~fusesurgery.surgery.exported.open_export` (the opener
``generate`` and ``validate`` read it with too). Both load through the same
:func:`~fusesurgery.surgery.fused.load_fused_from`: built on the meta device, every tensor read
lazily and assigned, the same checks.
"""

from __future__ import annotations

import os

import torch

from fusesurgery.modules import DeepFusionModel, TransformerDecoder
from fusesurgery.surgery.export_layout import local_export_path
from fusesurgery.surgery.exported import fused_opener
from fusesurgery.surgery.fused import load_fused_from


def load_fused(
    path: str | os.PathLike[str],
    *,
    part: str = "model",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
) -> DeepFusionModel | TransformerDecoder:
    """Load a fused checkpoint as a ``DeepFusionModel`` (or its fused decoder alone).

    Built on the meta device, every tensor assigned from the checkpoint's memory map
    (``strict=True``: the keys and shapes must be exactly the model's), so loading costs no
    memory until pages are touched; with ``dtype``, a non-CPU ``device``, or a layout that
    rewrites tensors (Mllama's permuted q/k rows and split embedding, a transformers export's
    permuted q/k rows), those tensors are copied. A transformers export's stacked tensors
    (Phi-3's ``qkv_proj``, ``gate_up_proj``) load as row views of the file.

    Args:
        path: a fused checkpoint directory written by fusesurgery, a transformers export of
            one (``convert --to transformers``; loaded in memory, as ``convert DIR --to
            native`` would write it; a Hub repo id of one too), or a transformers Mllama
            checkpoint
            (``MllamaForCausalLM``, ``MllamaForConditionalGeneration``).
        part: ``model`` for the whole ``DeepFusionModel``, ``decoder`` for the fused
            ``TransformerDecoder`` alone (the only part of an Mllama checkpoint with a native
            module).
        device: where the model ends up.
        dtype: cast every floating-point tensor; None keeps the stored dtypes.
        decoder_trainable: train the decoder's original parameters too.
        encoder_trainable: train the encoder's original parameters too.
        fusion_trainable: train the fusion parameters (new layers, tokens, projection).

    Returns:
        The model; ``.fused_config`` is its :class:`FusedConfig` (an export's: the one it
        carries, with the gate values its tensors hold) and ``.fused_path`` the directory it
        came from (``save_fused`` reads both).

    Raises:
        FuseSurgeryError: not a fused checkpoint, an unknown part or device, an argument of
            the wrong type, a whole model asked of an encoder with no native module, tensors
            that do not match the model; of an export, what ``convert DIR --to native``
            refuses (a half export, an edited config.json), or a directory ``fuse --format
            transformers`` wrote (no native form: transformers' ``AutoModelForImageTextToText``
            loads it).
    """
    path = local_export_path(path)  # a Hub repo of an export: its fetched directory
    return load_fused_from(fused_opener(path), path, part=part, device=device, dtype=dtype,
                           decoder_trainable=decoder_trainable,
                           encoder_trainable=encoder_trainable, fusion_trainable=fusion_trainable)


__all__ = ["load_fused"]

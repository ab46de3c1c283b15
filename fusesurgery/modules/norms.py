"""Normalisation layers and the tanh gate."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back.

    The weight is called ``scale`` (torchtune's key layout), initialised to ones; with
    ``unit_offset`` (Gemma's kind) the norm multiplies by ``1 + scale`` in float32 and casts
    after, as transformers' and torchtune's Gemma norms do, and ``scale`` starts at zero.

    Args:
        dim: size of the last dimension ``d``.
        eps: added to the mean square before the square root.
        unit_offset: scale by ``1 + scale`` (Gemma) rather than ``scale`` (Llama).
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.scale = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[..., d]``.

        Returns:
            ``[..., d]``, same dtype as ``x``.
        """
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.scale.float())).type_as(x)
        # Cast before scaling, as transformers' Llama does, so fp32 and half-precision
        # checkpoints both match their reference implementation.
        return self.scale * normed.to(x.dtype)


    def extra_repr(self) -> str:
        return f"{self.scale.size(0)}, eps={self.eps}" + (
            ", unit_offset=True" if self.unit_offset else "")


class NestedRMSNorm(nn.Module):
    """An :class:`RMSNorm` held one module down, as ``rms_norm``: its weight's key is
    ``<name>.rms_norm.scale``, torchtune's spelling for Gemma 2's final norm (torchtune's
    module also caps the normed hidden state; transformers, and this one, do not: Gemma 2's
    cap is on the logits).

    Args:
        norm: the norm.
    """

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.rms_norm = norm

    @property
    def scale(self) -> nn.Parameter:
        """The norm's weight ``[d]``, where a plain :class:`RMSNorm` keeps it."""
        return self.rms_norm.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[..., d]``.

        Returns:
            ``[..., d]``, same dtype as ``x``.
        """
        return self.rms_norm(x)


class TanhGate(nn.Module):
    """Learned gate ``x * tanh(scale)``; ``scale`` starts at 0, so a new gate passes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.tanh()

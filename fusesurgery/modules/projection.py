"""Projection heads from encoder width to decoder width; new parameters, so fusion modules."""

from __future__ import annotations

import torch
from torch import nn

from fusesurgery.modules.feed_forward import ACTIVATIONS
from fusesurgery.modules.fusion import register_fusion_module


class LinearProjection(nn.Module):
    """``[b, s_e, d_e] -> [b, s_e, d]`` with one linear layer (key ``output``).

    Args:
        in_dim: encoder width ``d_e``.
        out_dim: decoder width ``d``.
        bias: whether the layer has a bias.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.output = nn.Linear(in_dim, out_dim, bias=bias)
        register_fusion_module(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(x)


class MLPProjection(nn.Module):
    """``w2(act(w1 x))``, the two-layer GELU head of LLaVA-style models (keys ``w1``, ``w2``).

    Args:
        in_dim: encoder width ``d_e``.
        out_dim: decoder width ``d``.
        hidden_dim: width between the layers; defaults to ``out_dim``.
        activation: a name from ``fusesurgery.modules.feed_forward.ACTIVATIONS``.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int | None = None, activation: str = "gelu"
    ) -> None:
        super().__init__()
        hidden_dim = hidden_dim or out_dim
        self.w1 = nn.Linear(in_dim, hidden_dim)
        self.w2 = nn.Linear(hidden_dim, out_dim)
        self.activation = ACTIVATIONS[activation]
        register_fusion_module(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.activation(self.w1(x)))

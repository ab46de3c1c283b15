"""Feed-forward blocks: SwiGLU (decoders) and two-layer MLPs (ViT, projection heads)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (SigLIP's ``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
}


class FeedForward(nn.Module):
    """``w2(act(w1 x) * w3 x)`` with a gate ``w3`` (SwiGLU), else ``w2(act(w1 x))``.

    Args:
        w1: ``d -> hidden`` (the gate projection in SwiGLU).
        w2: ``hidden -> d``.
        w3: ``d -> hidden`` up projection, or None for a plain MLP.
        activation: a name from ``ACTIVATIONS``.

    Raises:
        ValueError: unknown activation name.
    """

    def __init__(
        self, *, w1: nn.Module, w2: nn.Module, w3: nn.Module | None = None,
        activation: str = "silu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {sorted(ACTIVATIONS)}")
        self.w1 = w1
        self.w2 = w2
        self.w3 = w3
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d] -> [..., d]``."""
        hidden = self.activation(self.w1(x))
        if self.w3 is not None:
            hidden = hidden * self.w3(x)
        return self.w2(hidden)

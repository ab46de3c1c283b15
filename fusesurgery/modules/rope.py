"""Rotary position embeddings, interleaved-pair convention (Meta / torchtune), with the
Llama 3.1 frequency scaling.

Hugging Face stores q/k projections permuted for its rotate-half convention; the converters
undo that permutation, so one implementation serves every family.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fusesurgery.config import RopeScaling


def rope_frequencies(
    head_dim: int, base: float, scaling: RopeScaling | None = None
) -> torch.Tensor:
    """Inverse frequencies of each rotated pair.

    Args:
        head_dim: per-head width ``h_d`` (even).
        base: RoPE theta.
        scaling: Llama 3.1 scaling: long wavelengths divided by ``factor``, short ones kept,
            a smooth blend between ``low_freq_factor`` and ``high_freq_factor``.

    Returns:
        ``[h_d // 2]`` float32.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is None:
        return inv_freq
    context = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    long_wave = wavelen > context / scaling.low_freq_factor
    short_wave = wavelen < context / scaling.high_freq_factor
    smooth = (context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(long_wave, inv_freq / scaling.factor, blended)
    return torch.where(short_wave, inv_freq, scaled)


class RotaryPositionalEmbeddings(nn.Module):
    """Rotates consecutive pairs ``(x[2j], x[2j+1])`` of each head by ``pos * inv_freq[j]``.

    Args:
        head_dim: per-head width ``h_d``.
        max_seq_len: positions precomputed.
        base: RoPE theta.
        scaling: optional Llama 3.1 scaling.
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int = 4096,
        base: float = 10_000.0,
        scaling: RopeScaling | None = None,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.base = base
        self.scaling = scaling
        self.register_buffer("cache", torch.empty(0), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the cos/sin table: after building on the meta device, call this with
        the real device, since a non-persistent buffer is not in any checkpoint."""
        inv_freq = rope_frequencies(self.head_dim, self.base, self.scaling).to(device)
        positions = torch.arange(self.max_seq_len, dtype=torch.float32, device=device)
        angles = torch.outer(positions, inv_freq)
        # [max_seq_len, h_d // 2, 2] = (cos, sin)
        self.cache = torch.stack([angles.cos(), angles.sin()], dim=-1)

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: ``[b, s, n_h, h_d]``.
            input_pos: ``[b, s]`` position of each token, or None for ``0..s-1``.

        Returns:
            ``[b, s, n_h, h_d]``, same dtype as ``x``.
        """
        seq_len = x.size(1)
        rope = self.cache[:seq_len] if input_pos is None else self.cache[input_pos]
        # [s, h_d/2, 2] -> [1, s, 1, h_d/2, 2]   or   [b, s, h_d/2, 2] -> [b, s, 1, h_d/2, 2]
        rope = rope.view(-1, seq_len, 1, self.head_dim // 2, 2)
        pairs = x.float().reshape(*x.shape[:-1], self.head_dim // 2, 2)
        cos, sin = rope[..., 0], rope[..., 1]
        rotated = torch.stack(
            [pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin],
            dim=-1,
        )
        return rotated.flatten(-2).type_as(x)

"""Rotary position embeddings in both pairings, with the Llama 3.1 frequency scaling.

Each head's ``h_d`` dims form ``h_d / 2`` pairs, pair ``j`` rotated by ``pos * inv_freq[j]``.
Which dims pair up is a convention of the weights, not of the maths:

- ``"interleaved"``: ``(x[2j], x[2j+1])``, as Meta's reference code and torchtune's Llama and
  Mistral do. Hugging Face stores these families' q/k rows in rotate-half order, so the
  converters permute them (``convert.transforms.permute_qk_to_native``).
- ``"half"``: ``(x[j], x[j + h_d/2])``, as transformers and torchtune's Qwen2 do; a native
  Qwen2 checkpoint keeps Hugging Face's q/k rows as they are.

``DecoderConfig.rope_style`` says which one a family's native layout uses.
"""

from __future__ import annotations

import math
from typing import get_args

import torch
from torch import nn

from fusesurgery.config import RopeScaling, RopeStyle

ROPE_STYLES: tuple[str, ...] = get_args(RopeStyle)


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
        ``[h_d // 2]`` float32, on the CPU whatever the default device (a few numbers; under
        ``torch.device("meta")`` the first arithmetic would load torch's meta kernels, ~2 s).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
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


# Rows of the cos/sin table computed at a time. The table grows on demand, a whole chunk at
# a time, so a config stating 10**12 positions costs nothing until positions are used, and
# every row is computed by the same chunk-shaped arithmetic whatever the growth history (one
# model's table equals another's bit for bit).
ROPE_CHUNK = 4096


class RotaryPositionalEmbeddings(nn.Module):
    """Rotates each pair of dims of each head by ``pos * inv_freq[j]``.

    Pair ``j`` is ``(x[2j], x[2j+1])`` with ``style="interleaved"`` and
    ``(x[j], x[j + h_d/2])`` with ``style="half"``; the cos/sin table, positions and scaling
    are the same for both. The table holds only the positions used so far (whole chunks of
    :data:`ROPE_CHUNK`), never more than ``max_seq_len``.

    Args:
        head_dim: per-head width ``h_d``.
        max_seq_len: the most positions the table may hold.
        base: RoPE theta.
        scaling: optional Llama 3.1 scaling.
        style: ``"interleaved"`` or ``"half"``, the pairing the q/k weights were laid out for.

    Raises:
        ValueError: ``head_dim`` is odd or ``style`` unknown.
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int = 4096,
        base: float = 10_000.0,
        scaling: RopeScaling | None = None,
        style: RopeStyle = "interleaved",
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if style not in ROPE_STYLES:
            raise ValueError(f"unknown RoPE style {style!r}; valid: {', '.join(ROPE_STYLES)}")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.base = base
        self.scaling = scaling
        self.style = style
        self.register_buffer("cache", torch.empty(0), persistent=False)
        self._checked_pos: tuple[torch.Tensor, int] | None = None
        self.reset_parameters()

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        """Empty the cos/sin table on ``device`` (it refills on first use): after building on
        the meta device, call this with the real device, since a non-persistent buffer is not
        in any checkpoint."""
        target = torch.device(device) if device is not None else torch.get_default_device()
        # [positions, h_d // 2, 2] = (cos, sin); on meta the shape alone, no arithmetic
        rows = self.max_seq_len if target.type == "meta" else 0
        self.cache = torch.empty(rows, self.head_dim // 2, 2, device=target)
        self._checked_pos = None

    def reserve(self, length: int) -> None:
        """Make the table hold positions ``0 .. length - 1`` (whole chunks, at most
        ``max_seq_len`` rows).

        Raises:
            ValueError: ``length`` is past ``max_seq_len``.
        """
        if length > self.max_seq_len:
            raise ValueError(f"RoPE position {length - 1} is past max_seq_len "
                             f"{self.max_seq_len}")
        have = self.cache.size(0)
        if have >= length:
            return
        device = self.cache.device
        inv_freq = rope_frequencies(self.head_dim, self.base, self.scaling).to(device)
        stop = min(-(-length // ROPE_CHUNK) * ROPE_CHUNK, self.max_seq_len)
        chunks = [self.cache]
        for start in range(have, stop, ROPE_CHUNK):  # ``have`` is a whole number of chunks
            positions = torch.arange(start, start + ROPE_CHUNK, dtype=torch.float32,
                                     device=device)
            angles = torch.outer(positions, inv_freq)
            chunk = torch.stack([angles.cos(), angles.sin()], dim=-1)
            chunks.append(chunk[: stop - start].to(self.cache.dtype))
        self.cache = torch.cat(chunks)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, style={self.style!r}"

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: ``[b, s, n_h, h_d]``.
            input_pos: ``[b, s]`` position of each token, or None for ``0..s-1``.

        Returns:
            ``[b, s, n_h, h_d]``, same dtype as ``x``.
        """
        seq_len, half = x.size(1), self.head_dim // 2
        if input_pos is None:
            self.reserve(seq_len)
            rope = self.cache[:seq_len]
        else:
            if self.cache.size(0) < self.max_seq_len and input_pos.numel() and (
                    self._checked_pos is None or self._checked_pos[0] is not input_pos
                    or self._checked_pos[1] != input_pos._version):
                # reading the largest position waits for the device: once per positions
                # tensor (every layer gets the same one), again only if it changed in place
                self.reserve(int(input_pos.max()) + 1)
                self._checked_pos = (input_pos, input_pos._version)
            rope = self.cache[input_pos]
        # [s, h_d/2, 2] -> [1, s, 1, h_d/2, 2]   or   [b, s, h_d/2, 2] -> [b, s, 1, h_d/2, 2]
        rope = rope.view(-1, seq_len, 1, half, 2)
        cos, sin = rope[..., 0], rope[..., 1]
        if self.style == "interleaved":
            # [b, s, n_h, h_d/2, 2]: the two members of each pair side by side
            pairs = x.float().reshape(*x.shape[:-1], half, 2)
            first, second = pairs[..., 0], pairs[..., 1]
        else:
            # [b, s, n_h, h_d/2] each: the first half of the head pairs with the second
            first, second = x.float().split(half, dim=-1)
        rotated = (first * cos - second * sin, second * cos + first * sin)
        if self.style == "interleaved":
            return torch.stack(rotated, dim=-1).flatten(-2).type_as(x)
        return torch.cat(rotated, dim=-1).type_as(x)

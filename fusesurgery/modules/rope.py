"""Rotary position embeddings in both pairings, with transformers' RoPE scalings.

Each head's ``h_d`` dims form ``h_d / 2`` pairs, pair ``j`` rotated by ``pos * inv_freq[j]``.
Which dims pair up is a convention of the weights, not of the maths:

- ``"interleaved"``: ``(x[2j], x[2j+1])``, as Meta's reference code and torchtune's Llama and
  Mistral do. Hugging Face stores these families' q/k rows in rotate-half order, so the
  converters permute them (``convert.transforms.permute_qk_to_native``).
- ``"half"``: ``(x[j], x[j + h_d/2])``, as transformers and torchtune's Qwen2 do; a native
  Qwen2 checkpoint keeps Hugging Face's q/k rows as they are.

``DecoderConfig.rope_style`` says which one a family's native layout uses.

The scalings (:class:`~fusesurgery.config.RopeScaling`) compute the frequencies and the factor
on cos/sin that transformers' ``ROPE_INIT_FUNCTIONS`` compute for the same config, in the same
float32 operations, so the tables agree bit for bit. Two depend on the sequence length the way
transformers' rotary embedding does per forward call (``max(positions) + 1``): ``longrope``
takes its long factors for a call reaching past ``original_max_position_embeddings``, and
``dynamic`` grows its base for the longest call seen so far past that length, back to the
original frequencies for a call shorter than it.
"""

from __future__ import annotations

import math
from typing import get_args

import torch
from torch import nn

from fusesurgery.config import RopeScaling, RopeStyle

ROPE_STYLES: tuple[str, ...] = get_args(RopeStyle)


def _exponents(head_dim: int) -> torch.Tensor:
    """``[h_d // 2]`` float32 ``2j / h_d``, on the CPU whatever the default device (a few
    numbers; under ``torch.device("meta")`` the first arithmetic would load torch's meta
    kernels, ~2 s)."""
    return torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim


def _llama3(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
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


def _yarn(head_dim: int, base: float, scaling: RopeScaling) -> torch.Tensor:
    # Pairs rotating fewer than beta_slow times over the original context are interpolated
    # (divided by factor), those rotating more than beta_fast times kept, a linear ramp between.
    def pair_of(rotations: float) -> float:
        context = scaling.original_max_position_embeddings
        return (head_dim * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = pair_of(scaling.beta_fast or 32), pair_of(scaling.beta_slow or 1)
    if scaling.truncate is not False:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    powers = base ** _exponents(head_dim)
    kept, interpolated = 1.0 / powers, 1.0 / (scaling.factor * powers)
    keep_weight = 1 - ramp
    return interpolated * (1 - keep_weight) + kept * keep_weight


def _dynamic(head_dim: int, base: float, scaling: RopeScaling,
             seq_len: int | None) -> torch.Tensor:
    original, factor = scaling.original_max_position_embeddings, scaling.factor
    # transformers grows the base from a 0-d int64 tensor of the length (float32 arithmetic)
    # when a forward call passes the original context, from Python numbers at construction
    length: int | torch.Tensor = original
    if seq_len is not None:
        length = torch.maximum(torch.tensor(seq_len), torch.tensor(original))
    grown = base * ((factor * length / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return 1.0 / (grown ** _exponents(head_dim))


def rope_frequencies(
    head_dim: int, base: float, scaling: RopeScaling | None = None, *,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Inverse frequencies of each rotated pair.

    Args:
        head_dim: per-head width ``h_d`` (even).
        base: RoPE theta.
        scaling: the RoPE scaling, or None for plain RoPE.
        seq_len: for ``dynamic`` and ``longrope``, the length of the forward call the
            frequencies are for (``max(positions) + 1``); None for those a model starts with.

    Returns:
        ``[h_d // 2]`` float32, on the CPU.
    """
    kind = None if scaling is None else scaling.rope_type
    if kind == "yarn":
        return _yarn(head_dim, base, scaling)
    if kind == "dynamic":
        return _dynamic(head_dim, base, scaling, seq_len)
    if kind == "longrope":
        long = seq_len is not None and seq_len > scaling.original_max_position_embeddings
        factors = torch.tensor(scaling.long_factor if long else scaling.short_factor,
                               dtype=torch.float32)
        return 1.0 / (factors * base ** _exponents(head_dim))
    inv_freq = 1.0 / (base ** _exponents(head_dim))
    if kind == "linear":
        return inv_freq / scaling.factor
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    return inv_freq


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """The factor on cos and sin (YaRN's and LongRoPE's attention factor; 1 for the others):
    ``attention_factor`` when the scaling states it, else derived from ``factor`` as
    transformers derives it."""
    if scaling is None or scaling.rope_type not in ("yarn", "longrope"):
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    factor = scaling.factor
    if scaling.rope_type == "longrope":
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor)
                         / math.log(scaling.original_max_position_embeddings))
    if scaling.mscale and scaling.mscale_all_dim:
        return float(_yarn_mscale(factor, scaling.mscale)
                     / _yarn_mscale(factor, scaling.mscale_all_dim))
    return _yarn_mscale(factor)


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
    :data:`ROPE_CHUNK`), never more than ``max_seq_len``. A ``longrope`` scaling keeps a
    second table for its long factors; a ``dynamic`` one, once grown past its original
    context, computes cos/sin for each call's positions alone (its frequencies change with
    the length, so a table would not be reused).

    Args:
        head_dim: per-head width ``h_d``.
        max_seq_len: the most positions the table may hold.
        base: RoPE theta.
        scaling: optional RoPE scaling (:class:`~fusesurgery.config.RopeScaling`).
        style: ``"interleaved"`` or ``"half"``, the pairing the q/k weights were laid out for.
        rotary_dim: the leading dims of each head that are turned, ``r_d`` (partial rotary,
            Phi-4-mini: ``0.75 * h_d``); the frequencies are those of an ``r_d``-wide head, as
            transformers computes them, and the other ``h_d - r_d`` dims pass unchanged. None:
            the whole head.
        half_order_output: return the rotated dims in the half order (pair ``j`` at ``j`` and
            ``j + r_d/2``) whatever ``style``. Attention wants this: its scores sum ``q . k``
            over a head's dims, which one permutation of q and k alike leaves unchanged, and
            in this order the sum runs in transformers' order, so an interleaved-layout
            decoder's logits equal transformers' bit for bit where the kernels are the same
            (its own order rounds the sums differently, ~1e-8 per layer). The output costs the
            same either way.

    Raises:
        ValueError: ``head_dim`` or ``rotary_dim`` is odd, ``rotary_dim`` is not in
            ``[2, head_dim]``, or ``style`` is unknown.
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int = 4096,
        base: float = 10_000.0,
        scaling: RopeScaling | None = None,
        style: RopeStyle = "interleaved",
        rotary_dim: int | None = None,
        half_order_output: bool = False,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 2 <= rotary_dim <= head_dim:
            raise ValueError(f"RoPE turns an even number of dims between 2 and head_dim "
                             f"{head_dim}, got rotary_dim {rotary_dim}")
        if style not in ROPE_STYLES:
            raise ValueError(f"unknown RoPE style {style!r}; valid: {', '.join(ROPE_STYLES)}")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.max_seq_len = max_seq_len
        self.base = base
        self.scaling = scaling
        self.style = style
        self.half_order_output = half_order_output
        self.attention_factor = rope_attention_factor(scaling)
        kind = None if scaling is None else scaling.rope_type
        # the length past which the frequencies depend on the call (longrope, dynamic)
        self._switch_length = (scaling.original_max_position_embeddings
                               if kind in ("longrope", "dynamic") else None)
        self.register_buffer("cache", torch.empty(0), persistent=False)
        if kind == "longrope":
            self.register_buffer("long_cache", torch.empty(0), persistent=False)
        self._checked_pos: tuple[torch.Tensor, int, int] | None = None
        self.reset_parameters()

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        """Empty the cos/sin tables on ``device`` (they refill on first use) and forget the
        lengths seen (dynamic scaling): after building on the meta device, call this with the
        real device, since a non-persistent buffer is not in any checkpoint."""
        target = torch.device(device) if device is not None else torch.get_default_device()
        # [positions, h_d // 2, 2] = (cos, sin); on meta the shape alone, no arithmetic
        rows = self.max_seq_len if target.type == "meta" else 0
        self.cache = torch.empty(rows, self.rotary_dim // 2, 2, device=target)
        if hasattr(self, "long_cache"):
            self.long_cache = torch.empty(rows, self.rotary_dim // 2, 2, device=target)
        self._checked_pos = None
        # dynamic scaling: the longest call seen past the original context, and the
        # frequencies for it (None: the original ones, in the table)
        self._dynamic_length = self._switch_length
        self._dynamic_freq: torch.Tensor | None = None

    def _check_length(self, length: int) -> None:
        if length > self.max_seq_len:
            raise ValueError(f"RoPE position {length - 1} is past max_seq_len "
                             f"{self.max_seq_len}")

    def _grow(self, table: torch.Tensor, inv_freq: torch.Tensor, length: int) -> torch.Tensor:
        self._check_length(length)
        have = table.size(0)
        if have >= length:
            return table
        device = table.device
        inv_freq = inv_freq.to(device)
        stop = min(-(-length // ROPE_CHUNK) * ROPE_CHUNK, self.max_seq_len)
        chunks = [table]
        for start in range(have, stop, ROPE_CHUNK):  # ``have`` is a whole number of chunks
            positions = torch.arange(start, start + ROPE_CHUNK, dtype=torch.float32,
                                     device=device)
            chunk = self._cos_sin(torch.outer(positions, inv_freq))
            chunks.append(chunk[: stop - start].to(table.dtype))
        return torch.cat(chunks)

    def _cos_sin(self, angles: torch.Tensor) -> torch.Tensor:
        """``[..., h_d/2]`` angles -> ``[..., h_d/2, 2]`` (cos, sin), each times the
        attention factor as transformers scales them."""
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return torch.stack([cos, sin], dim=-1)

    def reserve(self, length: int) -> None:
        """Make the table hold positions ``0 .. length - 1`` (whole chunks, at most
        ``max_seq_len`` rows).

        Raises:
            ValueError: ``length`` is past ``max_seq_len``.
        """
        if self.cache.size(0) < length:
            self.cache = self._grow(self.cache, rope_frequencies(
                self.rotary_dim, self.base, self.scaling), length)
        else:
            self._check_length(length)

    def _call_length(self, input_pos: torch.Tensor) -> int | None:
        """``max(input_pos) + 1``, or None when nothing needs it (the table is whole and the
        frequencies do not depend on the length). Reading it waits for the device: once per
        positions tensor (every layer gets the same one), again only if it changed in place."""
        if not input_pos.numel() or (self._switch_length is None
                                     and self.cache.size(0) >= self.max_seq_len):
            return None
        checked = self._checked_pos
        if (checked is not None and checked[0] is input_pos
                and checked[1] == input_pos._version):
            return checked[2]
        length = int(input_pos.max()) + 1
        self._checked_pos = (input_pos, input_pos._version, length)
        return length

    def _dynamic_update(self, length: int) -> None:
        """transformers' dynamic NTK: grow past the longest call so far, and go back to the
        original frequencies for a call shorter than the original context."""
        original = self._switch_length
        if length > self._dynamic_length:
            self._dynamic_freq = rope_frequencies(self.rotary_dim, self.base, self.scaling,
                                                  seq_len=length)
            self._dynamic_length = length
        if length < original < self._dynamic_length:
            self._dynamic_freq, self._dynamic_length = None, original

    def extra_repr(self) -> str:
        kind = "" if self.scaling is None else f", scaling={self.scaling.rope_type!r}"
        partial = "" if self.rotary_dim == self.head_dim else f", rotary_dim={self.rotary_dim}"
        return f"head_dim={self.head_dim}{partial}, style={self.style!r}{kind}"

    def cos_sin(self, seq_len: int, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """cos and sin of each position's angles, attention factor included, for one call of
        ``s`` tokens (the call :meth:`forward` makes; it updates the dynamic scaling's state).

        Args:
            seq_len: tokens in the call ``s``.
            input_pos: ``[b, s]`` positions, or None for ``0..s-1``.

        Returns:
            ``[s, h_d/2, 2]`` (or ``[b, s, h_d/2, 2]`` for ``input_pos``): ``[..., 0]`` cos,
            ``[..., 1]`` sin.

        Raises:
            ValueError: a position past ``max_seq_len``.
        """
        length = seq_len if input_pos is None else self._call_length(input_pos)
        table_name = "cache"
        if length is not None:
            self._check_length(length)
            kind = self.scaling.rope_type if self.scaling is not None else None
            if kind == "dynamic":
                self._dynamic_update(length)
                if self._dynamic_freq is not None:
                    positions = (torch.arange(seq_len, device=self.cache.device)
                                 if input_pos is None else input_pos)
                    inv_freq = self._dynamic_freq.to(self.cache.device)
                    # [.., s, 1] * [h_d/2]: transformers' product, so the same bits
                    angles = positions[..., None].float() * inv_freq
                    return self._cos_sin(angles).to(self.cache.dtype)
            if kind == "longrope" and length > self._switch_length:
                table_name = "long_cache"
                self.long_cache = self._grow(self.long_cache, rope_frequencies(
                    self.rotary_dim, self.base, self.scaling, seq_len=length), length)
            elif self.cache.size(0) < length:
                self.reserve(length)
        table = getattr(self, table_name)
        return table[:seq_len] if input_pos is None else table[input_pos]

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: ``[b, s, n_h, h_d]``.
            input_pos: ``[b, s]`` position of each token, or None for ``0..s-1``.

        Returns:
            ``[b, s, n_h, h_d]``, same dtype as ``x``.

        Raises:
            ValueError: a position past ``max_seq_len``.
        """
        seq_len, half = x.size(1), self.rotary_dim // 2
        passed = None
        if self.rotary_dim != self.head_dim:  # partial rotary: the trailing dims pass as they are
            x, passed = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        rope = self.cos_sin(seq_len, input_pos)
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
        if self.style == "interleaved" and not self.half_order_output:
            out = torch.stack(rotated, dim=-1).flatten(-2).type_as(x)
        else:
            out = torch.cat(rotated, dim=-1).type_as(x)
        return out if passed is None else torch.cat([out, passed], dim=-1)

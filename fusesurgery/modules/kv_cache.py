"""Key/value cache for incremental decoding."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Preallocated keys and values, filled left to right.

    Self-attention appends each step's keys and values; cross-attention fills it once with the
    encoder's keys and values at prefill and reads them on every later step.

    Args:
        batch_size: ``b``.
        num_kv_heads: ``n_kv``.
        max_seq_len: capacity ``m_s``.
        head_dim: ``h_d``.
        dtype: storage dtype.
        device: storage device.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device),
                             persistent=False)
        self.size = 0

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.size(2)

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.size = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k`` and ``v``, each ``[b, n_kv, s, h_d]``.

        Raises:
            ValueError: the cache would overflow.
        """
        new_size = self.size + k.size(2)
        if new_size > self.max_seq_len:
            raise ValueError(
                f"KV cache overflow: {new_size} positions > capacity {self.max_seq_len} (a "
                "forward without caches, such as a training step, needs teardown_caches() "
                "first)"
            )
        self.k_cache[:, :, self.size : new_size] = k
        self.v_cache[:, :, self.size : new_size] = v
        self.size = new_size

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values written so far, each ``[b, n_kv, size, h_d]``."""
        return self.k_cache[:, :, : self.size], self.v_cache[:, :, : self.size]

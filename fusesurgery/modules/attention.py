"""Multi-head attention with grouped-query heads, optional q/k norms, a sliding window and a
KV cache.

Shape notation:
    b: batch size, s: query length, s_kv: key/value length, d: model width,
    n_h: query heads, n_kv: key/value heads, h_d: head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusesurgery.modules.kv_cache import KVCache

# Half-precision dtypes the CPU attends in float32 when ``cpu_float32`` is set
_REDUCED = (torch.bfloat16, torch.float16)


def attends_in_float32(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether attention with ``cpu_float32`` set computes in float32 for inputs of ``dtype``
    on ``device``: half-precision inputs on the CPU."""
    return torch.device(device).type == "cpu" and dtype in _REDUCED


class MultiHeadAttention(nn.Module):
    """Attention used for decoder self-attention, fusion cross-attention and ViT layers.

    Args:
        embed_dim: model width ``d`` (of the queries' input).
        num_heads: query heads ``n_h``.
        num_kv_heads: key/value heads ``n_kv``; ``n_h`` must be a multiple of it (GQA).
        head_dim: per-head width ``h_d``.
        q_proj: ``d -> n_h * h_d`` (a bias here gives Qwen2-style biases).
        k_proj: ``d_kv -> n_kv * h_d``.
        v_proj: ``d_kv -> n_kv * h_d``.
        output_proj: ``n_h * h_d -> d``.
        pos_embeddings: rotary embedding applied to q and k, or None (cross-attention, ViT).
        q_norm: norm over ``h_d`` applied to each query head before RoPE, or None.
        k_norm: norm over ``h_d`` applied to each key head before RoPE, or None.
        is_causal: causal self-attention (decoder) rather than full attention.
        scale: factor on the attention scores; None for ``h_d ** -0.5``.
        sliding_window: causal attention sees only the last ``w`` keys: a query in cache
            slot ``p`` (its index in the sequence, padding included, as transformers counts)
            sees the keys in slots ``p - w + 1 .. p``; None sees every earlier key.
        softcap: scores pass ``cap * tanh(score / cap)`` before the mask (Gemma 2); None for
            none. Computed without SDPA, in transformers' eager order.
        cpu_float32: on the CPU, attend in float32 when the inputs are bfloat16 or float16
            (queries, keys and values cast up, exactly; the output cast back before
            ``output_proj``), keep a KV cache of such inputs in float32, and let SDPA's
            ``enable_gqa`` pair query heads with their key/value heads instead of copying
            the keys and values per query head (bitwise the same result on the CPU). The
            fusion cross-attention sets it: for a one-token query over hundreds of image
            positions (a decoding step with an image) the CPU's half-precision SDPA kernel
            costs about 6-9x its float32 one (an AVX2 CPU without bfloat16 instructions),
            and it rounds the probabilities to the half dtype before weighing the values,
            which float32 does not. Float32 inputs and other devices compute as without it,
            except for the ``enable_gqa`` pairing on the CPU. The exported transformers
            model's cross-attention does the same.

    Raises:
        ValueError: ``num_heads`` is not a multiple of ``num_kv_heads``, or a sliding
            window on attention that is not causal.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        output_proj: nn.Module,
        pos_embeddings: nn.Module | None = None,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        is_causal: bool = True,
        scale: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        cpu_float32: bool = False,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if sliding_window is not None and (not is_causal or sliding_window < 1):
            raise ValueError(f"a sliding window ({sliding_window}) needs causal attention and "
                             "a positive width")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.is_causal = is_causal
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.output_proj = output_proj
        self.pos_embeddings = pos_embeddings
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.cpu_float32 = cpu_float32
        self.kv_cache: KVCache | None = None

    def setup_cache(self, batch_size: int, dtype: torch.dtype, max_seq_len: int) -> None:
        """Allocate a KV cache of ``max_seq_len`` positions on the module's device (in float32
        where ``cpu_float32`` attends in float32, so no step casts the cached keys again)."""
        device = self.q_proj.weight.device
        if self.cpu_float32 and attends_in_float32(dtype, device):
            dtype = torch.float32
        self.kv_cache = KVCache(
            batch_size, self.num_kv_heads, max_seq_len, self.head_dim, dtype, device
        )

    def reset_cache(self) -> None:
        if self.kv_cache is not None:
            self.kv_cache.reset()

    def teardown_cache(self) -> None:
        """Free the KV cache: later calls attend to their own inputs again, as in training."""
        self.kv_cache = None

    def _project_kv(
        self, y: torch.Tensor, input_pos: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, s_kv, _ = y.shape
        k = self.k_proj(y).view(b, s_kv, self.num_kv_heads, self.head_dim)
        v = self.v_proj(y).view(b, s_kv, self.num_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.pos_embeddings is not None:
            k = self.pos_embeddings(k, input_pos=input_pos)
        return k.transpose(1, 2), v.transpose(1, 2)  # [b, n_kv, s_kv, h_d]

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: queries' input ``[b, s, d]``.
            y: keys' and values' input ``[b, s_kv, d_kv]`` (``x`` itself for self-attention),
                or None to attend to what the cache holds (cross-attention decode steps).
            mask: ``[b, s, s_kv]`` bool, True = attend. For causal attention None means
                causal; with a cache, a mask as wide as the cache capacity is cut to the filled
                part. For full attention None means attend to everything. A sliding window
                is applied on top of any mask.
            input_pos: ``[b, s]`` positions of the queries, or None for ``0..s-1`` (after
                what the cache holds).

        Returns:
            ``[b, s, d]``.

        Raises:
            ValueError: ``y`` is None and no cache holds keys and values.
        """
        b, s, _ = x.shape
        cache = self.kv_cache
        first_slot = cache.size if cache is not None and self.is_causal else 0
        if self.is_causal and cache is not None and input_pos is None:
            input_pos = torch.arange(cache.size, cache.size + s, device=x.device).expand(b, s)
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.pos_embeddings is not None:
            q = self.pos_embeddings(q, input_pos=input_pos)
        q = q.transpose(1, 2)  # [b, n_h, s, h_d]

        if y is None:
            if cache is None or cache.size == 0:
                raise ValueError("attention got no key/value input and its cache is empty")
            k, v = cache.filled()
        else:
            k, v = self._project_kv(y, input_pos)
            if cache is not None:
                if not self.is_causal:
                    cache.reset()  # new encoder output replaces the old one
                cache.update(k, v)
                k, v = cache.filled()

        use_causal_flag = False
        if mask is None and self.is_causal:
            if cache is None:
                use_causal_flag = True
            else:  # query at position p sees cached keys 0..p
                key_pos = torch.arange(k.size(2), device=x.device)
                mask = key_pos[None, None, :] <= input_pos[:, :, None]
        elif mask is not None and mask.size(-1) > k.size(2):
            mask = mask[..., : k.size(2)]
        if self.sliding_window is not None:
            mask = self._window(mask, use_causal_flag, first_slot, s, k.size(2), x.device)
            use_causal_flag = False

        in_dtype = q.dtype
        pair_in_kernel = False
        if self.cpu_float32 and q.device.type == "cpu" and self.softcap is None:
            pair_in_kernel = self.num_kv_heads != self.num_heads
            if attends_in_float32(in_dtype, q.device):
                q, k, v = q.float(), k.float(), v.float()  # exact; no-op on a float32 cache
        if self.num_kv_heads != self.num_heads and not pair_in_kernel:
            group = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        if self.softcap is not None:
            out = self._softcapped(q, k, v, mask, use_causal_flag)
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=None if mask is None else mask[:, None, :, :],
                is_causal=use_causal_flag,
                scale=self.scale,
                enable_gqa=pair_in_kernel,
            )
        return self.output_proj(out.to(in_dtype).transpose(1, 2).reshape(b, s, -1))

    def _window(self, mask: torch.Tensor | None, causal: bool, first_slot: int, s: int,
                s_kv: int, device: torch.device) -> torch.Tensor:
        """``mask`` (or causal attention) narrowed to the sliding window, ``[b|1, s, s_kv]``.
        Queries and keys are counted by their slot in the sequence, as transformers' sliding
        masks count them (not by RoPE position, which padding shifts)."""
        query_slot = torch.arange(first_slot, first_slot + s, device=device)[:, None]
        key_slot = torch.arange(s_kv, device=device)[None, :]
        window = key_slot > query_slot - self.sliding_window  # [s, s_kv]
        if causal:
            window = window & (key_slot <= query_slot)
        return window[None] if mask is None else mask & window

    def _softcapped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Attention with soft-capped scores, ``[b, n_h, s, h_d]``: scores in the inputs'
        dtype, capped, masked, a float32 softmax cast back (transformers' eager order)."""
        scale = self.scale if self.scale is not None else self.head_dim**-0.5
        scores = torch.matmul(q, k.transpose(2, 3)) * scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if causal:
            s, s_kv = scores.shape[-2:]
            mask = torch.ones(s, s_kv, dtype=torch.bool, device=q.device).tril()[None]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :, :], torch.finfo(scores.dtype).min)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, v)

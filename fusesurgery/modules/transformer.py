"""Transformer layers and the decoder that holds them.

Shape notation:
    b: batch size, s: token sequence length, s_e: encoder sequence length,
    d: model width, d_e: encoder width, v: vocabulary size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusesurgery.modules.attention import MultiHeadAttention


class _CachedLayer(nn.Module):
    """The KV-cache interface every decoder layer offers; ``_cache_length`` picks the
    capacity its attention needs."""

    attn: MultiHeadAttention

    def _cache_length(self, encoder_max_seq_len: int | None, decoder_max_seq_len: int) -> int:
        raise NotImplementedError

    def setup_cache(
        self, batch_size: int, dtype: torch.dtype, *, encoder_max_seq_len: int | None,
        decoder_max_seq_len: int,
    ) -> None:
        length = self._cache_length(encoder_max_seq_len, decoder_max_seq_len)
        self.attn.setup_cache(batch_size, dtype, length)

    def caches_are_enabled(self) -> bool:
        return self.attn.kv_cache is not None

    def reset_cache(self) -> None:
        self.attn.reset_cache()

    def teardown_cache(self) -> None:
        self.attn.teardown_cache()


class TransformerSelfAttentionLayer(_CachedLayer):
    """Pre-norm layer: ``h = x + attn(sa_norm(x))``, ``out = h + mlp(mlp_norm(h))``.

    Serves decoders (RMSNorm, RoPE, causal) and ViTs (LayerNorm, full attention).

    Args:
        attn: self-attention.
        mlp: feed-forward block.
        sa_norm: norm before attention.
        mlp_norm: norm before the feed-forward block.
        sa_scale: applied to the attention branch before the residual add (DINOv2's
            LayerScale), or None.
        mlp_scale: the same on the feed-forward branch, or None.
    """

    def __init__(
        self, *, attn: MultiHeadAttention, mlp: nn.Module, sa_norm: nn.Module, mlp_norm: nn.Module,
        sa_scale: nn.Module | None = None, mlp_scale: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.sa_norm = sa_norm
        self.attn = attn
        self.mlp_norm = mlp_norm
        self.mlp = mlp
        self.sa_scale = sa_scale
        self.mlp_scale = mlp_scale

    def _cache_length(self, encoder_max_seq_len: int | None, decoder_max_seq_len: int) -> int:
        return decoder_max_seq_len

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """
        Args:
            x: ``[b, s, d]``.
            mask: ``[b, s, s]`` bool (True = attend), or None for the attention's default.
            input_pos: ``[b, s]`` token positions, or None.
            **kwargs: encoder arguments meant for fusion layers; ignored here.

        Returns:
            ``[b, s, d]``.
        """
        normed = self.sa_norm(x)
        attended = self.attn(normed, normed, mask=mask, input_pos=input_pos)
        if self.sa_scale is not None:
            attended = self.sa_scale(attended)
        h = x + attended
        fed = self.mlp(self.mlp_norm(h))
        if self.mlp_scale is not None:
            fed = self.mlp_scale(fed)
        return h + fed


class TransformerCrossAttentionLayer(_CachedLayer):
    """Gated cross-attention onto encoder output, the Llama 3.2 Vision fusion layer.

    ``h = x + ca_scale(attn(ca_norm(x), encoder_input))``,
    ``out = h + mlp_scale(mlp(mlp_norm(h)))``.
    No positional embedding, not causal. Text rows whose ``encoder_mask`` row is all False
    ("skipped" rows, e.g. text before the first image) get exactly zero from both branches,
    so they leave the layer bitwise unchanged; with zero-initialised tanh gates every row does.

    Args:
        attn: cross-attention, keys and values from the encoder output.
        mlp: feed-forward block.
        ca_norm: norm before cross-attention.
        mlp_norm: norm before the feed-forward block.
        ca_scale: gate on the attention branch (``TanhGate``).
        mlp_scale: gate on the feed-forward branch (``TanhGate``).
    """

    def __init__(
        self,
        *,
        attn: MultiHeadAttention,
        mlp: nn.Module,
        ca_norm: nn.Module,
        mlp_norm: nn.Module,
        ca_scale: nn.Module,
        mlp_scale: nn.Module,
    ) -> None:
        super().__init__()
        if attn.pos_embeddings is not None or attn.is_causal:
            raise ValueError("cross-attention must be non-causal and without positional embeddings")
        self.ca_norm = ca_norm
        self.attn = attn
        self.ca_scale = ca_scale
        self.mlp_norm = mlp_norm
        self.mlp = mlp
        self.mlp_scale = mlp_scale

    def _cache_length(self, encoder_max_seq_len: int | None, decoder_max_seq_len: int) -> int:
        if encoder_max_seq_len is None:
            raise ValueError("a cross-attention cache needs encoder_max_seq_len")
        return encoder_max_seq_len

    def forward(
        self,
        x: torch.Tensor,
        *,
        encoder_input: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """
        Args:
            x: ``[b, s, d]``.
            encoder_input: ``[b, s_e, d_e]``, or None on decode steps that read the cache.
            encoder_mask: ``[b, s, s_e]`` bool, True = token attends to that encoder position.
            **kwargs: self-attention arguments (mask, input_pos); ignored here.

        Returns:
            ``[b, s, d]``; ``x`` itself when there is no encoder input and nothing cached.

        Raises:
            ValueError: ``encoder_mask`` does not have one row per token and one column per
                encoder position (or per cache position).
        """
        cache = self.attn.kv_cache
        if encoder_input is None and (cache is None or cache.size == 0):
            return x
        s_e = encoder_input.size(1) if encoder_input is not None else cache.size
        # a cached layer also takes a mask as wide as its cache (cut to the filled part)
        widths = (s_e, cache.max_seq_len) if cache is not None else (s_e,)
        if encoder_mask is not None and (encoder_mask.size(-2) != x.size(1)
                                         or encoder_mask.size(-1) not in widths):
            raise ValueError(
                f"encoder_mask is {list(encoder_mask.shape)}, the inputs need [b, {x.size(1)}, "
                f"{s_e}]: one row per token and one column per encoder position (n images of "
                "s_e tokens each give n * s_e columns)")
        skip_rows = None
        if encoder_mask is not None:
            skip_rows = ~encoder_mask.any(dim=-1, keepdim=True)  # [b, s, 1]
            # Give skipped rows something to attend to so softmax stays finite; their output
            # is zeroed below.
            encoder_mask = encoder_mask | skip_rows
        attn_out = self.attn(self.ca_norm(x), encoder_input, mask=encoder_mask)
        if skip_rows is not None:
            attn_out = attn_out.masked_fill(skip_rows, 0.0)
        h = x + self.ca_scale(attn_out)
        mlp_out = self.mlp(self.mlp_norm(h))
        if skip_rows is not None:
            mlp_out = mlp_out.masked_fill(skip_rows, 0.0)
        return h + self.mlp_scale(mlp_out)


class TransformerDecoder(nn.Module):
    """Decoder-only transformer: embeddings, layers, final norm, output projection.

    Args:
        tok_embeddings: ``nn.Embedding`` or ``FusionEmbedding``.
        layers: decoder layers, possibly ``FusionLayer``-wrapped.
        norm: final norm.
        output: ``d -> v`` projection, or None to tie it to ``tok_embeddings.weight``.
        max_seq_len: default capacity of self-attention caches.
        embed_scale: factor on the embeddings (Gemma: ``sqrt(d)``), rounded to float32 and
            then to the embeddings' dtype, as transformers' Gemma rounds it; None for none.
        final_softcap: the logits pass ``cap * tanh(logit / cap)``; None for none.
    """

    def __init__(
        self,
        *,
        tok_embeddings: nn.Module,
        layers: Sequence[nn.Module],
        norm: nn.Module,
        output: nn.Module | None,
        max_seq_len: int,
        embed_scale: float | None = None,
        final_softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.tok_embeddings = tok_embeddings
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.output = output
        self.max_seq_len = max_seq_len
        self.embed_scale = embed_scale
        self.final_softcap = final_softcap
        self.num_output_chunks = 0

    def set_num_output_chunks(self, num_output_chunks: int) -> None:
        """Return logits as a list of this many chunks along ``s`` (chunked-loss training)."""
        self.num_output_chunks = num_output_chunks

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: int | None = None,
        decoder_max_seq_len: int | None = None,
    ) -> None:
        """Allocate KV caches: self-attention for ``decoder_max_seq_len`` positions (default:
        ``max_seq_len``), cross-attention for ``encoder_max_seq_len``."""
        for layer in self.layers:
            layer.setup_cache(
                batch_size,
                dtype,
                encoder_max_seq_len=encoder_max_seq_len,
                decoder_max_seq_len=decoder_max_seq_len or self.max_seq_len,
            )

    def caches_are_enabled(self) -> bool:
        return any(layer.caches_are_enabled() for layer in self.layers)

    def reset_caches(self) -> None:
        for layer in self.layers:
            layer.reset_cache()

    def teardown_caches(self) -> None:
        """Free every KV cache ``setup_caches`` allocated: the decoder runs cache-free again
        (a training step after generation), and ``caches_are_enabled()`` is False."""
        for layer in self.layers:
            layer.teardown_cache()

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, output projection and soft-capping, ``[b, s, d] -> [b, s, v]`` in fp32
        (the capping in the logits' own dtype, as transformers does)."""
        h = self.norm(h)
        if self.output is None:
            logits = F.linear(h, self.tok_embeddings.weight)
        else:
            logits = self.output(h)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        encoder_input: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """
        Args:
            tokens: ``[b, s]`` token ids.
            mask: ``[b, s, s]`` bool self-attention mask (True = attend; with caches, as wide
                as the cache), or None for causal.
            encoder_input: ``[b, s_e, d_e]`` encoder output for the fusion layers, or None.
            encoder_mask: ``[b, s, s_e]`` bool, True = token attends to that encoder position.
            input_pos: ``[b, s]`` positions, or None for ``0..s-1`` (after cached positions).

        Returns:
            logits ``[b, s, v]`` fp32, or a list of ``num_output_chunks`` chunks of them.
        """
        h = self.tok_embeddings(tokens)
        if self.embed_scale is not None:
            h = h * torch.tensor(self.embed_scale, dtype=torch.float32, device=h.device).to(h.dtype)
        for layer in self.layers:
            h = layer(
                h,
                mask=mask,
                encoder_input=encoder_input,
                encoder_mask=encoder_mask,
                input_pos=input_pos,
            )
        if self.num_output_chunks > 0:
            return [self.unembed(chunk) for chunk in h.chunk(self.num_output_chunks, dim=1)]
        return self.unembed(h)

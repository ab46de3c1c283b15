"""Fusion wrappers: add new layers and tokens to a pretrained decoder without changing its keys.

``FusionLayer`` and ``FusionEmbedding`` wrap an original module and hide the wrapping from
``state_dict()`` / ``load_state_dict()`` (and from PyTorch's distributed state-dict API), so
the original checkpoint loads into the fused model and the fused checkpoint keeps every
original key. Only the new parameters (``fusion_params()``) appear under new names.

Shape notation:
    b: batch size, s: sequence length, d: embedding width, v: original vocabulary size,
    v_f: number of new (fusion) tokens.
"""

from __future__ import annotations

import types
from collections.abc import Iterable

import torch
from torch import nn

from fusesurgery.modules._init import embedding

_LAYER = "layer."
_FUSION_LAYER = "fusion_layer."
_EMBEDDING_WEIGHT = "embedding.weight"


def _rename_under_prefix(state_dict: dict, prefix: str, rename) -> None:
    """Rename the keys below ``prefix`` in place, keeping their relative order.

    ``rename`` maps a local key (the part after ``prefix``) to its new local key. Keys below
    the prefix are popped and re-inserted, so they end up after the others; when called from a
    state-dict hook they are the dict's tail already, so the overall order is unchanged.
    """
    local = [key for key in state_dict if key.startswith(prefix)]
    items = [(key, state_dict.pop(key)) for key in local]
    for key, value in items:
        state_dict[prefix + rename(key[len(prefix):])] = value


def _rename_missing_keys(incompatible_keys, rename) -> None:
    """Report missing keys under their state-dict names rather than parameter names."""
    missing = incompatible_keys.missing_keys
    missing[:] = [rename(key) for key in missing]


class FusionLayer(nn.Module):
    """Runs a new ``fusion_layer`` before (or after) an original decoder ``layer``.

    Both receive the same keyword arguments (``mask``, ``encoder_input``, ``encoder_mask``,
    ``input_pos``) and ignore the ones they do not use. In the state dict the original layer's
    keys keep their pre-fusion names (``layers.3.attn.q_proj.weight``, not
    ``layers.3.layer.attn.q_proj.weight``); the new layer's keys are ``layers.3.fusion_layer.*``.

    Args:
        layer: the original decoder layer.
        fusion_layer: the new layer, e.g. a gated ``TransformerCrossAttentionLayer``.
        fusion_first: run ``fusion_layer`` first (Flamingo, Llama 3.2 Vision).

    Raises:
        ValueError: ``layer`` has its own child or parameter named ``fusion_layer``, which
            would make the unwrapped keys ambiguous.
    """

    def __init__(self, layer: nn.Module, fusion_layer: nn.Module, fusion_first: bool = True):
        super().__init__()
        own_names = {name for name, _ in layer.named_children()} | {
            name for name, _ in layer.named_parameters(recurse=False)
        } | {name for name, _ in layer.named_buffers(recurse=False)}
        if "fusion_layer" in own_names:
            raise ValueError(
                "the wrapped layer has a direct member named 'fusion_layer'; its keys would "
                "collide with the fusion layer's in the state dict"
            )
        self.layer = layer
        self.fusion_layer = fusion_layer
        self.fusion_first = fusion_first
        self._load_prefix = ""
        self.register_state_dict_post_hook(FusionLayer._unwrap_keys)
        self.register_load_state_dict_pre_hook(FusionLayer._wrap_keys)
        self.register_load_state_dict_post_hook(FusionLayer._unwrap_missing_keys)

    @staticmethod
    def _unwrap_local(local_key: str) -> str:
        # Only the leading segment: a child called `sublayer` or `fusion_layer` deeper inside
        # the wrapped layer keeps its name.
        return local_key[len(_LAYER):] if local_key.startswith(_LAYER) else local_key

    @staticmethod
    def _wrap_local(local_key: str) -> str:
        return local_key if local_key.startswith(_FUSION_LAYER) else _LAYER + local_key

    def _unwrap_keys(self, state_dict, prefix, local_metadata) -> None:
        _rename_under_prefix(state_dict, prefix, FusionLayer._unwrap_local)

    def _wrap_keys(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        self._load_prefix = prefix
        _rename_under_prefix(state_dict, prefix, FusionLayer._wrap_local)

    def _unwrap_missing_keys(self, incompatible_keys) -> None:
        prefix = self._load_prefix

        def rename(key: str) -> str:
            if key.startswith(prefix + _LAYER):
                return prefix + key[len(prefix) + len(_LAYER):]
            return key

        _rename_missing_keys(incompatible_keys, rename)

    def _fqn_modifiers(self) -> dict[str, str]:
        """For ``torch.distributed.checkpoint.state_dict``: state-dict names directly below
        this module that live inside ``self.layer``."""
        names = [name for name, _ in self.layer.named_children()]
        names += [name for name, _ in self.layer.named_parameters(recurse=False)]
        names += [name for name, _ in self.layer.named_buffers(recurse=False)]
        return dict.fromkeys(names, "layer")

    def setup_cache(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: int | None,
        decoder_max_seq_len: int,
    ) -> None:
        """Allocate the KV caches of both layers."""
        for module in (self.layer, self.fusion_layer):
            module.setup_cache(
                batch_size,
                dtype,
                encoder_max_seq_len=encoder_max_seq_len,
                decoder_max_seq_len=decoder_max_seq_len,
            )

    def caches_are_enabled(self) -> bool:
        return self.layer.caches_are_enabled()

    def reset_cache(self) -> None:
        self.layer.reset_cache()
        self.fusion_layer.reset_cache()

    def teardown_cache(self) -> None:
        """Free the KV caches of both layers."""
        self.layer.teardown_cache()
        self.fusion_layer.teardown_cache()

    def fusion_params(self) -> list[str]:
        """Names (relative to this module) of the new layer's parameters."""
        return [f"fusion_layer.{name}" for name, _ in self.fusion_layer.named_parameters()]

    def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """
        Args:
            x: ``[b, s, d]``.
            **kwargs: passed to both layers.

        Returns:
            ``[b, s, d]``.
        """
        if self.fusion_first:
            return self.layer(self.fusion_layer(x, **kwargs), **kwargs)
        return self.fusion_layer(self.layer(x, **kwargs), **kwargs)


class FusionEmbedding(nn.Module):
    """Token embedding with ``v_f`` new tokens in a second, trainable table.

    Ids ``[0, v)`` read the original table ``embedding``; ids ``[v, v + v_f)`` read
    ``fusion_embedding``. The original table keeps its key (``tok_embeddings.weight``); the new
    one is ``tok_embeddings.fusion_embedding.weight``. The lookup has fixed shapes (no
    ``masked_select``), so it runs without a host sync and under ``torch.compile(fullgraph=True)``
    and ``torch.export``.

    Args:
        vocab_size: original vocabulary ``v``.
        fusion_vocab_size: new tokens ``v_f``.
        embed_dim: width ``d``.
    """

    def __init__(self, vocab_size: int, fusion_vocab_size: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = embedding(vocab_size, embed_dim)
        self.fusion_embedding = embedding(fusion_vocab_size, embed_dim)
        self.dim = embed_dim
        self.vocab_size = vocab_size
        self.num_embeddings = vocab_size + fusion_vocab_size
        self._load_prefix = ""
        self.register_state_dict_post_hook(FusionEmbedding._unwrap_keys)
        self.register_load_state_dict_pre_hook(FusionEmbedding._wrap_keys)
        self.register_load_state_dict_post_hook(FusionEmbedding._unwrap_missing_keys)

    @property
    def weight(self) -> torch.Tensor:
        """The original table ``[v, d]``, so a tied output projection keeps working."""
        return self.embedding.weight

    @staticmethod
    def _unwrap_local(local_key: str) -> str:
        return "weight" if local_key == _EMBEDDING_WEIGHT else local_key

    @staticmethod
    def _wrap_local(local_key: str) -> str:
        return _EMBEDDING_WEIGHT if local_key == "weight" else local_key

    def _unwrap_keys(self, state_dict, prefix, local_metadata) -> None:
        _rename_under_prefix(state_dict, prefix, FusionEmbedding._unwrap_local)

    def _wrap_keys(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Renames only what is there: a partial dict holding just the fusion table loads fine.
        self._load_prefix = prefix
        _rename_under_prefix(state_dict, prefix, FusionEmbedding._wrap_local)

    def _unwrap_missing_keys(self, incompatible_keys) -> None:
        wrapped = self._load_prefix + _EMBEDDING_WEIGHT
        unwrapped = self._load_prefix + "weight"
        _rename_missing_keys(incompatible_keys, lambda k: unwrapped if k == wrapped else k)

    def _fqn_modifiers(self) -> dict[str, str]:
        """For ``torch.distributed.checkpoint.state_dict``: ``weight`` lives in ``embedding``."""
        return {"weight": "embedding"}

    def fusion_params(self) -> list[str]:
        return ["fusion_embedding.weight"]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """
        Args:
            tokens: ``[b, s]`` ids in ``[0, v + v_f)``.

        Returns:
            ``[b, s, d]``.
        """
        is_new = tokens >= self.vocab_size
        # Both lookups run on every position with clamped ids; `where` keeps the right one.
        # Same shapes whatever the data, and the discarded rows get zero gradient.
        original = self.embedding(tokens.clamp(max=self.vocab_size - 1))
        new = self.fusion_embedding((tokens - self.vocab_size).clamp(min=0))
        return torch.where(is_new.unsqueeze(-1), new, original)

    @torch.no_grad()
    def merged(self) -> nn.Embedding:
        """One plain ``nn.Embedding`` of ``v + v_f`` rows with identical outputs, for export
        after fine-tuning (its single key is ``weight``)."""
        table = torch.cat([self.embedding.weight, self.fusion_embedding.weight], dim=0)
        merged = nn.Embedding(
            self.num_embeddings, self.dim, device=table.device, dtype=table.dtype
        )
        merged.weight.copy_(table)
        return merged


def register_fusion_module(module: nn.Module) -> nn.Module:
    """Mark every parameter of ``module`` as a fusion parameter (e.g. a new projection head).

    Gives the module a ``fusion_params()`` method listing its parameter names, which
    ``get_fusion_params`` and ``DeepFusionModel`` pick up. Returns the module.
    """

    def fusion_params(self: nn.Module) -> list[str]:
        return [name for name, _ in self.named_parameters()]

    module.fusion_params = types.MethodType(fusion_params, module)
    return module


def get_fusion_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """All fusion parameters of ``model`` by full parameter name.

    Raises:
        ValueError: a module declares a fusion parameter it does not have.
    """
    params = dict(model.named_parameters())
    found: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        declare = getattr(module, "fusion_params", None)
        if not callable(declare):
            continue
        for local in declare():
            name = f"{module_name}.{local}" if module_name else local
            if name not in params:
                raise ValueError(f"{module_name or 'model'} declares unknown fusion param {local}")
            found[name] = params[name]
    return found


def set_trainable_params(model: nn.Module, trainable: Iterable[str]) -> None:
    """``requires_grad`` = True for the named parameters, False for every other one.

    Raises:
        ValueError: a name is not a parameter of ``model``.
    """
    trainable = set(trainable)
    params = dict(model.named_parameters())
    unknown = trainable - params.keys()
    if unknown:
        raise ValueError(f"not parameters of the model: {sorted(unknown)[:5]}")
    for name, param in params.items():
        param.requires_grad_(name in trainable)


def mask_padding_tokens(encoder_mask: torch.Tensor | None, token_mask: torch.Tensor,
                        seq_len: int) -> torch.Tensor:
    """An ``encoder_mask`` with the columns of padding encoder tokens (NaFlex's padding
    patches) set to False, so no text token attends to them.

    Args:
        encoder_mask: ``[b, s, s_e]`` bool, or None (every token attends to every real one).
        token_mask: ``[b, s_e]``, nonzero for real encoder tokens (``pixel_attention_mask``).
        seq_len: ``s``.

    Returns:
        ``[b, s, s_e]`` bool.

    Raises:
        ValueError: ``encoder_mask`` is not as wide as ``token_mask``.
    """
    real = token_mask.bool()[:, None, :]  # [b, 1, s_e]
    if encoder_mask is None:
        return real.expand(real.size(0), seq_len, real.size(-1))
    if encoder_mask.dim() != 3 or encoder_mask.size(-1) != real.size(-1) or (
            encoder_mask.size(0) != real.size(0)):
        raise ValueError(f"encoder_mask {list(encoder_mask.shape)} does not fit "
                         f"pixel_attention_mask {list(token_mask.shape)}: it needs one column "
                         "per patch of the padded NaFlex input")
    return encoder_mask & real


class DeepFusionModel(nn.Module):
    """A pretrained encoder feeding a pretrained decoder through fusion layers.

    The encoder's output ``[b, s_e, d_e]`` goes to the decoder as ``encoder_input``. By default
    only the fusion parameters train: the decoder and encoder stay frozen.

    Args:
        decoder: a ``TransformerDecoder`` carrying ``FusionLayer``s / ``FusionEmbedding``.
        encoder: any module called as ``encoder(**encoder_input)`` that returns ``[b, s_e, d_e]``.
        decoder_trainable: train every decoder parameter.
        encoder_trainable: train every encoder parameter.
        fusion_trainable: train the fusion parameters (new layers, tokens, projection head);
            False freezes them even inside a trainable decoder or encoder.
    """

    def __init__(
        self,
        decoder: nn.Module,
        encoder: nn.Module,
        *,
        decoder_trainable: bool = False,
        encoder_trainable: bool = False,
        fusion_trainable: bool = True,
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder
        trainable: set[str] = set()
        if encoder_trainable:
            trainable |= {f"encoder.{name}" for name, _ in encoder.named_parameters()}
        if decoder_trainable:
            trainable |= {f"decoder.{name}" for name, _ in decoder.named_parameters()}
        fusion = set(get_fusion_params(self))
        trainable = trainable | fusion if fusion_trainable else trainable - fusion
        set_trainable_params(self, trainable)

    def set_num_output_chunks(self, num_output_chunks: int) -> None:
        self.decoder.set_num_output_chunks(num_output_chunks)

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: int | None = None,
        decoder_max_seq_len: int | None = None,
    ) -> None:
        """Allocate the decoder's KV caches (see ``TransformerDecoder.setup_caches``)."""
        self.decoder.setup_caches(
            batch_size,
            dtype,
            encoder_max_seq_len=encoder_max_seq_len,
            decoder_max_seq_len=decoder_max_seq_len,
        )

    def caches_are_enabled(self) -> bool:
        return self.decoder.caches_are_enabled()

    def reset_caches(self) -> None:
        self.decoder.reset_caches()

    def teardown_caches(self) -> None:
        """Free the decoder's KV caches (see ``TransformerDecoder.teardown_caches``)."""
        self.decoder.teardown_caches()

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        encoder_input: dict | None = None,
        encoder_mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """
        Args:
            tokens: ``[b, s]``.
            mask: ``[b, s, s]`` bool self-attention mask, or None for causal.
            encoder_input: keyword arguments of the encoder (e.g. ``{"images": ...}``:
                ``[b, c, h, w]``, or ``[b, n, c, h, w]`` for ``n`` images per sample), or
                None on text-only calls and decode steps that read the cross-attention cache.
            encoder_mask: ``[b, s, s_e]`` bool (``[b, s, n * s_e]`` with ``n`` images per
                sample), True = token attends to that encoder position. With NaFlex inputs
                (``pixel_values``, ``pixel_attention_mask``, ``spatial_shapes``) the padding
                patches' columns are masked out whatever it says; None then lets every token
                attend to the real patches.
            input_pos: ``[b, s]`` positions, or None.

        Returns:
            logits ``[b, s, v]``, or a list of chunks of them.
        """
        encoder_output = None if encoder_input is None else self.encoder(**encoder_input)
        if encoder_input is not None and encoder_input.get("pixel_attention_mask") is not None:
            encoder_mask = mask_padding_tokens(encoder_mask, encoder_input["pixel_attention_mask"],
                                               tokens.size(1))
        return self.decoder(
            tokens,
            mask=mask,
            encoder_input=encoder_output,
            encoder_mask=encoder_mask,
            input_pos=input_pos,
        )


__all__ = [
    "DeepFusionModel",
    "mask_padding_tokens",
    "FusionEmbedding",
    "FusionLayer",
    "get_fusion_params",
    "register_fusion_module",
    "set_trainable_params",
]

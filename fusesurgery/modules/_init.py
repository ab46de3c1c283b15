"""Parameter initialisation that costs nothing when a model is built on the meta device.

Models are built under ``torch.device("meta")`` and then loaded with ``assign=True``, so their
initial values are never used. Most of torch's in-place initialisers are free on meta tensors,
but ``normal_`` is not: its meta implementation lives in ``torch._refs`` and its first call
imports ``torch._dynamo`` (about 2 s of every ``fuse``, ``validate`` and ``push``). These
helpers skip the draw on meta tensors and behave exactly like torch's everywhere else.
"""

from __future__ import annotations

import torch
from torch import nn


def normal_(tensor: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    """``nn.init.normal_(tensor, std=std)``, except on a meta tensor (left as it is)."""
    if tensor.is_meta:
        return tensor
    return nn.init.normal_(tensor, std=std)


def embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """``nn.Embedding(num_embeddings, embedding_dim)`` (weights drawn from N(0, 1)), with no
    draw when the default device is meta."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num_embeddings, embedding_dim,
                            _weight=torch.empty(num_embeddings, embedding_dim))
    return nn.Embedding(num_embeddings, embedding_dim)

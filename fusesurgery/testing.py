"""Valid but empty checkpoints for tests and benchmarks: real headers, sparse data.

A "sparse" safetensors file has a correct header and a data region that is a hole in the file
(``truncate`` past the header): it reads as zeros and takes no disk space, so a
Llama-3.1-405B-shaped checkpoint (810 GB apparent) is written in a second and serves to time
everything that works from metadata alone (inspect, key diffs, planning).

The bytes come from the write layer (:func:`fusesurgery.write.safetensors_header`,
:func:`fusesurgery.write.plan_shards`), so a sparse checkpoint is laid out, named and indexed
the way a real one is; only the tensors' order is kept as given, so a test may also lay out
deliberately misaligned tensors.

Example (a 405B-shaped sharded checkpoint, HF key names)::

    from fusesurgery.config import preset
    from fusesurgery.convert import layout_tensor_infos
    from fusesurgery.testing import write_sparse_sharded_safetensors

    infos = layout_tensor_infos(preset("llama3_1_405b"), "hf")
    index = write_sparse_sharded_safetensors(tmp_dir, infos, max_shard_size="5GiB")
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from fusesurgery.io.tensor_info import TensorInfo
from fusesurgery.write import plan_shards, safetensors_header

TensorInfos = Mapping[str, TensorInfo] | Sequence[TensorInfo]

# 5 GiB rather than the writer's 5 GB: the 405B tests' shard counts were fixed with this limit.
DEFAULT_SPARSE_SHARD_SIZE = "5GiB"


def _as_list(infos: TensorInfos) -> list[TensorInfo]:
    return list(infos.values()) if isinstance(infos, Mapping) else list(infos)


def write_sparse_safetensors(
    path: str | Path, infos: TensorInfos, metadata: Mapping[str, str] | None = None
) -> int:
    """Write a valid safetensors file whose tensors are all zeros and occupy no disk blocks.

    Args:
        path: the file to create (overwritten if present).
        infos: the tensors (a ``{name: TensorInfo}`` map or a sequence), stored in this order.
        metadata: the ``__metadata__`` map; ``{"format": "pt"}`` when None.

    Returns:
        The file's apparent size in bytes.
    """
    tensors = _as_list(infos)
    header = safetensors_header(tensors, metadata if metadata is not None else {"format": "pt"})
    size = len(header) + sum(info.nbytes for info in tensors)
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(size)
    return size


def write_sparse_sharded_safetensors(
    directory: str | Path,
    infos: TensorInfos,
    *,
    max_shard_size: int | str = DEFAULT_SPARSE_SHARD_SIZE,
) -> Path:
    """Write a sparse checkpoint sharded as the writer shards it, plus its index.

    Shards are planned by :func:`fusesurgery.write.plan_shards` (in order, a new shard when the
    next tensor would pass ``max_shard_size``) and named the Hugging Face way:
    ``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``, or a single
    ``model.safetensors`` with no index when everything fits in one file.

    Args:
        directory: where to write (created if missing).
        infos: the tensors (a ``{name: TensorInfo}`` map or a sequence), stored in this order.
        max_shard_size: the data limit per shard, as bytes or a string such as ``"5GB"``.

    Returns:
        The index file's path, or the single shard's path when there is no index.

    Raises:
        WriteError: a name is repeated or the size limit is not understood.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _as_list(infos)
    by_name = {info.name: info for info in tensors}
    plan = plan_shards(tensors, max_shard_size)
    for shard in plan.shards:
        write_sparse_safetensors(directory / shard.filename, [by_name[k] for k in shard.keys])
    if plan.index_filename is None:
        return directory / plan.shards[0].filename
    index_path = directory / plan.index_filename
    index_path.write_text(json.dumps(plan.index(), indent=2, sort_keys=True) + "\n")
    return index_path


__all__ = [
    "DEFAULT_SPARSE_SHARD_SIZE",
    "write_sparse_safetensors",
    "write_sparse_sharded_safetensors",
]


def reference_fusion_embedding_forward(embedding, tokens: torch.Tensor) -> torch.Tensor:
    """The reference design's ``FusionEmbedding`` lookup (``masked_select`` / ``masked_scatter``),
    for comparing outputs and speed against fusesurgery's fixed-shape one.

    Its intermediate shapes depend on how many new tokens ``tokens`` holds: a device-to-host
    sync on GPU, unbacked symbolic shapes under ``torch.compile`` / ``torch.export``.

    Args:
        embedding: a ``fusesurgery.modules.FusionEmbedding``.
        tokens: ``[b, s]`` ids.

    Returns:
        ``[b, s, d]``.
    """
    b, s = tokens.shape
    vocab = embedding.embedding.num_embeddings
    is_original = tokens < vocab
    original = embedding.embedding(torch.masked_select(tokens, is_original))
    new = embedding.fusion_embedding(torch.masked_select(tokens, ~is_original) - vocab)
    out = torch.empty(b, s, embedding.dim, dtype=original.dtype, device=original.device)
    is_original = is_original.unsqueeze(-1).expand(b, s, embedding.dim)
    return out.masked_scatter(is_original, original).masked_scatter(~is_original, new)

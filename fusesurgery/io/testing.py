"""Building valid but empty checkpoints for tests and benchmarks: real headers, sparse data.

A "sparse" safetensors file has a correct header and a data region that is a hole in the file
(``truncate`` past the header): it reads as zeros and takes no disk space, so a
Llama-3.1-405B-shaped checkpoint (810 GB apparent) can be written in a second and used to time
everything that works from metadata alone.

Example (a 405B-shaped sharded checkpoint, HF key names)::

    from fusesurgery.config import preset
    from fusesurgery.io.testing import hf_decoder_tensor_shapes, write_sparse_sharded_safetensors

    shapes = hf_decoder_tensor_shapes(preset("llama3_1_405b"))
    index = write_sparse_sharded_safetensors(tmp_dir, shapes, max_shard_bytes=5 * 2**30)
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from fusesurgery.config import DecoderConfig
from fusesurgery.io.tensor_info import SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS

ShapeAndDtype = tuple[Sequence[int], torch.dtype | str]

_HEADER_ALIGNMENT = 8  # safetensors pads its header so the data region starts 8-aligned


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, torch.dtype):
        return TORCH_TO_SAFETENSORS[dtype]
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"unknown safetensors dtype {dtype!r}")
    return dtype


def safetensors_header(
    infos: Mapping[str, ShapeAndDtype], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, int]:
    """The bytes before the data region of a safetensors file holding ``infos``, in order.

    Args:
        infos: tensor name -> (shape, dtype as torch.dtype or safetensors name).
        metadata: the ``__metadata__`` map; ``{"format": "pt"}`` when None.

    Returns:
        ``(prefix, data_size)``: the 8-byte length plus padded JSON, and the data bytes that
        must follow it.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, (shape, dtype) in infos.items():
        dtype_name = _dtype_name(dtype)
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype_name].itemsize
        header[name] = {
            "dtype": dtype_name,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % _HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text, offset


def write_sparse_safetensors(
    path: str | Path,
    infos: Mapping[str, ShapeAndDtype],
    *,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write a valid safetensors file whose tensors are all zeros and occupy no disk blocks.

    Args:
        path: the file to create (overwritten if present).
        infos: tensor name -> (shape, dtype), in the order to store them.
        metadata: the ``__metadata__`` map; ``{"format": "pt"}`` when None.

    Returns:
        The file's (apparent) size in bytes.
    """
    prefix, data_size = safetensors_header(infos, metadata)
    with open(path, "wb") as handle:
        handle.write(prefix)
        handle.truncate(len(prefix) + data_size)
    return len(prefix) + data_size


def write_sparse_sharded_safetensors(
    directory: str | Path,
    infos: Mapping[str, ShapeAndDtype],
    *,
    max_shard_bytes: int = 5 * 2**30,
    index_name: str = "model.safetensors.index.json",
) -> Path:
    """Write sparse ``model-0000k-of-0000n.safetensors`` shards plus their index.

    Tensors are packed in order, a new shard starting when the next tensor would push the
    current one past ``max_shard_bytes`` (a tensor larger than that gets a shard of its own).

    Args:
        directory: where to write (created if missing).
        infos: tensor name -> (shape, dtype), in the order to store them.
        max_shard_bytes: shard size limit in bytes.
        index_name: the index file's name.

    Returns:
        The index file's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, ShapeAndDtype]] = [{}]
    shard_bytes = 0
    for name, (shape, dtype) in infos.items():
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[_dtype_name(dtype)].itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = (shape, dtype)
        shard_bytes += nbytes
    weight_map: dict[str, str] = {}
    total_size = 0
    for number, shard in enumerate(shards, start=1):
        shard_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_sparse_safetensors(directory / shard_name, shard)
        weight_map.update(dict.fromkeys(shard, shard_name))
        total_size += sum(
            math.prod(shape) * SAFETENSORS_DTYPES[_dtype_name(dtype)].itemsize
            for shape, dtype in shard.values()
        )
    index_path = directory / index_name
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    index_path.write_text(json.dumps(index, indent=2))
    return index_path


def hf_decoder_tensor_shapes(
    config: DecoderConfig, dtype: torch.dtype = torch.bfloat16
) -> dict[str, ShapeAndDtype]:
    """Names and shapes of a Hugging Face Llama-family decoder checkpoint, for test data only.

    Args:
        config: the decoder (e.g. ``preset("llama3_1_405b")``).
        dtype: every tensor's dtype.

    Returns:
        HF key -> (shape, dtype), in the order HF checkpoints list them.
    """
    d, h_d = config.embed_dim, config.head_dim
    q_rows, kv_rows = config.num_heads * h_d, config.num_kv_heads * h_d
    shapes: dict[str, ShapeAndDtype] = {
        "model.embed_tokens.weight": ((config.vocab_size, d), dtype)
    }
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}."
        shapes[prefix + "input_layernorm.weight"] = ((d,), dtype)
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            shapes[f"{prefix}self_attn.{proj}.weight"] = ((rows, d), dtype)
            if config.attn_bias:
                shapes[f"{prefix}self_attn.{proj}.bias"] = ((rows,), dtype)
        shapes[prefix + "self_attn.o_proj.weight"] = ((d, q_rows), dtype)
        shapes[prefix + "post_attention_layernorm.weight"] = ((d,), dtype)
        shapes[prefix + "mlp.gate_proj.weight"] = ((config.intermediate_dim, d), dtype)
        shapes[prefix + "mlp.up_proj.weight"] = ((config.intermediate_dim, d), dtype)
        shapes[prefix + "mlp.down_proj.weight"] = ((d, config.intermediate_dim), dtype)
    shapes["model.norm.weight"] = ((d,), dtype)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = ((config.vocab_size, d), dtype)
    return shapes

"""Create the tensors a fusion adds, one at a time, reproducibly.

Each tensor is drawn from its own generator, seeded from the fuse seed and the tensor's name,
so its values do not depend on the order tensors are written in or on which other tensors
exist. Values are drawn directly in the tensor's dtype: one tensor in memory, no float32
staging copy.
"""

from __future__ import annotations

import math
import mmap
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fusesurgery.surgery.fuse_plan import NewTensor

# rows of the embedding table summed per step when computing its statistics
STATS_CHUNK_ROWS = 4096
# float32 values drawn per step for a uniform init
UNIFORM_CHUNK = 2**20


@dataclass(frozen=True)
class EmbeddingStats:
    """Per-dimension mean and standard deviation of an embedding table, float32 ``[d]``."""

    mean: torch.Tensor
    std: torch.Tensor


def embedding_stats(table: torch.Tensor, *, with_std: bool = True) -> EmbeddingStats:
    """Mean (and std) of each dimension of ``table`` ``[v, d]``: chunks of rows summed in
    float32, accumulated in float64, so memory stays one chunk however large the
    (mmap-backed) table. The std needs a second pass; ``with_std=False`` skips it (zeros)."""
    rows, dim = table.shape
    total = torch.zeros(dim, dtype=torch.float64)
    for start in range(0, rows, STATS_CHUNK_ROWS):
        total += table[start:start + STATS_CHUNK_ROWS].sum(0, dtype=torch.float32)
    mean = total / max(rows, 1)
    if not with_std:
        return EmbeddingStats(mean.float(), torch.zeros(dim))
    squares = torch.zeros(dim, dtype=torch.float64)
    centre = mean.float()
    for start in range(0, rows, STATS_CHUNK_ROWS):
        chunk = table[start:start + STATS_CHUNK_ROWS].float() - centre
        squares += (chunk * chunk).sum(0)
    return EmbeddingStats(centre, (squares / max(rows, 1)).sqrt().float())


def generator_for(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``name``, independent per tensor: the crc32 of
    the name started from the seed (0 to 2**32 - 1). torch's CPU generator keeps only the low
    32 bits of what it is seeded with, so the seed is mixed into those bits: for one name,
    two seeds never give the same stream (crc32 from another start value differs), and seed 0
    gives the crc32 of the name, as it always did."""
    return torch.Generator().manual_seed(zlib.crc32(name.encode(), int(seed) & 0xFFFFFFFF))


def _mapped_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in an anonymous mapping of its own, unmapped when the tensor is
    freed. Tensors drawn on several threads and freed once written would otherwise leave
    malloc's per-thread arenas holding freed blocks of megabytes (its threshold for mapping
    large blocks rises as they are freed): the process's memory stays what is alive."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


def _uniform(spec: NewTensor, bound: float, generator: torch.Generator) -> torch.Tensor:
    """U(-bound, bound) drawn in float32 chunks of rows into the output dtype: faster than
    half-precision ``uniform_`` and never more than one chunk beside the output."""
    out = _mapped_empty(spec.shape, spec.dtype)
    flat = out.view(-1)
    scratch = torch.empty(min(UNIFORM_CHUNK, flat.numel()))
    for start in range(0, flat.numel(), UNIFORM_CHUNK):
        piece = flat[start:start + UNIFORM_CHUNK]
        piece.copy_(scratch[:piece.numel()].uniform_(-bound, bound, generator=generator))
    return out


def make_new_tensor(
    spec: NewTensor, seed: int, stats: Callable[[], EmbeddingStats] | None = None
) -> torch.Tensor:
    """The values of one new tensor.

    Args:
        spec: the planned tensor.
        seed: the fuse seed.
        stats: returns the decoder table's statistics (for ``("embedding", ...)`` inits).

    Returns:
        A CPU tensor of ``spec.shape`` and ``spec.dtype``.

    Raises:
        ValueError: an unknown init rule (a programming error).
    """
    rule, *args = spec.init
    if rule == "zeros":
        return torch.zeros(spec.shape, dtype=spec.dtype)
    if rule == "ones":
        return torch.ones(spec.shape, dtype=spec.dtype)
    if rule == "uniform":
        (bound,) = args
        return _uniform(spec, bound, generator_for(seed, spec.name))
    if rule == "embedding":
        (how,) = args
        if how == "zeros":
            return torch.zeros(spec.shape, dtype=spec.dtype)
        table = stats()
        if how == "mean":
            return table.mean.expand(spec.shape).to(spec.dtype).contiguous()
        if how == "normal":
            noise = torch.randn(spec.shape, generator=generator_for(seed, spec.name))
            return (table.mean + noise * table.std).to(spec.dtype)
    raise ValueError(f"unknown init {spec.init!r} for {spec.name}")


__all__ = ["EmbeddingStats", "embedding_stats", "generator_for", "make_new_tensor"]

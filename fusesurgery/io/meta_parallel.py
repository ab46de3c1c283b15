"""Model-parallel Meta checkpoints (``consolidated.00.pth`` ... ``consolidated.NN.pth``) read as
one state dict.

Meta's reference code (fairscale layers) saves one file per model-parallel rank. Each file
holds every key; a key's tensor is either a slice of the full tensor or a full copy:

- column-parallel linears (``wq``, ``wk``, ``wv``, ``w1``, ``w3``, ``output``) are split along
  dim 0, their output features;
- row-parallel linears (``wo``, ``w2``) are split along dim 1, their input features;
- the token embedding is split along the vocabulary (dim 0, Llama 3's
  ``VocabParallelEmbedding``) or along the embedding dim (dim 1, Llama 2's
  ``ParallelEmbedding``); which one shows in the shapes, since ``wq``'s slices keep the full
  model dim;
- norms and RoPE frequency buffers are replicated.

Shapes and dtypes of the merged tensors are known from the files' metadata alone. A merged
tensor is built (one concatenation, so one copy of that tensor) only when it is asked for.
Replicated tensors are taken from rank 0 unchecked: comparing them would read every file.
Merged tensors exist nowhere on disk, so a model loaded from the ranks holds them in memory;
convert the checkpoint once (``fusesurgery convert``, one tensor in memory at a time) to get
files that load memory-mapped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from fusesurgery.errors import CheckpointError
from fusesurgery.io.tensor_info import TensorInfo

if TYPE_CHECKING:
    import torch

# Meta key template -> the dim its model-parallel slices are concatenated along (None: the
# tensor is replicated on every rank). The embedding's dim is decided from the shapes.
EMBEDDING_KEY = "tok_embeddings.weight"
META_PARALLEL_DIMS: dict[str, int | None] = {
    EMBEDDING_KEY: None,  # split either way: MetaModelParallelReader._embedding_dim decides
    "layers.{i}.attention.wq.weight": 0,
    "layers.{i}.attention.wk.weight": 0,
    "layers.{i}.attention.wv.weight": 0,
    "layers.{i}.attention.wo.weight": 1,
    "layers.{i}.feed_forward.w1.weight": 0,
    "layers.{i}.feed_forward.w2.weight": 1,
    "layers.{i}.feed_forward.w3.weight": 0,
    "output.weight": 0,
    "layers.{i}.attention_norm.weight": None,
    "layers.{i}.ffn_norm.weight": None,
    "norm.weight": None,
    "rope.freqs": None,
}
_LAYER = re.compile(r"^layers\.\d+\.")


def _template(name: str) -> str:
    return _LAYER.sub("layers.{i}.", name)


def _other_dims(shape: torch.Size, dim: int | None) -> tuple[int, ...]:
    """The sizes that must agree between ranks: all but the split dim."""
    return tuple(size for d, size in enumerate(shape) if d != dim)


class MetaModelParallelReader:
    """The keys of several ``consolidated.NN.pth`` files, merged into full tensors.

    Args:
        files: the rank files, rank 0 first.
        states: each file's ``{name: tensor}``, memory-mapped, in the same order.

    Raises:
        CheckpointError: the files disagree (keys, dtypes, the shapes of dims that are not
            split) or hold a key whose split is unknown.
    """

    def __init__(self, files: list[Path], states: list[dict[str, torch.Tensor]]) -> None:
        self.path = files[0]
        self.files = files
        self._states = states
        first = states[0]
        for file, state in zip(files[1:], states[1:], strict=True):
            if state.keys() != first.keys():
                odd = sorted(state.keys() ^ first.keys())[:3]
                raise CheckpointError(
                    f"{file}: holds other keys than {files[0].name} (e.g. {', '.join(odd)}); "
                    "the model-parallel files do not belong together"
                )
        unknown = [name for name in first if _template(name) not in META_PARALLEL_DIMS]
        if unknown:
            raise CheckpointError(
                f"{files[0].parent}: model-parallel Meta checkpoint holds keys whose split is "
                f"unknown ({', '.join(unknown[:3])}); only Llama-style decoders can be merged"
            )
        self._dims = {name: self._dim_of(name) for name in first}
        self._infos = [self._merged_info(name) for name in first]

    def _embedding_dim(self) -> int:
        embedding = self._states[0][EMBEDDING_KEY]
        wq = self._states[0].get("layers.0.attention.wq.weight")
        if wq is None or embedding.dim() != 2:
            raise CheckpointError(
                f"{self.path.parent}: cannot tell how the token embedding is split without "
                "layers.0.attention.wq.weight"
            )
        # wq's slices keep the full model dim as their input features.
        return 0 if embedding.shape[1] == wq.shape[1] else 1

    def _dim_of(self, name: str) -> int | None:
        if name == EMBEDDING_KEY:
            return self._embedding_dim()
        return META_PARALLEL_DIMS[_template(name)]

    def _merged_info(self, name: str) -> TensorInfo:
        slices = [state[name] for state in self._states]
        dim = self._dims[name]
        first = slices[0]
        if dim is not None and dim >= first.dim():
            raise CheckpointError(
                f"{self.path}: {name} has shape {list(first.shape)}, which has no dim {dim} "
                "to merge model-parallel slices along"
            )
        for file, tensor in zip(self.files, slices, strict=True):
            if tensor.dtype != first.dtype or _other_dims(tensor.shape, dim) != _other_dims(
                first.shape, dim
            ):
                raise CheckpointError(
                    f"{file}: {name} is {list(tensor.shape)} {tensor.dtype}, rank 0 has "
                    f"{list(first.shape)} {first.dtype}; the model-parallel files do not "
                    "belong together"
                )
        shape = list(first.shape)
        if dim is not None:
            shape[dim] = sum(tensor.shape[dim] for tensor in slices)
        return TensorInfo(name, tuple(shape), first.dtype, self.path)

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def tensor(self, name: str) -> torch.Tensor:
        dim = self._dims[name]
        if dim is None:
            return self._states[0][name].detach()
        import torch  # noqa: PLC0415 - imported where tensors are touched (fast start-up)

        return torch.cat([state[name] for state in self._states], dim=dim)

    def region(self, name: str) -> None:
        return None  # a merged tensor lies in no one place

    def close(self) -> None:
        self._states = []


__all__ = ["META_PARALLEL_DIMS", "MetaModelParallelReader"]

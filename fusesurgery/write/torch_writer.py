"""Write a ``torch.save`` checkpoint (Meta's ``consolidated.00.pth``) atomically.

``torch.save`` writes every storage of the dict it is given, so tensors handed over mmap-backed
(fusesurgery's safetensors reader gives each tensor a storage of exactly its own bytes) are
copied from the page cache: memory holds only the tensors that had to be computed (a RoPE
permutation, a cast).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence

import torch

from fusesurgery.errors import ShapeError
from fusesurgery.io import TensorInfo
from fusesurgery.write.output_guard import (
    MARKER_FILE,
    check_not_an_input,
    marker_content,
    resolve_output,
)
from fusesurgery.write.safetensors_writer import (
    WriteResult,
    _write_errors,
    atomic_output,
    check_extra_files,
    progress_callback,
    write_extra_files,
)
from fusesurgery.write.shard_plan import plan_shards

META_WEIGHTS_FILE = "consolidated.00.pth"


def write_torch_checkpoint(
    out_dir: str | os.PathLike[str],
    infos: Sequence[TensorInfo],
    get_tensor: Callable[[str], torch.Tensor],
    *,
    filename: str = META_WEIGHTS_FILE,
    extra_files: Mapping[str, bytes | str] | None = None,
    overwrite: bool = False,
    on_tensor_written: Callable[[TensorInfo], None] | None = None,
    durable: bool = True,
    inputs: Collection[str | os.PathLike[str]] = (),
    on_progress: Callable[[int, int], None] | None = None,
) -> WriteResult:
    """Write ``{name: tensor}`` with ``torch.save`` into ``out_dir/filename``, atomically, with
    the same output rules as ``write_safetensors`` (never over an input, ``overwrite`` only
    of a fusesurgery output, nothing left behind on failure).

    Returns:
        The output directory and the files written; its ``plan`` is one shard of every
        tensor (sizes only: the data lives in ``filename``).

    Raises:
        WriteError: as ``write_safetensors``.
        ShapeError: ``get_tensor`` returned a tensor that does not match its TensorInfo.
    """
    out = resolve_output(out_dir)
    check_not_an_input(out, inputs)
    on_tensor_written = progress_callback(infos, on_tensor_written, on_progress)
    extras = check_extra_files(extra_files, {filename, MARKER_FILE})
    extras[MARKER_FILE] = marker_content(files=[filename, *extras]).encode()
    tensors: dict[str, torch.Tensor] = {}
    for info in infos:
        tensor = get_tensor(info.name)
        if tuple(tensor.shape) != tuple(info.shape) or tensor.dtype != info.dtype:
            raise ShapeError(f"{info.name}: expected {list(info.shape)} {info.dtype}, got "
                             f"{list(tensor.shape)} {tensor.dtype}")
        tensors[info.name] = tensor.detach().cpu()
    needed = sum(info.nbytes for info in infos) + sum(len(c) for c in extras.values())
    with atomic_output(out, overwrite=overwrite, needed=needed, durable=durable) as temp_dir:
        path = temp_dir / filename
        with _write_errors("write", path):
            torch.save(tensors, path)
            if durable:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        if on_tensor_written is not None:
            for info in infos:
                on_tensor_written(info)
        files = [filename, *write_extra_files(temp_dir, extras, durable)]
    plan = plan_shards(list(infos), max(1, sum(info.nbytes for info in infos)))
    return WriteResult(out_dir=out, plan=plan, files=tuple(files))


__all__ = ["META_WEIGHTS_FILE", "write_torch_checkpoint"]

"""The one entry point for reading a checkpoint, wherever it lies: a local path, or a Hugging
Face Hub repo id (a local path always wins over a repo id of the same name).

It sits above both readers so that neither imports the other: :mod:`fusesurgery.io.checkpoint`
opens local files, :mod:`fusesurgery.io.hub_sources` fetches a repo's files (or reads its
headers remotely) and opens them with the local reader.
"""

from __future__ import annotations

import os

from fusesurgery.io._files import utf8_path
from fusesurgery.io.checkpoint import CheckpointSource, open_local_checkpoint


def open_checkpoint(path: str | os.PathLike[str], *,
                    remote_headers: bool = False) -> CheckpointSource:
    """Open a checkpoint of any supported form, reading metadata only.

    Forms: everything :func:`fusesurgery.io.checkpoint.open_local_checkpoint` opens (a
    ``.safetensors`` file, a shard index, a ``torch.save`` file, a Hugging Face or Meta
    directory, a directory holding one checkpoint file). A path that does not exist locally
    may name a Hugging Face Hub model repo (``org/name[@revision]``, ``hf://[models/]org/name``):
    the files the checkpoint needs are downloaded through huggingface_hub's cache and opened
    from there (see :mod:`fusesurgery.io.hub_sources`).

    Args:
        path: a file or directory, or a Hub repo id.
        remote_headers: for a Hub repo of safetensors, read the headers with range requests
            instead of downloading the weights; a data file is downloaded when one of its
            tensors is first read. For metadata-only work (``inspect``, key-level ``diff``).

    Returns:
        The opened source; close it (or use ``with``) when done.

    Raises:
        CheckpointError: missing or unreadable path, corrupted file, inconsistent index,
            model-parallel Meta files that do not belong together.
        UnsafeCheckpointError: a pickle that needs code to load.
        UnrecognizedFormatError: nothing recognisable at the path, or several candidates.
        ConfigError: a config.json / params.json beside the weights that is not a JSON object.
        HubError: a Hub repo that is missing, gated, at a missing revision, not cached while
            offline, or out of reach.
    """
    path = utf8_path(path, "checkpoint path")
    if not os.path.lexists(path) or os.fspath(path).startswith("hf://"):
        from fusesurgery.io.hub_sources import open_hub_checkpoint  # noqa: PLC0415 - Hub only

        source = open_hub_checkpoint(path, remote_headers=remote_headers)
        if source is not None:
            return source
    return open_local_checkpoint(path)


__all__ = ["open_checkpoint"]

"""Reading the ``*.index.json`` of a sharded checkpoint (``{"weight_map": {key: shard}}``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fusesurgery.errors import CheckpointError
from fusesurgery.io._files import read_json_file

INDEX_SUFFIX = ".index.json"


@dataclass(frozen=True)
class ShardIndex:
    """The content of a shard index.

    Args:
        path: the index file.
        weight_map: tensor name -> shard file name, relative to the index's directory.
        metadata: the index's ``metadata`` object (e.g. ``total_size``), or ``{}``.
    """

    path: Path
    weight_map: dict[str, str]
    metadata: dict

    @property
    def shard_names(self) -> list[str]:
        """Distinct shard names, sorted (``model-00001-of-00004...`` sorts in shard order)."""
        return sorted(set(self.weight_map.values()))


def read_shard_index(path: str | Path) -> ShardIndex:
    """Read and check a shard index; the shards themselves are not opened.

    Args:
        path: ``model.safetensors.index.json``, ``pytorch_model.bin.index.json`` or similar.

    Returns:
        The index.

    Raises:
        CheckpointError: unreadable, not JSON, not an object, no usable ``weight_map``, or a
            shard name that leaves the index's directory.
    """
    path = Path(path)
    index = read_json_file(path, "shard index")
    if "weight_map" not in index:
        raise CheckpointError(
            f'{path}: shard index has no "weight_map" (expected {{"weight_map": '
            '{tensor name: shard file}})'
        )
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict) or not all(
        isinstance(shard, str) for shard in weight_map.values()
    ):
        raise CheckpointError(f'{path}: "weight_map" must map tensor names to shard file names')
    if not weight_map:
        raise CheckpointError(f'{path}: "weight_map" is empty; the index names no tensors')
    for shard in set(weight_map.values()):
        parts = PurePosixPath(shard).parts
        if not shard or PurePosixPath(shard).is_absolute() or ".." in parts or "\\" in shard:
            raise CheckpointError(
                f"{path}: shard name {shard!r} must be a file name relative to the index's "
                "directory"
            )
    metadata = index.get("metadata")
    return ShardIndex(path, weight_map, metadata if isinstance(metadata, dict) else {})

"""Which tensor goes into which safetensors shard, decided from sizes alone.

The plan never sees tensor data: it takes names and byte counts (or :class:`TensorInfo`
metadata), so a 405B-parameter layout is planned in milliseconds and can be shown to the user
before anything is written. File names and the index follow the Hugging Face convention that
``transformers``, ``huggingface_hub`` and ``safetensors`` readers expect:

- one shard: ``model.safetensors`` and no index;
- several: ``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json``
  holding ``{"metadata": {"total_size": N}, "weight_map": {key: file}}``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from decimal import Decimal

from fusesurgery.errors import WriteError
from fusesurgery.io.tensor_info import TensorInfo

DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_FILENAME_PREFIX = "model"

# Decimal units as Hugging Face uses them ("5GB" = 5 * 10**9), binary ones for those who ask.
_SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(size: int | str) -> int:
    """Turn a size such as ``"5GB"``, ``"500MB"``, ``"10GiB"`` or ``1_000_000`` into bytes.

    Units are case-insensitive; ``KB/MB/GB/TB`` are powers of 1000 (the Hugging Face meaning),
    ``KiB/MiB/GiB/TiB`` powers of 1024. A bare number is a count of bytes.

    Args:
        size: an int number of bytes, or a string of a number and an optional unit.

    Returns:
        The size in bytes, rounded down to a whole byte.

    Raises:
        WriteError: the size is not understood, or is not positive.
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise WriteError(
            f"max shard size must be an int of bytes or a string like '5GB', got {size!r}"
        )
    if isinstance(size, int):
        nbytes = size
    else:
        match = _SIZE_PATTERN.match(size)
        unit = match.group(2).upper() if match else ""
        if match is None or (unit and unit not in _SIZE_UNITS):
            raise WriteError(
                f"cannot parse size {size!r}: use a number with an optional unit "
                f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '5GB' or '500MB'"
            )
        nbytes = int(Decimal(match.group(1)) * _SIZE_UNITS[unit or "B"])
    if nbytes <= 0:
        raise WriteError(f"max shard size must be positive, got {size!r}")
    return nbytes


@dataclass(frozen=True)
class Shard:
    """One output file and the tensors it will hold.

    Args:
        filename: the file's name inside the output directory.
        keys: the tensor names it holds, in the order they were given to the planner.
        nbytes: bytes of tensor data in it (the header, a few KB, is not counted).
    """

    filename: str
    keys: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True)
class ShardPlan:
    """Where every tensor of a checkpoint goes, computed from sizes alone.

    Args:
        shards: the output files, in order.
        max_shard_size: the limit, in bytes, that every shard's data respects unless the shard
            holds a single tensor larger than it.
        filename_prefix: the stem of the file names (``model``).
    """

    shards: tuple[Shard, ...]
    max_shard_size: int
    filename_prefix: str = DEFAULT_FILENAME_PREFIX

    @property
    def is_sharded(self) -> bool:
        """Whether the output needs several files and an index."""
        return len(self.shards) > 1

    @property
    def total_size(self) -> int:
        """Bytes of tensor data over all shards (the index's ``metadata.total_size``)."""
        return sum(shard.nbytes for shard in self.shards)

    @property
    def weight_map(self) -> dict[str, str]:
        """``{tensor name: shard filename}`` for every tensor (a fresh dict on each call)."""
        return {key: shard.filename for shard in self.shards for key in shard.keys}

    @property
    def index_filename(self) -> str | None:
        """``<prefix>.safetensors.index.json`` when sharded, else None (no index is written)."""
        return f"{self.filename_prefix}.safetensors.index.json" if self.is_sharded else None

    def index(self) -> dict[str, dict]:
        """The Hugging Face index document: ``{"metadata": {...}, "weight_map": {...}}``."""
        return {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}


def shard_filename(prefix: str, number: int, count: int) -> str:
    """The Hugging Face name of shard ``number`` (1-based) of ``count``.

    A single shard is ``<prefix>.safetensors``; otherwise ``<prefix>-00001-of-00003.safetensors``
    (five digits, more only past 99999 shards).
    """
    if count == 1:
        return f"{prefix}.safetensors"
    width = max(5, len(str(count)))
    return f"{prefix}-{number:0{width}d}-of-{count:0{width}d}.safetensors"


def _name_and_size(entry: TensorInfo | tuple[str, int]) -> tuple[str, int]:
    if isinstance(entry, TensorInfo):
        return entry.name, entry.nbytes
    name, nbytes = entry
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise WriteError(f"tensor {name!r} has size {nbytes!r}; expected a byte count >= 0")
    return name, nbytes


def plan_shards(
    entries: Sequence[TensorInfo] | Sequence[tuple[str, int]],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    filename_prefix: str = DEFAULT_FILENAME_PREFIX,
    new_shard_at: Collection[str] = (),
) -> ShardPlan:
    """Split tensors into shards of at most ``max_shard_size`` bytes of data, in order.

    Greedy and order-preserving: tensors fill the current shard until the next one would
    overflow it, which then starts a new shard. A tensor larger than the limit gets a shard of
    its own. Keeping the input order means a reader that walks the source checkpoint in order
    also walks the output in order. No tensor data is touched.

    Args:
        entries: :class:`TensorInfo` objects, or ``(name, nbytes)`` pairs.
        max_shard_size: the limit per shard, as bytes or a string such as ``"5GB"``.
        filename_prefix: the stem of the file names.
        new_shard_at: names that start a new shard even where the current one has room (a
            converter keeps each source file's tensors together this way).

    Returns:
        The plan. With no entries it is one empty ``<prefix>.safetensors``.

    Raises:
        WriteError: a name is repeated or reserved, a size is invalid, or the limit cannot be
            parsed.
    """
    limit = parse_size(max_shard_size)
    if not filename_prefix or "/" in filename_prefix or "\\" in filename_prefix:
        raise WriteError(f"filename prefix {filename_prefix!r} must be a non-empty plain name")

    groups: list[tuple[list[str], int]] = []
    current_keys: list[str] = []
    current_size = 0
    seen: set[str] = set()
    for entry in entries:
        name, nbytes = _name_and_size(entry)
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise WriteError(f"invalid tensor name {name!r}: names must be non-empty strings "
                             "other than '__metadata__'")
        if name in seen:
            raise WriteError(f"tensor name {name!r} appears twice; every key must be unique")
        seen.add(name)
        if current_keys and (current_size + nbytes > limit or name in new_shard_at):
            groups.append((current_keys, current_size))
            current_keys, current_size = [], 0
        current_keys.append(name)
        current_size += nbytes
    if current_keys or not groups:
        groups.append((current_keys, current_size))

    count = len(groups)
    shards = tuple(
        Shard(filename=shard_filename(filename_prefix, number, count), keys=tuple(keys),
              nbytes=nbytes)
        for number, (keys, nbytes) in enumerate(groups, start=1)
    )
    return ShardPlan(shards=shards, max_shard_size=limit, filename_prefix=filename_prefix)

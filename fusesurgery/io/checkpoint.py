"""Open any checkpoint lazily: one entry point, one read-only view of names, shapes and tensors.

:func:`open_local_checkpoint` accepts a safetensors file, a shard index, a ``torch.save`` file, a
Hugging Face model directory, a Meta directory (``consolidated.00.pth`` + ``params.json``) or a
directory holding a single checkpoint file, and returns a :class:`CheckpointSource`. Opening
reads safetensors headers and pickle indexes only; tensor data is memory-mapped and read by the
OS when a tensor is used, so a 400B-parameter checkpoint opens in milliseconds and converting it
tensor by tensor never holds more than the tensor at hand.
"""

from __future__ import annotations

import ctypes
import difflib
import os
import re
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from fusesurgery.errors import CheckpointError, ConfigError, UnrecognizedFormatError
from fusesurgery.io._files import describe_os_error, open_for_reading, read_json_file, utf8_path
from fusesurgery.io.meta_parallel import MetaModelParallelReader
from fusesurgery.io.safetensors_header import (
    HEADER_LENGTH_BYTES,
    SafetensorsHeader,
    read_safetensors_header,
)
from fusesurgery.io.shard_index import INDEX_SUFFIX, read_shard_index
from fusesurgery.io.tensor_info import FileRegion, TensorInfo
from fusesurgery.io.torch_pickle import (
    PICKLE_PROTOCOL_OPCODE,
    ZIP_SIGNATURE,
    load_torch_state_dict,
    read_torch_pickle_infos,
)

if TYPE_CHECKING:
    import torch

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HF_CONFIG_FILE = "config.json"
META_PARAMS_FILE = "params.json"
FUSION_CONFIG_FILE = "fusion_config.json"  # a fused checkpoint's (fusesurgery.surgery)
# What transformers' tokenizers read from a model directory (``vocab_files_names`` of the
# decoder families' classes, plus ``PreTrainedTokenizerBase``'s own files): the files that
# travel with a checkpoint (fusesurgery.convert.tokenizer reads and edits them).
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "tiktoken.model", "spiece.model", "sentencepiece.bpe.model",
    "vocab.json", "merges.txt", "vocab.txt",
    "chat_template.jinja", "chat_template.json",
)
# Hugging Face weight files, most preferred first (safetensors over pickles, as transformers).
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
META_SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth")
# Files a Hugging Face Trainer checkpoint directory keeps beside the weights; never weights.
NOT_WEIGHTS_PATTERN = re.compile(
    r"training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth"
)

FORMAT_SAFETENSORS = "safetensors"
FORMAT_SAFETENSORS_SHARDED = "safetensors-sharded"
FORMAT_TORCH = "torch"
FORMAT_TORCH_SHARDED = "torch-sharded"
FORMAT_META = "meta"

_KIND_SAFETENSORS = "safetensors"
_KIND_TORCH = "torch"
_KIND_INDEX = "index"


class TensorNotFoundError(CheckpointError, KeyError):
    """A key the checkpoint does not hold; also a KeyError, so mapping idioms keep working."""

    __str__ = CheckpointError.__str__  # KeyError would quote the whole message


class _TensorReader(Protocol):
    def tensor(self, name: str) -> torch.Tensor: ...

    def infos(self) -> list[TensorInfo]: ...

    def region(self, name: str) -> FileRegion | None: ...

    def close(self) -> None: ...


class _SafetensorsReader:
    """Tensors of one safetensors file, as views of one private mapping made on first use."""

    def __init__(self, header: SafetensorsHeader) -> None:
        self.header = header
        self._storage: torch.UntypedStorage | None = None

    def infos(self) -> list[TensorInfo]:
        return [entry.info for entry in self.header.entries.values()]

    def _mapped_storage(self) -> torch.UntypedStorage:
        if self._storage is None:
            path = self.header.path
            try:
                size_now = path.stat().st_size
            except OSError as error:
                raise describe_os_error(path, error) from None
            if size_now != self.header.file_size:
                raise CheckpointError(
                    f"{path}: file changed size since it was opened "
                    f"({self.header.file_size} -> {size_now} bytes); open it again"
                )
            import torch  # noqa: PLC0415 - imported where tensors are touched (fast start-up)

            # shared=False maps the file MAP_PRIVATE: pages come from the page cache and are
            # only copied if someone writes to a tensor, and the file itself is never changed.
            try:
                self._storage = torch.UntypedStorage.from_file(
                    str(path), shared=False, nbytes=self.header.file_size
                )
            except RuntimeError as error:
                raise CheckpointError(f"{path}: cannot memory-map the file ({error})") from None
        return self._storage

    def tensor(self, name: str) -> torch.Tensor:
        import torch  # noqa: PLC0415 - imported where tensors are touched (fast start-up)

        entry = self.header.entries[name]
        # A storage of exactly this tensor's bytes (a slice shares the mapping, no copy), so
        # torch.save or storage-sharing checks downstream see this tensor, not the whole file.
        storage = self._mapped_storage()[entry.begin : entry.end]
        dtype = entry.info.dtype
        if entry.begin % dtype.itemsize:
            # The mapping is page-aligned, so this tensor's address is misaligned for its
            # dtype. safetensors' own writer pads the header so this never happens; for other
            # writers the only correct answer is a copy into aligned memory.
            raw = torch.empty(0, dtype=torch.uint8).set_(storage)
            return raw.clone().view(dtype).view(entry.info.shape)
        flat = torch.empty(0, dtype=dtype).set_(storage, 0, (entry.info.numel,), (1,))
        return flat.view(entry.info.shape)

    def region(self, name: str) -> FileRegion:
        entry = self.header.entries[name]
        return FileRegion(self.header.path, entry.begin, entry.end - entry.begin)

    def raw(self, name: str) -> bytes:
        """The tensor's stored bytes, read from the file (no torch).

        Raises:
            CheckpointError: the file cannot be read, or ends inside the tensor.
        """
        region = self.region(name)
        try:
            with open(region.path, "rb") as f:
                f.seek(region.offset)
                data = f.read(region.nbytes)
        except OSError as error:
            raise describe_os_error(region.path, error) from None
        if len(data) != region.nbytes:
            raise CheckpointError(f"{region.path}: file ended inside {name!r}")
        return data

    def close(self) -> None:
        # Tensors already handed out keep their own reference to the mapping and stay valid.
        self._storage = None


class _TorchReader:
    """Tensors of one torch.save file, loaded with mmap=True (storages map the file) on first
    use; until then its names, shapes and dtypes come from the pickle alone, without torch
    (``read_torch_pickle_infos``), where the file is a plain state dict."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor] | None = None,
                 infos: list[TensorInfo] | None = None) -> None:
        self.path = path
        self._tensors = tensors
        self._infos = infos
        self._loading = threading.Lock()  # fuse reads from several threads

    @classmethod
    def open(cls, path: Path) -> _TorchReader:
        """Header-only where the pickle allows it, else loaded now (its errors raised now).

        Raises:
            CheckpointError: as ``load_torch_state_dict``.
        """
        infos = read_torch_pickle_infos(path)
        if infos is None:
            return cls(path, load_torch_state_dict(path))
        return cls(path, infos=infos)

    def infos(self) -> list[TensorInfo]:
        if self._infos is None:
            self._infos = [TensorInfo(name, tuple(tensor.shape), tensor.dtype, self.path)
                           for name, tensor in self._loaded().items()]
        return list(self._infos)

    def _loaded(self) -> dict[str, torch.Tensor]:
        with self._loading:
            return self._load_once()

    def _load_once(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            tensors = load_torch_state_dict(self.path)
            stated = [(info.name, info.shape, info.dtype) for info in self._infos]
            if [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()] != stated:
                raise CheckpointError(f"{self.path}: file changed since it was opened; open "
                                      "it again")
            self._tensors = tensors
        return self._tensors

    def tensor(self, name: str) -> torch.Tensor:
        # A fresh alias, so a caller's in-place metadata change (resize_, requires_grad_)
        # cannot leak into later calls.
        return self._loaded()[name].detach()

    def region(self, name: str) -> None:
        return None  # a pickle's storages may be shared, strided or stored out of order

    def close(self) -> None:
        self._tensors = {}


# safetensors dtype -> the struct format of one little-endian value (bf16: read as an f32)
_SCALAR_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "BF16": "<f"}


class CheckpointSource:
    """A checkpoint opened read-only and lazily: names, shapes and dtypes now, data on demand.

    Build one with :func:`fusesurgery.io.open_checkpoint`. Use it as a context manager or call
    :meth:`close`.

    Attributes:
        path: the path that was opened (a file or a directory).
        format: ``"safetensors"``, ``"safetensors-sharded"``, ``"torch"``,
            ``"torch-sharded"`` or ``"meta"``.
        files: the data files, in stored order.
        config: parsed ``config.json`` (Hugging Face) or ``params.json`` (Meta) found beside
            the weights, or None.
        config_file: the name of that file, or None.
        paths_read: every path this source reads: the path opened, the index, the data files
            and the config file; writers refuse outputs that overlap any of them.
        is_hf_dir: a ``config.json`` sits beside the weights.
        metadata: ``__metadata__`` of the first safetensors file, or ``{}``.
        hub: for a Hugging Face Hub repo, its :class:`fusesurgery.io.hub_sources.HubSnapshot`
            (repo id, revision, commit, cache directory); None for a local path.
    """

    def __init__(
        self,
        *,
        path: Path,
        format: str,
        readers: list[tuple[Path, _TensorReader]],
        files: list[Path] | None = None,
        wanted: dict[str, Path] | None = None,
        config: dict[str, Any] | None = None,
        config_file: str | None = None,
        is_hf_dir: bool = False,
        metadata: dict[str, str] | None = None,
        paths_read: tuple[Path, ...] = (),
    ) -> None:
        self.path = path
        self.format = format
        self.files = files or [file for file, _ in readers]
        self.config = config
        self.config_file = config_file
        self.is_hf_dir = is_hf_dir
        self.metadata = metadata or {}
        self.paths_read = (path, *paths_read, *self.files)
        self._readers = [reader for _, reader in readers]
        self._infos: dict[str, TensorInfo] = {}
        self._reader_of: dict[str, _TensorReader] = {}
        for file, reader in readers:
            for info in reader.infos():
                # With an index, a shard holds exactly the keys the index assigns to it.
                if wanted is not None and wanted.get(info.name) != file:
                    continue
                self._infos[info.name] = info
                self._reader_of[info.name] = reader
        self.total_bytes = sum(info.nbytes for info in self._infos.values())
        self.hub: Any = None  # set by fusesurgery.io.hub_sources for a Hub repo
        self._closed = False

    @property
    def display_name(self) -> str:
        """The source as the user named it: a Hub repo's id (``org/name@rev``), else the
        path opened."""
        return self.hub.reference.display if self.hub is not None else str(self.path)

    def keys(self) -> list[str]:
        """Tensor names in stored order (file by file, in each file as its bytes are laid out)."""
        return list(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, key: str) -> TensorInfo:
        """Name, shape, dtype and file of one tensor, without reading its data.

        Raises:
            TensorNotFoundError: the checkpoint holds no such key.
        """
        try:
            return self._infos[key]
        except KeyError:
            raise self._not_found(key) from None

    def infos(self) -> dict[str, TensorInfo]:
        """Every tensor's metadata, keyed by name, in stored order."""
        return dict(self._infos)

    def get_tensor(self, key: str) -> torch.Tensor:
        """One tensor, backed by a private memory map of its file (no copy of the data).

        Tensors of one file share a copy-on-write mapping: writing into one in place does not
        change the file, but later ``get_tensor`` calls would see the write; clone first if
        you mean to modify. Returned tensors stay valid after :meth:`close`.

        Raises:
            TensorNotFoundError: the checkpoint holds no such key.
            CheckpointError: the source is closed, or the file cannot be mapped.
        """
        if self._closed:
            raise CheckpointError(f"{self.path}: checkpoint is closed")
        try:
            reader = self._reader_of[key]
        except KeyError:
            raise self._not_found(key) from None
        return reader.tensor(key)

    def read_scalar(self, key: str) -> float:
        """The value of a one-element floating-point tensor (a gate). Read from the file's
        bytes for the dtypes ``struct`` decodes (f64, f32, f16; bf16 as the top half of an
        f32), so that metadata-level commands (``inspect``) need no torch; else through
        :meth:`get_tensor`.

        Raises:
            TensorNotFoundError: the checkpoint holds no such key.
            CheckpointError: the tensor has more than one element, or the file cannot be read.
        """
        info = self.info(key)
        if info.numel != 1:
            raise CheckpointError(f"{self.path}: {key} has shape {list(info.shape)}, not one "
                                  "value")
        reader = self._reader_of[key]
        if not isinstance(reader, _SafetensorsReader) or info.dtype_code not in _SCALAR_FORMATS:
            return float(self.get_tensor(key).reshape(-1)[0].item())
        raw = reader.raw(key)
        if info.dtype_code == "BF16":  # bfloat16 is the upper half of a float32
            raw = b"\0\0" + raw
        return struct.unpack(_SCALAR_FORMATS[info.dtype_code], raw)[0]

    def read_tensor(self, key: str) -> torch.Tensor:
        """One tensor read into fresh memory with ``pread`` rather than mapped.

        For a tensor about to be transformed into a new one anyway (a RoPE permutation, a dtype
        cast), one sequential read is cheaper than faulting its mapped pages in one by one.
        Pickles fall back to ``get_tensor(key).clone()``.

        Raises:
            TensorNotFoundError: the checkpoint holds no such key.
            CheckpointError: the file cannot be read.
        """
        region = self.file_region(key)
        if region is None:
            return self.get_tensor(key).clone()
        import torch  # noqa: PLC0415 - imported where tensors are touched (fast start-up)

        info = self._infos[key]
        out = torch.empty(info.shape, dtype=info.dtype)
        if region.nbytes:
            # a writable byte view of the new tensor (numpy has no bfloat16, and is no
            # dependency of ours)
            view = memoryview((ctypes.c_ubyte * region.nbytes).from_address(out.data_ptr()))
            try:
                with open(region.path, "rb") as f:
                    f.seek(region.offset)
                    if f.readinto(view) != region.nbytes:
                        raise CheckpointError(f"{region.path}: file ended inside {key!r}")
            except OSError as error:
                raise describe_os_error(region.path, error) from None
        return out

    def file_region(self, key: str) -> FileRegion | None:
        """Where ``key``'s raw bytes lie in its file, for a byte-for-byte copy; None when the
        format stores them otherwise (pickles).

        Raises:
            TensorNotFoundError: the checkpoint holds no such key.
        """
        try:
            reader = self._reader_of[key]
        except KeyError:
            raise self._not_found(key) from None
        return reader.region(key)

    def _not_found(self, key: str) -> TensorNotFoundError:
        close = difflib.get_close_matches(str(key), self._infos, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return TensorNotFoundError(f"{self.path}: no tensor named {key!r}{hint}")

    def close(self) -> None:
        """Drop the mappings this source holds; metadata stays readable."""
        for reader in self._readers:
            reader.close()
        self._closed = True

    def __enter__(self) -> CheckpointSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"CheckpointSource({str(self.path)!r}, format={self.format!r}, "
            f"tensors={len(self)}, bytes={self.total_bytes})"
        )


def open_local_checkpoint(path: str | os.PathLike[str]) -> CheckpointSource:
    """Open a checkpoint of any supported form on this machine, reading metadata only
    (:func:`fusesurgery.io.open_checkpoint` also takes Hub repo ids).

    Forms: a ``.safetensors`` file; a shard index (``*.index.json``, or its directory) of
    safetensors or torch shards; a ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` state dict (also
    wrapped as ``{"model": sd}`` / ``{"state_dict": sd}``); a Hugging Face directory
    (``config.json`` + ``model.safetensors`` / its index / ``pytorch_model.bin`` / its index,
    safetensors preferred); a Meta directory (``consolidated.00.pth`` + ``params.json``;
    model-parallel ``consolidated.NN.pth`` ranks are merged into full tensors when read); a
    directory holding exactly one checkpoint file.

    Args:
        path: a file or directory.

    Returns:
        The opened source; close it (or use ``with``) when done.

    Raises:
        CheckpointError: missing or unreadable path, corrupted file, inconsistent index,
            model-parallel Meta files that do not belong together.
        UnsafeCheckpointError: a pickle that needs code to load.
        UnrecognizedFormatError: nothing recognisable at the path, or several candidates.
        ConfigError: a config.json / params.json beside the weights that is not a JSON object.
    """
    path = utf8_path(path, "checkpoint path")
    path = Path(path)
    try:
        is_directory = stat.S_ISDIR(path.stat().st_mode)
    except OSError as error:
        raise describe_os_error(path, error) from None
    target = _pick_file_in_directory(path) if is_directory else path
    kind = _classify_file(target)

    files: list[Path] | None = None  # the data files, where not one per reader
    if kind == _KIND_INDEX:
        format, readers, wanted = _open_sharded(target)
    elif kind == _KIND_SAFETENSORS:
        _refuse_one_shard(target, is_directory)
        format, readers, wanted = FORMAT_SAFETENSORS, [_open_safetensors(target)], None
    else:
        if META_SHARD_PATTERN.fullmatch(target.name):
            format = FORMAT_META
            files, reader = _open_meta(target)
            readers, wanted = [(files[0], reader)], None
        else:
            format = FORMAT_TORCH
            readers = [(target, _TorchReader.open(target))]
            wanted = None

    config, config_file = _read_config(target.parent, prefer_params=format == FORMAT_META)
    first_reader = readers[0][1]
    metadata = first_reader.header.metadata if isinstance(first_reader, _SafetensorsReader) else {}
    return CheckpointSource(
        path=path,
        format=format,
        readers=readers,
        files=files,
        wanted=wanted,
        config=config,
        config_file=config_file,
        is_hf_dir=(target.parent / HF_CONFIG_FILE).is_file(),
        metadata=metadata,
        paths_read=(target, *([target.parent / config_file] if config_file else [])),
    )


SHARD_NAME_PATTERN = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.safetensors")


def _refuse_one_shard(file: Path, chosen_from_directory: bool) -> None:
    """A shard of a set given on its own describes a fraction of a model: every later check
    would blame the wrong thing (a missing embedding or LM head). Say what it is instead.

    Raises:
        UnrecognizedFormatError: ``file`` is shard k of n > 1 of a sharded checkpoint.
    """
    match = SHARD_NAME_PATTERN.fullmatch(file.name)
    if chosen_from_directory or match is None or int(match.group(3)) <= 1:
        return
    index = file.parent / f"{match.group(1)}.safetensors.index.json"
    where = f"its index {index}" if index.exists() else f"the directory {file.parent}"
    raise UnrecognizedFormatError(
        f"{file} is shard {int(match.group(2))} of {int(match.group(3))} of a sharded "
        f"checkpoint, not a whole model; give {where}")


def _open_safetensors(file: Path) -> tuple[Path, _TensorReader]:
    return file, _SafetensorsReader(read_safetensors_header(file))


def _open_sharded(
    index_path: Path,
) -> tuple[str, list[tuple[Path, _TensorReader]], dict[str, Path]]:
    index = read_shard_index(index_path)
    directory = index_path.parent
    readers: list[tuple[Path, _TensorReader]] = []
    kinds = set()
    for shard_name in index.shard_names:
        shard = directory / shard_name
        if not shard.is_file():
            raise CheckpointError(
                f"{index_path}: names shard {shard_name!r}, which does not exist in {directory}"
            )
        kind = _classify_file(shard)
        kinds.add(kind)
        if kind == _KIND_SAFETENSORS:
            readers.append(_open_safetensors(shard))
        elif kind == _KIND_TORCH:
            readers.append((shard, _TorchReader.open(shard)))
        else:
            raise UnrecognizedFormatError(f"{index_path}: shard {shard_name!r} is itself an index")
    if len(kinds) > 1:
        raise UnrecognizedFormatError(
            f"{index_path}: mixes safetensors and torch shards; convert them to one format"
        )
    held = {file: {info.name for info in reader.infos()} for file, reader in readers}
    wanted = {name: directory / shard for name, shard in index.weight_map.items()}
    missing = [name for name, file in wanted.items() if name not in held[file]]
    if missing:
        name = missing[0]
        others = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{index_path}: maps {name!r} to shard {index.weight_map[name]!r}, which does not "
            f"hold it{others}; the index does not match its shards"
        )
    format = FORMAT_SAFETENSORS_SHARDED if kinds == {_KIND_SAFETENSORS} else FORMAT_TORCH_SHARDED
    return format, readers, wanted


def _meta_rank_files(directory: Path) -> list[Path]:
    """``consolidated.NN.pth`` files of a Meta directory, rank 0 first.

    Raises:
        CheckpointError: the ranks are not 0 .. N-1 without a gap.
    """
    ranks = {
        int(match.group(1)): directory / name
        for name in _list_directory(directory)
        if (match := META_SHARD_PATTERN.fullmatch(name))
    }
    if sorted(ranks) != list(range(len(ranks))):
        raise CheckpointError(
            f"{directory}: model-parallel Meta files for ranks {sorted(ranks)}; expected "
            f"consolidated.00.pth to consolidated.{len(ranks) - 1:02d}.pth without gaps"
        )
    return [ranks[rank] for rank in range(len(ranks))]


def _open_meta(target: Path) -> tuple[list[Path], _TensorReader]:
    """A Meta ``consolidated.NN.pth`` and its siblings: one file as it is, several (model
    parallel ranks) merged into full tensors."""
    files = _meta_rank_files(target.parent)
    if len(files) == 1:
        return files, _TorchReader.open(target)
    return files, MetaModelParallelReader(files, [load_torch_state_dict(f) for f in files])


def _list_directory(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError as error:
        raise describe_os_error(directory, error) from None


def _pick_file_in_directory(directory: Path) -> Path:
    """The one file to open in a directory, by the rules in :func:`open_local_checkpoint`."""
    names = _list_directory(directory)
    files = [name for name in names if (directory / name).is_file()]
    for preferred in HF_WEIGHT_FILES:
        if preferred in files:
            return directory / preferred

    meta_shards = [name for name in files if META_SHARD_PATTERN.fullmatch(name)]
    if meta_shards:  # rank 0; its siblings are merged in by _open_meta
        return directory / meta_shards[0]

    candidates = [name for name in files if not NOT_WEIGHTS_PATTERN.fullmatch(name)]
    safetensors_indexes = [n for n in candidates if n.endswith(SAFETENSORS_SUFFIX + INDEX_SUFFIX)]
    safetensors_files = [n for n in candidates if n.endswith(SAFETENSORS_SUFFIX)]
    torch_indexes = [
        n for n in candidates if n.endswith(INDEX_SUFFIX) and n not in safetensors_indexes
    ]
    torch_files = [n for n in candidates if n.endswith(TORCH_SUFFIXES)]
    # An index covers the shards beside it; safetensors wins over pickles, as in HF dirs.
    for group in (safetensors_indexes, safetensors_files, torch_indexes, torch_files):
        if len(group) == 1:
            return directory / group[0]
        if len(group) > 1:
            listed = ", ".join(group[:4]) + (", ..." if len(group) > 4 else "")
            raise UnrecognizedFormatError(
                f"{directory}: holds {len(group)} candidate checkpoints ({listed}) and no "
                "index tying them together; pass the path of the one to open"
            )
    raise UnrecognizedFormatError(
        f"{directory}: no checkpoint found (looked for model.safetensors[.index.json], "
        "pytorch_model.bin[.index.json], consolidated.00.pth, or one *.safetensors / "
        f"{' / '.join('*' + suffix for suffix in TORCH_SUFFIXES)} / *.index.json file)"
    )


def _classify_file(file: Path) -> str:
    """Which reader a file needs: by its name, else by its first bytes."""
    name = file.name
    if name.endswith(INDEX_SUFFIX):
        return _KIND_INDEX
    if name.endswith(SAFETENSORS_SUFFIX):
        return _KIND_SAFETENSORS
    if name.endswith(TORCH_SUFFIXES):
        return _KIND_TORCH
    with open_for_reading(file) as (handle, size):
        head = handle.read(HEADER_LENGTH_BYTES + 1)
    if size == 0:
        raise CheckpointError(f"{file}: empty file, not a checkpoint")
    if head.startswith(ZIP_SIGNATURE) or head.startswith(PICKLE_PROTOCOL_OPCODE):
        return _KIND_TORCH
    if len(head) > HEADER_LENGTH_BYTES and head[HEADER_LENGTH_BYTES:] == b"{":
        return _KIND_SAFETENSORS
    raise UnrecognizedFormatError(
        f"{file}: not a recognised checkpoint (neither safetensors nor a torch.save archive)"
    )


def _read_config(directory: Path, *, prefer_params: bool) -> tuple[dict | None, str | None]:
    names = (META_PARAMS_FILE, HF_CONFIG_FILE) if prefer_params else (
        HF_CONFIG_FILE,
        META_PARAMS_FILE,
    )
    names += (FUSION_CONFIG_FILE,)
    for name in names:
        config_path = directory / name
        # lexists: a config that exists but is no file (a directory, a FIFO, a dangling or
        # device link) is an error naming it, not a silently missing config
        if not os.path.lexists(config_path):
            continue
        return read_json_file(config_path, "config file", ConfigError), name
    return None, None

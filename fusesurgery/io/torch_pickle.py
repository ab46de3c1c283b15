"""Loading torch.save checkpoints safely and lazily: weights_only=True, memory-mapped.

``torch.load(mmap=True)`` unpickles only the small ``data.pkl`` index of the zip archive and
maps the tensor storages straight from the file, so "loading" a multi-GB state dict costs a few
milliseconds and no memory until the tensors are read. It works only for the zip format that
``torch.save`` has written since torch 1.6; older files are rejected with the fix.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fusesurgery.errors import CheckpointError, UnsafeCheckpointError
from fusesurgery.io._files import open_for_reading
from fusesurgery.io.tensor_info import SAFETENSORS_DTYPE_FACTS, TensorInfo

if TYPE_CHECKING:
    import torch

ZIP_SIGNATURE = b"PK\x03\x04"
PICKLE_PROTOCOL_OPCODE = b"\x80"

# Training scripts wrap the weights: torchtune/torchvision {"model": sd}, Lightning
# {"state_dict": sd}, DeepSpeed {"module": sd}. Tried in this order when the top level holds
# no tensors itself.
STATE_DICT_WRAPPER_KEYS = ("model", "state_dict", "module")

# Phrases of torch's weights-only unpickler meaning "this pickle wants to run code" (a class,
# function or blocked module), as opposed to a damaged pickle.
_NEEDS_CODE_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+)"),
    re.compile(r"Can only (?:create new object|build)"),
    re.compile(r"reduce for unrecognized function"),
)

_SAFE_RESAVE_HINT = (
    "fusesurgery loads pickles only with torch.load(weights_only=True); to fix, in a trusted "
    "environment load it and re-save the plain state dict "
    "(torch.save(model.state_dict(), path)) or save it as safetensors"
)


def load_torch_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load the tensors of a torch.save file, memory-mapped, never running pickled code.

    Accepts a flat state dict ``{name: tensor}`` (non-tensor entries are ignored) or one
    wrapped under a key of :data:`STATE_DICT_WRAPPER_KEYS` (other entries of the wrapper,
    such as optimizer state or epoch counters, are ignored).

    Args:
        path: a ``.pt`` / ``.pth`` / ``.bin`` file written by ``torch.save``.

    Returns:
        ``{name: tensor}`` in stored order; tensors are views of a private (copy-on-write)
        mapping of the file.

    Raises:
        UnsafeCheckpointError: the pickle needs a class or function to load.
        CheckpointError: missing, unreadable, empty, not a zip-format torch file, damaged, or
            holding no tensors.
    """
    path = Path(path)
    with open_for_reading(path) as (handle, size):
        signature = handle.read(len(ZIP_SIGNATURE))
    if size == 0:
        raise CheckpointError(f"{path}: empty file, not a torch checkpoint")
    if signature != ZIP_SIGNATURE:
        if signature.startswith(PICKLE_PROTOCOL_OPCODE):
            raise CheckpointError(
                f"{path}: legacy (pre-1.6, non-zip) torch.save format, which cannot be "
                "memory-mapped; convert it once: torch.save(torch.load(path, weights_only=True), "
                "new_path) writes the zip format, or save it as safetensors"
            )
        raise CheckpointError(f"{path}: not a torch.save zip archive (no zip signature)")

    tensors = _extract_state_dict(path, _load(path, map_location="cpu", mmap=True))
    for name, tensor in tensors.items():
        unsupported = _unsupported_kind(tensor)
        if unsupported is not None:
            what, fix = unsupported
            raise CheckpointError(
                f"{path}: tensor {name!r} is {what}; fusesurgery reads plain dense (strided) "
                f"tensors only: {fix}"
            )
        if tensor.is_meta:
            raise CheckpointError(
                f"{path}: tensor {name!r} was saved on the meta device and holds no data; save "
                "the materialised weights"
            )
    # Unpickled again onto the meta device (the pickle only, no data) to check every
    # storage's bytes against its zip record before any tensor is handed out: torch maps
    # ``numel * itemsize`` bytes from the record's start whatever the record's size, so a
    # damaged archive would otherwise yield tensors of bytes from neighbouring records.
    _check_storage_ranges(path, size, _extract_state_dict(path, _load(path, map_location="meta")))
    return tensors


# A sparse tensor's layout -> how to say it.
_SPARSE_LAYOUT_NAMES = {
    "sparse_coo": "sparse COO", "sparse_csr": "sparse CSR", "sparse_csc": "sparse CSC",
    "sparse_bsr": "sparse BSR", "sparse_bsc": "sparse BSC",
}


def _unsupported_kind(tensor: torch.Tensor) -> tuple[str, str] | None:
    """``(what the tensor is, how to re-save it)`` for a tensor that has no one dense byte
    range to map, copy or convert (nested, sparse, quantized, a Tensor subclass); None for a
    plain dense tensor."""
    import torch  # noqa: PLC0415 - imported where tensors are touched (fast start-up)

    layout = str(tensor.layout).removeprefix("torch.")
    if tensor.is_nested:
        return (f"a nested tensor (layout torch.{layout})",
                "save each of its components as a tensor of its own")
    if tensor.layout != torch.strided:
        kind = _SPARSE_LAYOUT_NAMES.get(layout, layout)
        return f"a {kind} tensor (layout torch.{layout})", "re-save it with tensor.to_dense()"
    if tensor.is_quantized:
        return (f"a quantized tensor ({str(tensor.dtype).removeprefix('torch.')}, "
                f"{str(tensor.qscheme()).removeprefix('torch.')})",
                "re-save it with tensor.dequantize()")
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return (f"a tensor subclass ({type(tensor).__module__}.{type(tensor).__qualname__})",
                "re-save the plain tensor (tensor.as_subclass(torch.Tensor))")
    return None


def _load(path: Path, **options) -> object:
    import torch  # noqa: PLC0415 - imported where tensors are touched (fast start-up)

    try:
        return torch.load(path, weights_only=True, **options)
    except pickle.UnpicklingError as error:
        raise _classify_unpickling_error(path, error) from None
    except Exception as error:
        # Deliberately broad: on a damaged archive or pickle, torch.load surfaces RuntimeError,
        # EOFError, IndexError, AssertionError, ... (found by fuzzing); callers get one family.
        reason = _first_sentence(str(error))
        if not isinstance(error, RuntimeError):  # torch's own errors read well on their own
            reason = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
        raise CheckpointError(f"{path}: damaged torch checkpoint ({reason})") from None


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length


def _record_spans(path: Path, file_size: int) -> dict[int, zipfile.ZipInfo]:
    """Where each zip record's data starts in the file -> the record, read from the central
    directory and the local headers (no data is read)."""
    spans = {}
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
            for record in archive.infolist():
                handle.seek(record.header_offset)
                raw = handle.read(_LOCAL_HEADER.size)
                if len(raw) != _LOCAL_HEADER.size:
                    raise zipfile.BadZipFile(f"record {record.filename!r} lies past the end")
                signature, name_length, extra_length = _LOCAL_HEADER.unpack(raw)
                if signature != ZIP_SIGNATURE:
                    raise zipfile.BadZipFile(f"record {record.filename!r} has no local header")
                start = record.header_offset + _LOCAL_HEADER.size + name_length + extra_length
                if start + record.file_size > file_size:
                    raise zipfile.BadZipFile(
                        f"record {record.filename!r} ends past the end of the file"
                    )
                spans[start] = record
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError,
            NotImplementedError, EOFError) as error:  # e.g. "zip file version 6.4"
        raise CheckpointError(f"{path}: damaged torch checkpoint ({error})") from None
    return spans


def _check_storage_ranges(
    path: Path, file_size: int, layout: Mapping[str, torch.Tensor]
) -> None:
    """Every tensor's storage must lie inside one uncompressed data record.

    Raises:
        CheckpointError: a storage that starts at no record, in a compressed record, or needs
            more bytes than its record holds.
    """
    spans = _record_spans(path, file_size)
    for name, tensor in layout.items():
        storage = tensor.untyped_storage()
        offset = getattr(storage, "_checkpoint_offset", None)
        record = spans.get(offset) if offset is not None else None
        if record is None:
            raise CheckpointError(
                f"{path}: damaged torch checkpoint (the data of tensor {name!r} starts at no "
                "record of the archive)"
            )
        if record.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{path}: tensor {name!r} is stored compressed ({record.filename}); torch.save "
                "never compresses, so the file was repacked: re-save it with torch.save"
            )
        if storage.nbytes() > record.file_size:
            raise CheckpointError(
                f"{path}: damaged torch checkpoint (tensor {name!r} needs {storage.nbytes()} "
                f"bytes, its record {record.filename} holds {record.file_size})"
            )


def _first_sentence(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".") if lines else ""


def _classify_unpickling_error(path: Path, error: pickle.UnpicklingError) -> CheckpointError:
    message = str(error)
    if "nested jagged tensors" in message:  # torch refuses NJTs before any key is known
        return CheckpointError(
            f"{path}: holds a nested tensor (layout torch.jagged); fusesurgery reads plain "
            "dense (strided) tensors only: save each of its components as a tensor of its own"
        )
    for pattern in _NEEDS_CODE_PATTERNS:
        match = pattern.search(message)
        if match:
            what = f" ({match.group(1)})" if match.groups() else ""
            return UnsafeCheckpointError(
                f"{path}: the pickle needs code to load{what}; {_SAFE_RESAVE_HINT}"
            )
    # torch wraps the unpickler's own complaint in paragraphs of advice; keep only the former.
    _, marker, after = message.partition("WeightsUnpickler error:")
    reason = _first_sentence(after if marker else message) or "unpickling failed"
    return CheckpointError(f"{path}: damaged or unsupported pickle ({reason})")


def _tensors_of(mapping: Mapping) -> dict[str, torch.Tensor]:
    import torch  # noqa: PLC0415 - imported where tensors are touched (fast start-up)

    return {
        name: value
        for name, value in mapping.items()
        if isinstance(name, str) and isinstance(value, torch.Tensor)
    }


def _extract_state_dict(path: Path, loaded: object) -> dict[str, torch.Tensor]:
    import torch  # noqa: PLC0415 - imported where tensors are touched (fast start-up)

    if isinstance(loaded, torch.Tensor):
        raise CheckpointError(
            f"{path}: holds a single tensor, not a state dict {{name: tensor}}"
        )
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(loaded).__name__}, not a state dict {{name: tensor}}"
        )
    tensors = _tensors_of(loaded)
    if tensors:
        return tensors
    for wrapper_key in STATE_DICT_WRAPPER_KEYS:
        inner = loaded.get(wrapper_key)
        if isinstance(inner, Mapping):
            tensors = _tensors_of(inner)
            if tensors:
                return tensors
    top_keys = ", ".join(repr(key) for key in list(loaded)[:5])
    more = ", ..." if len(loaded) > 5 else ""
    raise CheckpointError(
        f"{path}: holds no tensors (top-level keys: {top_keys or 'none'}{more}); expected a "
        f"state dict or one wrapped under {' / '.join(map(repr, STATE_DICT_WRAPPER_KEYS))}"
    )


# --------------------------------------------------------------------------------------------
# The names, shapes and dtypes of a torch.save file without torch: what inspect, key-level
# diff and every plan need, read from the archive's small data.pkl by an unpickler that knows
# only the few globals a plain state dict names and builds placeholders for them (no code
# runs, no torch import: 2 s saved per command). Anything else in the pickle (a sparse,
# quantized or meta tensor, a subclass, a damaged archive) gives None, and the file goes the
# torch.load way, whose checks give the precise error.

# torch.save's typed storage names -> safetensors' dtype codes (what TensorInfo keeps)
_STORAGE_DTYPES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16",
    "BFloat16Storage": "BF16", "LongStorage": "I64", "IntStorage": "I32",
    "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8", "BoolStorage": "BOOL",
}


class _Unusual(Exception):
    """The pickle holds something a header-only read does not model."""


@dataclass(frozen=True)
class _StorageType:
    code: str


@dataclass(frozen=True)
class _Storage:
    code: str
    key: str
    numel: int


@dataclass(frozen=True)
class _TensorStub:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _is_ints(value: object) -> bool:
    return isinstance(value, tuple) and all(
        isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in value)


def _rebuild_tensor_stub(storage: object, offset: object, size: object, stride: object,
                         requires_grad: object, backward_hooks: object,
                         metadata: object = None) -> _TensorStub:
    if not (isinstance(storage, _Storage) and isinstance(offset, int) and _is_ints(size)
            and _is_ints(stride) and len(size) == len(stride) and not backward_hooks):
        raise _Unusual
    return _TensorStub(storage, offset, size, stride)


def _rebuild_parameter_stub(data: object, requires_grad: object,
                            backward_hooks: object) -> _TensorStub:
    if not isinstance(data, _TensorStub) or backward_hooks:
        raise _Unusual
    return data


class _HeaderUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_stub
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter_stub
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise _Unusual

    def persistent_load(self, pid: object) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int) and not isinstance(pid[4], bool)):
            raise _Unusual
        return _Storage(pid[1].code, pid[2], pid[4])


def _stubs_of(loaded: object) -> dict[str, _TensorStub] | None:
    """The state dict ``_extract_state_dict`` would pick, as stubs; None where it would not
    find one (its error then comes from the torch way)."""
    if not isinstance(loaded, Mapping):
        return None
    for mapping in (loaded, *(loaded.get(key) for key in STATE_DICT_WRAPPER_KEYS)):
        if not isinstance(mapping, Mapping):
            continue
        stubs = {name: value for name, value in mapping.items()
                 if isinstance(name, str) and isinstance(value, _TensorStub)}
        if stubs:
            return stubs
    return None


def read_torch_pickle_infos(path: str | Path) -> list[TensorInfo] | None:
    """Names, shapes and dtypes of a plain torch.save state dict, without torch.

    Reads the zip archive's directory and its ``data.pkl`` only, and checks each tensor's
    bytes against its uncompressed data record, as ``load_torch_state_dict`` does.

    Args:
        path: a ``.pt`` / ``.pth`` / ``.bin`` file.

    Returns:
        One TensorInfo per tensor, in stored order (as ``load_torch_state_dict`` gives them);
        None for anything but a plain dense state dict in a sound archive (the caller then
        loads it with torch, whose checks name the problem).
    """
    path = Path(path)
    with open_for_reading(path) as (handle, _):
        try:
            return _infos_from_archive(path, handle)
        except (_Unusual, pickle.UnpicklingError, zipfile.BadZipFile, zipfile.LargeZipFile,
                OSError, ValueError, EOFError, TypeError, KeyError, IndexError,
                AttributeError, RecursionError, NotImplementedError, struct.error):
            return None


def _infos_from_archive(path: Path, handle: io.BufferedIOBase) -> list[TensorInfo] | None:
    if handle.read(len(ZIP_SIGNATURE)) != ZIP_SIGNATURE:
        return None
    handle.seek(0)
    with zipfile.ZipFile(handle) as archive:
        records = {record.filename: record for record in archive.infolist()}
        pickles = [name for name in records if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            return None
        prefix = pickles[0].removesuffix("data.pkl")
        if prefix + "byteorder" in records and archive.read(prefix + "byteorder") != b"little":
            return None
        data = archive.read(pickles[0])
    stubs = _stubs_of(_HeaderUnpickler(io.BytesIO(data)).load())
    if stubs is None:
        return None
    infos = []
    for name, stub in stubs.items():
        record = records.get(f"{prefix}data/{stub.storage.key}")
        itemsize = SAFETENSORS_DTYPE_FACTS[stub.storage.code][1]
        reach = stub.offset + sum((size - 1) * stride for size, stride
                                  in zip(stub.shape, stub.stride, strict=True)) + 1
        if record is None or record.compress_type != zipfile.ZIP_STORED or (
                stub.storage.numel * itemsize > record.file_size) or (
                0 not in stub.shape and reach > stub.storage.numel):
            return None
        infos.append(TensorInfo(name, stub.shape, stub.storage.code, path))
    return infos

"""Stream tensors into (sharded) safetensors files, one tensor in memory at a time, atomically.

Why not ``safetensors.torch.save_file``: it takes a whole file's tensors as one dict, so every
tensor of a shard must be alive at once (a 5 GB shard holds 5 GB of RAM, and a converter would
have to materialise them all first); older releases even serialised the shard into one
``bytes`` buffer, doubling that (safetensors issue #458). It also writes straight to the final
name, with no atomicity across a set of shards and their index. Here each shard's header is
computed from metadata first (names, shapes, dtypes fix every byte offset), then tensors are
fetched one by one through ``get_tensor`` and their bytes are written straight from the
tensor's memory. Peak memory is about the largest tensor (plus a contiguous or CPU copy of it
when the source tensor is neither), independent of shard and model size.

Atomicity: everything is written into a hidden sibling directory ``.<name>.partial-<random>``
(same filesystem), files are fsynced, the index is written last, and only then is the directory
renamed into place. On any failure the temporary directory is removed and the destination is
left exactly as it was. A process killed outright (SIGKILL, power loss) can leave a
``.partial-`` directory behind, never a half-written destination; the next run writing the
same output removes it. Which outputs may be written or replaced at all is decided in
:mod:`fusesurgery.write.output_guard`.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import shutil
import sys
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol

from fusesurgery._sizes import format_bytes
from fusesurgery.errors import ShapeError, WriteError
from fusesurgery.io.tensor_info import (
    SAFETENSORS_DTYPE_FACTS,
    FileRegion,
    PermutedRegion,
    TensorInfo,
)
from fusesurgery.write.output_guard import (
    MARKER_FILE,
    check_destination,
    check_not_an_input,
    make_temp_dir,
    marker_content,
    move_into_place,
    resolve_output,
)
from fusesurgery.write.shard_plan import DEFAULT_MAX_SHARD_SIZE, ShardPlan, plan_shards

# The header must start the data section on an 8-byte boundary; safetensors pads with spaces.
_HEADER_ALIGNMENT = 8
_PAGE_BYTES = 4096
# Bounded slices keep every write() far below the ~2 GiB a single Linux write() can move.
_WRITE_CHUNK_BYTES = 256 * 2**20
# The most buffers one writev() takes (POSIX guarantees at least 16; Linux allows 1024).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16


if TYPE_CHECKING:  # torch is imported where a tensor is first touched: fast start-up
    import torch

    # What ``get_tensor`` may return: a tensor, or where its bytes lie in a file (as they are,
    # or with their rows reordered), which the writer then copies from file to file.
    TensorSource = torch.Tensor | FileRegion | PermutedRegion


class PrecopiedFiles(Protocol):
    """Whole copies of source files made ahead of the writer (see
    :class:`fusesurgery.write.copy_ahead.CopyAhead`)."""

    def take(self, source: Path) -> Path | None:
        """A finished, byte-exact copy of ``source`` on the output's filesystem, now the
        caller's to rename; None when there is none."""

    def stop(self) -> None:
        """Stop copying (the write failed): ``take`` returns None from now on."""


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write_safetensors` produced.

    Args:
        out_dir: the (absolute) output directory, now complete.
        plan: the shard plan that was written.
        files: names of the files written inside ``out_dir``: shards, extra files, then the
            index if there is one (not the marker file every output also holds).
    """

    out_dir: Path
    plan: ShardPlan
    files: tuple[str, ...]

    @property
    def total_size(self) -> int:
        """Bytes of tensor data written (headers excluded)."""
        return self.plan.total_size


@dataclass(frozen=True)
class _ShardLayout:
    """One shard as it will lie on disk: header bytes and tensors in data order."""

    filename: str
    header: bytes
    tensors: tuple[TensorInfo, ...]
    data_size: int


def safetensors_header(tensors: Sequence[TensorInfo], metadata: Mapping[str, str]) -> bytes:
    """The bytes before a safetensors file's data region, for ``tensors`` laid out back to back.

    The tensors' order is kept as given (the writer sorts them for alignment before calling
    this), so a caller can also lay out a file whose tensors are deliberately misaligned.

    Args:
        tensors: the tensors in data order; their dtypes must be in ``TORCH_TO_SAFETENSORS``.
        metadata: the ``__metadata__`` strings, written as given.

    Returns:
        The 8-byte little-endian header length, then the JSON header padded with spaces so
        that the data region starts 8-byte aligned. The data region that must follow holds
        ``sum(info.nbytes for info in tensors)`` bytes.
    """
    entries: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for info in tensors:
        entries[info.name] = {
            "dtype": info.dtype_code,
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    header = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header += b" " * (-len(header) % _HEADER_ALIGNMENT)
    return len(header).to_bytes(8, "little") + header


def _data_order(tensors: Sequence[TensorInfo]) -> list[TensorInfo]:
    # The format forbids gaps between tensors, so alignment comes from order: widest element
    # first keeps every tensor's offset a multiple of its element size (as safetensors itself
    # does). The sort is stable, so same-width tensors keep the plan's order.
    return sorted(tensors, key=lambda info: -info.itemsize)


def _check_infos(infos: Sequence[TensorInfo]) -> None:
    for info in infos:
        if not isinstance(info, TensorInfo):
            raise WriteError(f"expected TensorInfo entries, got {type(info).__name__}: {info!r}")
        if info.dtype_code not in SAFETENSORS_DTYPE_FACTS:
            supported = ", ".join(facts[0] for facts in SAFETENSORS_DTYPE_FACTS.values())
            raise WriteError(
                f"tensor {info.name!r} has dtype {info.dtype}, which safetensors cannot store "
                f"here; convert it to one of: {supported}"
            )
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in info.shape):
            raise WriteError(f"tensor {info.name!r} has invalid shape {info.shape!r}")


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    merged: dict[str, str] = {"format": "pt"}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise WriteError(
                f"safetensors metadata must map str to str, got {key!r}: {value!r}; "
                "serialise the value (e.g. json.dumps) first"
            )
        if key == "format" and value != "pt":
            raise WriteError(
                f"metadata 'format' must be 'pt' so that transformers loads the file, got {value!r}"
            )
        merged[key] = value
    return merged


def check_extra_files(
    extra_files: Mapping[str, bytes | str] | None, reserved: set[str]
) -> dict[str, bytes]:
    checked: dict[str, bytes] = {}
    for name, content in (extra_files or {}).items():
        relative = PurePosixPath(name)
        if (
            not name
            or relative.is_absolute()
            or "\\" in name
            or any(part in ("", ".", "..") for part in name.split("/"))
        ):
            raise WriteError(
                f"extra file name {name!r} must be a relative path inside the output directory"
            )
        if name in reserved:
            raise WriteError(f"extra file {name!r} would overwrite a weight file; rename it")
        if isinstance(content, str):
            content = content.encode("utf-8")
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise WriteError(
                f"extra file {name!r} content must be bytes or str, got {type(content).__name__}"
            )
        checked[name] = bytes(content)
    return checked


def _os_error_message(exc: OSError, action: str, path: Path | str) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free some space or choose an output directory on another disk"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a writable output directory"
    else:
        fix = "check the output location"
    reason = exc.strerror or type(exc).__name__
    return f"cannot {action} {path}: {reason}; {fix}"


@contextmanager
def _write_errors(action: str, path: Path | str) -> Iterator[None]:
    """Turn an OSError of *our* file operations into a one-line WriteError.

    Only output operations go inside: an OSError raised by ``get_tensor`` (a source file that
    cannot be read) is the reader's error, not a write error, and passes through unchanged.
    """
    try:
        yield
    except OSError as exc:
        raise WriteError(_os_error_message(exc, action, path)) from exc


def _tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor's data.

    ``tensor.numpy()`` cannot express bfloat16 or float8, and numpy is no runtime dependency,
    so the view is taken over the raw data pointer. The caller keeps ``tensor`` alive while
    the view is used.
    """
    nbytes = tensor.nbytes
    if nbytes == 0:
        return memoryview(b"")
    raw = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    return memoryview(raw).cast("B")


def _write_all(fd: int, data: memoryview | bytes, position: int | None = None) -> None:
    """Write all of ``data``: appended, or at ``position`` (the file offset stays put)."""
    view = memoryview(data)
    while view:
        chunk = view[:_WRITE_CHUNK_BYTES]
        if position is None:
            written = os.write(fd, chunk)
        else:
            written = os.pwrite(fd, chunk, position)
            position += written
        view = view[written:]


def copy_region(
    fd: int, region: FileRegion, progress: Callable[[int], None] | None = None
) -> None:
    """Append ``region``'s bytes to ``fd``: in the kernel (copy_file_range), falling back to
    reads and writes where the filesystems do not support it. ``progress`` is called with the
    bytes copied so far after each step (the kernel moves at most 2 GiB per call).

    Each call is asked for all that is left: calls have a cost of their own, so the copy is
    never split further than the kernel splits it (``benchmarks/bench_copy_strategies.py``).
    """
    with open(region.path, "rb") as source:
        done = 0
        try:
            while done < region.nbytes:
                copied = os.copy_file_range(source.fileno(), fd, region.nbytes - done,
                                            region.offset + done)
                if copied == 0:
                    raise OSError(errno.EIO, f"{region.path} ended early")
                done += copied
                if progress is not None:
                    progress(done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            source.seek(region.offset + done)
            while done < region.nbytes:
                chunk = source.read(min(_WRITE_CHUNK_BYTES, region.nbytes - done))
                if not chunk:
                    raise OSError(errno.EIO, f"{region.path} ended early") from None
                _write_all(fd, chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done)


def _row_spans(permuted: PermutedRegion) -> list[tuple[int, int]]:
    """``(offset from the region's start, length)`` of each stretch of source rows to write,
    in output order; rows that follow each other in the source share one stretch."""
    row_bytes = permuted.row_bytes
    spans: list[tuple[int, int]] = []
    previous = None
    for row in permuted.row_order:
        if previous is not None and row == previous + 1:
            start, length = spans[-1]
            spans[-1] = (start, length + row_bytes)
        else:
            spans.append((row * row_bytes, row_bytes))
        previous = row
    return spans


def _writev_all(fd: int, buffers: list[memoryview], position: int | None) -> int:
    """Write ``buffers`` back to back, appending (``position`` None) or at ``position``;
    return how many bytes that was."""
    total = sum(len(buffer) for buffer in buffers)
    if position is None:
        written = os.writev(fd, buffers)
    else:
        written = os.pwritev(fd, buffers, position)
    if written < total:  # a short write (a signal, or a quota reached): finish by hand
        done = 0
        for buffer in buffers:
            start = max(0, min(written - done, len(buffer)))
            if start < len(buffer):
                at = None if position is None else position + done + start
                _write_all(fd, buffer[start:], at)
            done += len(buffer)
    return total


def _write_permuted(fd: int, permuted: PermutedRegion, position: int | None = None) -> None:
    """Append ``permuted``'s rows, in their new order, to ``fd`` (or write them at
    ``position``).

    The rows are handed to ``writev`` as slices of a read-only mapping of the source file, so
    the kernel copies them from the source's page cache into the output's: one copy, and no
    buffer to allocate, as for an unpermuted tensor. Where the file cannot be mapped, the
    region is read into memory first.
    """
    region = permuted.region
    if region.nbytes == 0:
        return
    start = region.offset - region.offset % mmap.ALLOCATIONGRANULARITY
    skip = region.offset - start
    with open(region.path, "rb") as source:
        if region.offset + region.nbytes > os.fstat(source.fileno()).st_size:
            raise OSError(errno.EIO, f"{region.path} ended early")
        try:
            mapped = mmap.mmap(source.fileno(), skip + region.nbytes, access=mmap.ACCESS_READ,
                               offset=start)
        except OSError:  # a filesystem that cannot map files
            data = bytearray(region.nbytes)
            source.seek(region.offset)
            if source.readinto(data) != region.nbytes:
                raise OSError(errno.EIO, f"{region.path} ended early") from None
            _gather_rows(fd, memoryview(data), permuted, position)
            return
        with mapped:
            view = memoryview(mapped)
            rows = view[skip:]
            try:
                _gather_rows(fd, rows, permuted, position)
            finally:  # no view may outlive the mapping
                rows.release()
                view.release()


def _gather_rows(
    fd: int, data: memoryview, permuted: PermutedRegion, position: int | None
) -> None:
    spans = _row_spans(permuted)
    for first in range(0, len(spans), _IOV_MAX):
        buffers = [data[offset:offset + length]
                   for offset, length in spans[first:first + _IOV_MAX]]
        try:
            written = _writev_all(fd, buffers, position)
            if position is not None:
                position += written
        finally:
            for buffer in buffers:
                buffer.release()


def _check_permuted(permuted: PermutedRegion, info: TensorInfo) -> None:
    rows = len(permuted.row_order)
    if not info.shape or rows != info.shape[0] or permuted.nbytes % max(rows, 1):
        raise ShapeError(
            f"tensor {info.name!r}: a row order of {rows} rows does not fit shape "
            f"{list(info.shape)}"
        )
    if sorted(permuted.row_order) != list(range(rows)):
        raise ShapeError(f"tensor {info.name!r}: the row order is not a permutation")


def _fetch_checked(
    get_tensor: Callable[[str], TensorSource], info: TensorInfo
) -> TensorSource:
    """Fetch one tensor, check it against its metadata, and make it a contiguous CPU tensor
    (or pass a file region of the right size through for a copy from file to file)."""
    tensor = get_tensor(info.name)
    if isinstance(tensor, (FileRegion, PermutedRegion)):  # no tensor: no need for torch
        if tensor.nbytes != info.nbytes:
            raise ShapeError(
                f"tensor {info.name!r}: the file region holds {tensor.nbytes} bytes, its "
                f"metadata says {info.nbytes}"
            )
        if isinstance(tensor, PermutedRegion):
            _check_permuted(tensor, info)
        return tensor
    import torch  # noqa: PLC0415 - a tensor came back, so torch is loaded already

    if not isinstance(tensor, torch.Tensor):
        raise ShapeError(
            f"get_tensor({info.name!r}) returned {type(tensor).__name__}, expected a torch.Tensor"
        )
    if tuple(tensor.shape) != tuple(info.shape) or tensor.dtype != info.dtype:
        raise ShapeError(
            f"tensor {info.name!r} is {list(tensor.shape)} {tensor.dtype}, but its metadata says "
            f"{list(info.shape)} {info.dtype}; the source and the plan disagree"
        )
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise ShapeError(
            f"tensor {info.name!r} has layout {tensor.layout}; only dense tensors can be written"
        )
    if tensor.is_meta:
        raise ShapeError(
            f"tensor {info.name!r} is on the meta device and has no data; materialise it first"
        )
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    # resolve_neg/resolve_conj are no-ops unless a lazy negation view would otherwise hand us
    # the un-negated bytes.
    return tensor.resolve_neg().resolve_conj().contiguous()


def _shard_layouts(
    plan: ShardPlan, infos_by_name: Mapping[str, TensorInfo], metadata: Mapping[str, str]
) -> list[_ShardLayout]:
    layouts = []
    for shard in plan.shards:
        tensors = _data_order([infos_by_name[key] for key in shard.keys])
        layouts.append(
            _ShardLayout(
                filename=shard.filename,
                header=safetensors_header(tensors, metadata),
                tensors=tuple(tensors),
                data_size=shard.nbytes,
            )
        )
    return layouts


def _check_free_space(parent: Path, needed: int) -> None:
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return
    # Some network/FUSE filesystems report 0 free; let the write itself decide there.
    if 0 < free < needed:
        raise WriteError(
            f"not enough space in {parent}: the output needs {format_bytes(needed)}, "
            f"{format_bytes(free)} are free; free some space or choose another directory"
        )


def _fsync_dir(path: Path, durable: bool = True) -> None:
    if not durable:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with _write_errors("sync", path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, chunks: Sequence[bytes], durable: bool = True) -> None:
    with _write_errors("write", path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            for chunk in chunks:
                _write_all(fd, chunk)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)


def _pad_header(header: bytes, extra: int) -> bytes:
    """``header`` with ``extra`` more spaces of JSON padding (``extra`` a multiple of 8)."""
    length = int.from_bytes(header[:8], "little") + extra
    return length.to_bytes(8, "little") + header[8:] + b" " * extra


def _region_of(source: TensorSource | None) -> FileRegion | None:
    """Where a source's bytes lie in a file (rows perhaps reordered), or None for a tensor."""
    if isinstance(source, PermutedRegion):
        return source.region
    return source if isinstance(source, FileRegion) else None


def _mirrored_file(
    header: bytes, layout: _ShardLayout, sources: Sequence[TensorSource]
) -> tuple[Path, int] | None:
    """Whether the shard is one source file with new names: every tensor a region of the same
    file, in the same order, together filling its data section exactly, under a header that
    fits in the old one's place. Returns that file and the header padding needed, else None.
    """
    if not sources or len(sources) != len(layout.tensors):
        return None
    regions = [_region_of(source) for source in sources]
    if None in regions:
        return None
    path, data_start = regions[0].path, regions[0].offset
    end = data_start
    for region in regions:
        if region.path != path or region.offset != end:
            return None
        end += region.nbytes
    padding = data_start - len(header)
    if padding < 0 or padding % _HEADER_ALIGNMENT:
        return None
    try:
        with open(path, "rb") as source:
            # the regions must start where the file's data does, right after its header
            header_length = int.from_bytes(source.read(8), "little")
            if 8 + header_length != data_start or os.fstat(source.fileno()).st_size != end:
                return None
    except OSError:
        return None
    return path, padding


def whole_file_source(
    tensors: Sequence[TensorInfo],
    regions: Sequence[FileRegion],
    metadata: Mapping[str, str] | None = None,
) -> Path | None:
    """The source file that a shard of exactly ``tensors`` (written with ``metadata``) would
    be a renamed copy of, when their bytes lie at ``regions`` (one each, rows perhaps to be
    reordered): the one file whose data section they fill in order and whose header leaves
    room for theirs. None otherwise. From metadata alone, as the writer itself decides
    (``write_safetensors``), so that a copy can start before the rest is planned.
    """
    if not tensors or len(tensors) != len(regions):
        return None
    ordered = _data_order(tensors)
    if ordered != list(tensors):
        return None
    header = safetensors_header(ordered, _check_metadata(metadata))
    layout = _ShardLayout("", header, tuple(ordered), sum(info.nbytes for info in ordered))
    mirrored = _mirrored_file(header, layout, list(regions))
    return None if mirrored is None else mirrored[0]


def _write_mirror(
    fd: int,
    source_path: Path,
    header: bytes,
    layout: _ShardLayout,
    sources: Sequence[TensorSource],
    on_tensor_written: Callable[[TensorInfo], None] | None,
    copied: bool = False,
) -> None:
    # The whole source file goes over by kernel copies from offset 0, so every page lines up
    # with its source page, as in `cp`; then the bytes that differ are overwritten in place:
    # the header, and the rows of permuted tensors. The figures are in benchmarks/
    # (bench_convert.py end to end, bench_copy_strategies.py the ways of copying). ``copied``:
    # ``fd`` already holds that whole copy (made ahead, see CopyAhead).
    report = on_tensor_written or (lambda info: None)
    size = len(header) + layout.data_size
    unchanged = [(info, source) for info, source in zip(layout.tensors, sources, strict=True)
                 if isinstance(source, FileRegion)]
    reported = 0

    def report_copied(copied: int) -> None:
        nonlocal reported
        while reported < len(unchanged) and (
            unchanged[reported][1].offset + unchanged[reported][1].nbytes <= copied
        ):
            report(unchanged[reported][0])
            reported += 1

    if copied:
        report_copied(size)
    else:
        copy_region(fd, FileRegion(source_path, 0, size), report_copied)
    _write_all(fd, header, position=0)
    for info, source in zip(layout.tensors, sources, strict=True):
        if isinstance(source, PermutedRegion):
            _write_permuted(fd, source, position=source.region.offset)
            report(info)


def _fetch_ahead(
    layout: _ShardLayout, get_tensor: Callable[[str], TensorSource]
) -> list[TensorSource | None]:
    """Fetch the shard's sources while they are file regions (metadata, no memory), stopping
    after the first tensor in memory: at most one is alive, as without the lookahead."""
    sources: list[TensorSource | None] = []
    for info in layout.tensors:
        sources.append(_fetch_checked(get_tensor, info))  # the reader's errors are its own
        if _region_of(sources[-1]) is None:
            break
    return sources


def _write_shard(
    path: Path,
    layout: _ShardLayout,
    get_tensor: Callable[[str], TensorSource],
    on_tensor_written: Callable[[TensorInfo], None] | None,
    durable: bool = True,
    fetched: list[TensorSource | None] | None = None,
    precopied: PrecopiedFiles | None = None,
) -> None:
    """Write one shard; ``fetched``: what ``_fetch_ahead`` already returned for it."""
    sources = _fetch_ahead(layout, get_tensor) if fetched is None else fetched
    header = layout.header
    mirrored = _mirrored_file(header, layout, sources)
    copy = None
    if mirrored is not None and precopied is not None:
        copy = precopied.take(mirrored[0])
    if mirrored is None and sources:
        first = _region_of(sources[0])
        if first is not None and (first.offset - len(header)) % 8 == 0:
            # Start the data where it starts in the source file, modulo a page: the kernel
            # then copies whole pages rather than straddling two per page. Padding in steps
            # of 8 keeps every tensor as aligned as it was.
            header = _pad_header(header, (first.offset - len(header)) % _PAGE_BYTES)

    with _write_errors("write", path):
        if copy is None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        else:  # the source file's bytes are there already: only the differences are written
            os.rename(copy, path)
            fd = os.open(path, os.O_WRONLY)
    try:
        if mirrored is not None:
            source_path, padding = mirrored
            header = _pad_header(header, padding)
            with _write_errors("write", path):
                _write_mirror(fd, source_path, header, layout, sources, on_tensor_written,
                              copy is not None)
        else:
            with _write_errors("write", path):
                _write_all(fd, header)
            _write_in_order(fd, path, layout, sources, get_tensor, on_tensor_written)
        with _write_errors("write", path):
            expected = len(header) + layout.data_size
            if os.fstat(fd).st_size != expected:
                raise WriteError(f"wrote a wrong number of bytes to {path}; this is a bug")
            if durable:
                os.fsync(fd)
    finally:
        os.close(fd)


def _write_in_order(
    fd: int,
    path: Path,
    layout: _ShardLayout,
    fetched: list[TensorSource | None],
    get_tensor: Callable[[str], TensorSource],
    on_tensor_written: Callable[[TensorInfo], None] | None,
) -> None:
    """Append the shard's tensors one by one, taking the first ones from ``fetched``."""
    # File regions that follow each other in one source file are copied in one call: the
    # kernel's per-call cost is noticeable at tens of MB per tensor.
    run: FileRegion | None = None
    run_infos: list[TensorInfo] = []

    def flush_run() -> None:
        nonlocal run
        if run is not None:
            with _write_errors("write", path):
                copy_region(fd, run)
            run = None
            for done in run_infos:
                if on_tensor_written is not None:
                    on_tensor_written(done)
            run_infos.clear()

    for number, info in enumerate(layout.tensors):
        if number < len(fetched):
            tensor, fetched[number] = fetched[number], None
        else:
            tensor = _fetch_checked(get_tensor, info)  # the reader's errors are its own
        if isinstance(tensor, FileRegion):
            if run is not None and (run.path, run.offset + run.nbytes) == (
                tensor.path, tensor.offset
            ):
                run = FileRegion(run.path, run.offset, run.nbytes + tensor.nbytes)
            else:
                flush_run()
                run = tensor
            run_infos.append(info)
            continue
        flush_run()
        with _write_errors("write", path):
            if isinstance(tensor, PermutedRegion):
                _write_permuted(fd, tensor)
            else:
                _write_all(fd, _tensor_buffer(tensor))
        del tensor  # drop the only reference before fetching the next one
        if on_tensor_written is not None:
            on_tensor_written(info)
    flush_run()


class _Cancelled(Exception):
    """Stops a background shard between two kernel calls once the write has failed."""


class _ShardCopier:
    """Writes the shards whose every tensor is a file region on one background thread, while
    the caller's thread goes on producing the shards that hold tensors: kernel copies release
    the GIL, so the disk works while new tensors are made.

    On leaving the block after a failure (Ctrl-C included), queued shards are dropped, the
    running one stops after its current kernel call (its files are then removed with the
    temporary directory), and so do the copies made ahead; without one, a background failure
    is raised.
    """

    def __init__(self, precopied: PrecopiedFiles | None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusesurgery-copy")
        self._futures: list[Future] = []
        self._precopied = precopied
        self._stopping = threading.Event()

    def checked(self, callback: Callable[[TensorInfo], None] | None
                ) -> Callable[[TensorInfo], None]:
        """``callback`` for a background shard: it also stops the shard once the write
        failed (called after each kernel call of a whole-file copy, after each tensor else)."""
        def report(info: TensorInfo) -> None:
            if self._stopping.is_set():
                raise _Cancelled
            if callback is not None:
                callback(info)

        return report

    def submit(self, function: Callable[..., None], *args: object) -> None:
        self.raise_failure()
        self._futures.append(self._pool.submit(function, *args))

    def raise_failure(self) -> None:
        """Raise what a finished background shard raised, if any."""
        for future in self._futures:
            if future.done() and not future.cancelled() and future.exception() is not None:
                raise future.exception()

    def __enter__(self) -> _ShardCopier:
        return self

    def _stop(self) -> None:
        self._stopping.set()
        if self._precopied is not None:
            self._precopied.stop()
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=True)

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self._stop()
            return
        try:
            self._pool.shutdown(wait=True)
            for future in self._futures:
                future.result()
        except BaseException:  # a background failure, or Ctrl-C / SIGTERM while waiting
            self._stop()
            raise


def _all_regions(layout: _ShardLayout, fetched: Sequence[TensorSource | None]) -> bool:
    return len(fetched) == len(layout.tensors) and all(
        _region_of(source) is not None for source in fetched)


def _thread_safe(callback: Callable[[TensorInfo], None] | None
                 ) -> Callable[[TensorInfo], None] | None:
    if callback is None:
        return None
    lock = threading.Lock()

    def report(info: TensorInfo) -> None:
        with lock:
            callback(info)

    return report


def progress_callback(
    infos: Sequence[TensorInfo],
    on_tensor_written: Callable[[TensorInfo], None] | None,
    on_progress: Callable[[int, int], None] | None,
) -> Callable[[TensorInfo], None] | None:
    """One per-tensor callback that also reports ``(bytes written, total bytes)``."""
    if on_progress is None:
        return on_tensor_written
    total = sum(info.nbytes for info in infos)
    done = 0

    def report(info: TensorInfo) -> None:
        nonlocal done
        done += info.nbytes
        if on_tensor_written is not None:
            on_tensor_written(info)
        on_progress(done, total)

    return report


@contextmanager
def atomic_output(
    out_dir: Path, *, overwrite: bool, needed: int, durable: bool = True
) -> Iterator[Path]:
    """Yields a temporary directory beside ``out_dir`` to write the output into; moves it into
    place when the block completes, removes it on any exception (Ctrl-C included).

    ``out_dir`` must already be resolved and checked against the inputs.

    Raises:
        WriteError: an unusable destination (see ``check_destination``), too little space, or
            an OS error while creating, syncing or moving.
    """
    replace_existing = check_destination(out_dir, overwrite)
    _check_free_space(out_dir.parent, needed)
    with _write_errors("create a directory in", out_dir.parent):
        temp_dir = make_temp_dir(out_dir)
    try:
        yield temp_dir
        with _write_errors("sync", temp_dir):
            _fsync_dir(temp_dir, durable)
        with _write_errors("move the finished output to", out_dir):
            move_into_place(temp_dir, out_dir, replace_existing)
            _fsync_dir(out_dir.parent, durable)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def write_extra_files(temp_dir: Path, extras: Mapping[str, bytes], durable: bool) -> list[str]:
    """Write ``{relative name: bytes}`` under ``temp_dir``; returns the names (without the
    marker file)."""
    names = []
    for name, content in extras.items():
        _write_file(temp_dir / name, [content], durable)
        if name != MARKER_FILE:
            names.append(name)
    return names


def write_safetensors(
    out_dir: str | os.PathLike[str],
    infos: Sequence[TensorInfo],
    get_tensor: Callable[[str], TensorSource],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    metadata: Mapping[str, str] | None = None,
    extra_files: Mapping[str, bytes | str] | None = None,
    overwrite: bool = False,
    on_tensor_written: Callable[[TensorInfo], None] | None = None,
    durable: bool = True,
    new_shard_at: Collection[str] = (),
    inputs: Collection[str | os.PathLike[str]] = (),
    on_progress: Callable[[int, int], None] | None = None,
    precopied: PrecopiedFiles | None = None,
) -> WriteResult:
    """Write tensors as Hugging Face-style (sharded) safetensors, streaming and atomically.

    Shards are planned by :func:`plan_shards` from ``infos`` (their order is kept). For each
    tensor, in order, ``get_tensor(name)`` is called once, its result is checked against the
    TensorInfo, written, and released before the next call; peak memory is one tensor (plus a
    copy when it is not a contiguous CPU tensor). Files appear in ``out_dir`` only when all of
    them are complete.

    Tensors given as file regions are copied from file to file by the kernel. Calls for a
    shard run ahead while they return regions (at most one tensor in memory is fetched
    ahead); when a shard turns out to be exactly one source file's data under new names (same
    order, no tensor added, dropped or resized, rows perhaps reordered), that file is copied
    whole and only its header and reordered rows are rewritten in place. Shards whose every
    tensor is a file region are written on a background thread while the next shards' tensors
    are fetched and written on the caller's (``get_tensor`` is only ever called from the
    caller's thread; ``on_tensor_written`` and ``on_progress`` may be called from either, one
    call at a time).

    Args:
        out_dir: the output directory. Missing parents are created. If it exists it must be
            empty, or (with ``overwrite``) an earlier fusesurgery output. It may not be,
            contain, lie inside or link to any of ``inputs``.
        infos: name, shape and dtype of every tensor to write.
        get_tensor: returns the tensor for a name, on any device, of any strides; or, for
            bytes that are copied from a file unchanged or with their rows reordered, a
            ``FileRegion`` or ``PermutedRegion``.
        max_shard_size: the data limit per shard (``"5GB"``, ``"500MB"``, ``"10GiB"`` or bytes).
        metadata: extra ``__metadata__`` strings for every shard; ``{"format": "pt"}`` is always
            included.
        extra_files: ``{relative name: content}`` written alongside (``config.json``,
            ``README.md``, ...); str content is encoded as UTF-8.
        overwrite: replace an earlier fusesurgery output at ``out_dir`` (one holding the
            marker file every output gets); the old content is removed only after the new
            output is complete. Any other non-empty directory is never replaced.
        on_tensor_written: called with each TensorInfo once its bytes are written (progress).
        durable: fsync files and directories before the output appears, so it survives a
            power loss; False leaves flushing to the OS (faster, like ``cp``; still atomic for
            every reader while the machine runs).
        new_shard_at: names that start a new shard even where the current one has room.
        inputs: every path the tensors are read from (checkpoint paths given, files opened);
            the output may not overlap any of them.
        on_progress: called with ``(bytes written, total bytes)`` after each tensor.
        precopied: whole copies of source files made ahead (same filesystem): a shard that
            is such a file under new names takes its copy instead of copying again.

    Returns:
        The output directory, the shard plan, and the names of the files written.

    Raises:
        WriteError: invalid arguments, an output that overlaps an input, a non-empty
            ``out_dir`` without ``overwrite`` or not written by fusesurgery, too little
            space, or any OS error while writing (permission, disk full).
        ShapeError: ``get_tensor`` returned something that does not match its TensorInfo.
        Exception: whatever ``get_tensor`` raises passes through; in every failure case the
            temporary directory is removed and ``out_dir`` is left untouched.
    """
    if sys.byteorder != "little":
        raise WriteError("safetensors stores little-endian data; this machine is big-endian")
    # realpath: a symlinked destination is replaced at its target, next to which the
    # temporary directory must live (same filesystem, so the final rename is atomic).
    out_dir = resolve_output(out_dir)
    check_not_an_input(out_dir, inputs)
    _check_infos(infos)
    on_tensor_written = _thread_safe(progress_callback(infos, on_tensor_written, on_progress))
    header_metadata = _check_metadata(metadata)
    plan = plan_shards(infos, max_shard_size, new_shard_at=new_shard_at)
    reserved = {shard.filename for shard in plan.shards} | {MARKER_FILE}
    if plan.index_filename is not None:
        reserved.add(plan.index_filename)
    extras = check_extra_files(extra_files, reserved)
    layouts = _shard_layouts(plan, {info.name: info for info in infos}, header_metadata)
    marker = marker_content(files=[*(layout.filename for layout in layouts), *extras,
                                   *([plan.index_filename] if plan.index_filename else [])])
    extras[MARKER_FILE] = marker.encode()

    index_bytes = None
    if plan.index_filename is not None:
        index_bytes = (json.dumps(plan.index(), indent=2, sort_keys=True) + "\n").encode()
    needed = (
        sum(len(layout.header) + layout.data_size for layout in layouts)
        + sum(len(content) for content in extras.values())
        + len(index_bytes or b"")
    )
    files: list[str] = []
    with atomic_output(out_dir, overwrite=overwrite, needed=needed, durable=durable) as temp_dir:
        with _ShardCopier(precopied) as copier:
            for layout in layouts:
                path = temp_dir / layout.filename
                fetched = _fetch_ahead(layout, get_tensor)
                # synced below, all at once: no shard waits for another's flush to disk
                if _all_regions(layout, fetched):
                    copier.submit(_write_shard, path, layout, get_tensor,
                                  copier.checked(on_tensor_written), False, fetched, precopied)
                else:
                    _write_shard(path, layout, get_tensor, on_tensor_written, False, fetched,
                                 precopied)
                    copier.raise_failure()
                files.append(layout.filename)
        if durable:
            for layout in layouts:
                _fsync_file(temp_dir / layout.filename)
        files += write_extra_files(temp_dir, extras, durable)
        # The index goes last: a directory holding an index always holds every shard it names.
        if index_bytes is not None:
            _write_file(temp_dir / plan.index_filename, [index_bytes], durable)
            files.append(plan.index_filename)
    return WriteResult(out_dir=out_dir, plan=plan, files=tuple(files))

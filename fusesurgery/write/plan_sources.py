"""Where the writer takes each planned tensor from: a byte range of the source file (copied
by the kernel), rows gathered from it, or the converted tensor; and the order that lets a
shard be a source file under new names. Shared by every writer that applies a plan."""

from __future__ import annotations

import torch

from fusesurgery.convert import apply_plan_entry
from fusesurgery.convert.plan import ConversionPlan, PlanEntry, plan_entry_value
from fusesurgery.convert.transforms import IDENTITY, TAKE_ROWS, row_order
from fusesurgery.io import CheckpointSource, FileRegion, PermutedRegion, TensorInfo


def plan_entry_tensor(entry: PlanEntry, source: CheckpointSource) -> torch.Tensor:
    """The converted tensor of one plan entry, mmap-backed when nothing changes."""
    return plan_entry_value(entry, source.get_tensor)


def plan_entry_source(
    entry: PlanEntry, source: CheckpointSource
) -> torch.Tensor | FileRegion | PermutedRegion:
    """What the writer gets for one plan entry: the file region when the bytes do not change
    (the kernel copies them), the region with a row order when only rows move (gathered from
    the file's pages), else the converted tensor (a stacked one from its parts, each read on
    its own; or, where the parts lie one after the other in one file, as a native conversion
    writes them, that one byte range)."""
    if entry.parts:
        region = _adjacent_parts(entry, source)
        return region if region is not None else plan_entry_value(entry, source.read_tensor)
    if entry.dtype == entry.source_dtype:
        region = source.file_region(entry.source_key)
        if region is not None and entry.transform == (IDENTITY,):
            return region
        if region is not None and entry.transform[0] == TAKE_ROWS and entry.source_shape[0]:
            _, start, stop = entry.transform  # rows of a C-order tensor: one byte range
            row_bytes = region.nbytes // entry.source_shape[0]
            return FileRegion(region.path, region.offset + start * row_bytes,
                              (stop - start) * row_bytes)
        if region is not None and entry.source_shape:
            order = row_order(entry.transform, entry.source_shape[0])
            if order is not None:
                return PermutedRegion(region, order)
        if entry.transform == (IDENTITY,):
            return apply_plan_entry(entry, source.get_tensor(entry.source_key))
    # about to be rewritten anyway: one read beats faulting in mapped pages
    return apply_plan_entry(entry, source.read_tensor(entry.source_key))


def _adjacent_parts(entry: PlanEntry, source: CheckpointSource) -> FileRegion | None:
    """The one byte range a stacked entry's parts make up when each is an unchanged tensor and
    each starts where the one before ends, in one file; else None."""
    regions = []
    for part in entry.parts:
        if part.parts or part.transform != (IDENTITY,) or part.dtype != part.source_dtype \
                or part.dtype != entry.dtype:
            return None
        region = source.file_region(part.source_key)
        if region is None or (regions and (region.path != regions[-1].path or region.offset
                                           != regions[-1].offset + regions[-1].nbytes)):
            return None
        regions.append(region)
    if not regions:
        return None
    return FileRegion(regions[0].path, regions[0].offset, sum(r.nbytes for r in regions))


def source_file_order(
    plan: ConversionPlan, source: CheckpointSource
) -> tuple[list[TensorInfo], set[str]]:
    """The output tensors in the order their bytes lie in the source files, and the first
    tensor of each file, when every tensor's bytes lie in a file; else the plan's order.

    Written in that order, with one shard per source file, a shard whose tensors keep their
    bytes (or only reorder rows) is the source file under new names, which the writer copies
    whole (see ``write_safetensors``). Nothing changes for the reader of the output.
    """
    targets = plan.target_infos()
    positions = {}
    for entry in plan.entries:
        region = source.file_region(entry.source_key)
        if region is None:
            return list(targets.values()), set()
        positions[entry.target_key] = (str(region.path), region.offset)
    ordered = sorted(targets, key=positions.__getitem__)  # by file name, then offset
    first_of_file: dict[str, str] = {}
    for key in ordered:
        first_of_file.setdefault(positions[key][0], key)
    return [targets[key] for key in ordered], set(first_of_file.values())


__all__ = ["plan_entry_source", "plan_entry_tensor", "source_file_order"]

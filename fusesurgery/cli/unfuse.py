"""``fusesurgery unfuse OUT -o DIR``: the decoder (or encoder) back out of a fused checkpoint."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from fusesurgery import _json as standard_json
from fusesurgery._plural import plural
from fusesurgery._sizes import format_bytes
from fusesurgery.cli.errors import stderr
from fusesurgery.cli.options import CheckpointPath, DtypeOption, Json, parse_dtype_option
from fusesurgery.cli.progress import byte_progress
from fusesurgery.io.tensor_info import dtype_name


def unfuse(
    fused: CheckpointPath,
    output: Annotated[str, typer.Option("--output", "-o", help="Output directory.")],
    part: Annotated[Literal["decoder", "encoder"], typer.Option(
        help="decoder or encoder.")] = "decoder",
    format: Annotated[Literal["hf", "native", "meta"] | None, typer.Option(
        "--format", help="hf, native or meta (default: the layout it was fused from).")] = None,
    merge_embeddings: Annotated[bool, typer.Option(
        help="One embedding table of vocab + new tokens (with --format hf): transformers "
        "loads it, and its tokenizer knows the new tokens.")] = False,
    dtype: DtypeOption = None,
    allow_missing: Annotated[bool, typer.Option(
        help="Write the part even when files fuse kept of its source (source/PART/, such as "
        "its tokenizer) are gone and cannot be derived.")] = False,
    max_shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB, 500MB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(
        help="Replace an earlier fusesurgery output (never any other directory).")] = False,
    as_json: Json = False,
) -> None:
    """Write the decoder (or the vision tower) of a fused checkpoint on its own: the original
    tensors, names, config and tokenizer, bit for bit (the inverse of fuse)."""
    from fusesurgery.write.unfuse_checkpoint import unfuse_checkpoint  # noqa: PLC0415 - torch

    cast = parse_dtype_option(dtype)
    from fusesurgery.surgery.export_layout import (  # noqa: PLC0415 - imports nothing
        is_export_directory,
        local_export_path,
    )

    fused = local_export_path(fused)  # a Hub repo of an export: its fetched directory
    if is_export_directory(fused):
        _unfuse_export(fused, output, part, format, merge_embeddings, cast, allow_missing,
                       max_shard_size, overwrite, as_json)
        return
    with byte_progress("unfusing") as update:
        result = unfuse_checkpoint(fused, output, part=part, format=format,
                                   merge_embeddings=merge_embeddings, dtype=cast,
                                   allow_missing=allow_missing,
                                   max_shard_size=max_shard_size, overwrite=overwrite,
                                   on_progress=update)
    written = result.written
    summary = {"output": str(written.out_dir), "part": result.part, "format": result.format,
               "tensors": len(result.plan), "merged_embeddings": result.merged_embeddings,
               "dtype": None if cast is None else dtype_name(cast),
               "total_bytes": written.total_size, "files": list(written.files),
               "notes": list(result.notes)}
    if as_json:
        typer.echo(standard_json.dumps(summary, indent=2))
        return
    typer.echo(f"{result.part} ({result.format}): {plural(len(result.plan), 'tensor')}, "
               f"{format_bytes(written.total_size)} in {plural(len(written.files), 'file')} at "
               f"{written.out_dir}")
    for note in result.notes:
        stderr.print(f"note: {note}")


def _unfuse_export(fused, output: str, part: str, format: str | None, merge_embeddings: bool,
                   cast, allow_missing: bool, max_shard_size: str, overwrite: bool,
                   as_json: bool) -> None:
    """A transformers export's text model or tower: a prefix strip (``format`` hf only)."""
    from fusesurgery.errors import ConfigError  # noqa: PLC0415
    from fusesurgery.hf import unfuse_export  # noqa: PLC0415 - imports torch

    asked = [name for name, given in (("--format native/meta", format not in (None, "hf")),
                                      ("--merge-embeddings", merge_embeddings),
                                      ("--dtype", cast is not None)) if given]
    if asked:
        raise ConfigError(f"{asked[0]} is not supported for a transformers export; convert it "
                          "--to native first")
    with byte_progress("unfusing") as update:
        tensors, written, notes = unfuse_export(
            fused, output, part=part, allow_missing=allow_missing,
            max_shard_size=max_shard_size, overwrite=overwrite, on_progress=update)
    if as_json:
        typer.echo(standard_json.dumps({
            "output": str(written.out_dir), "part": part, "format": "hf", "tensors": tensors,
            "merged_embeddings": False, "dtype": None, "total_bytes": written.total_size,
            "files": list(written.files), "notes": list(notes)}, indent=2))
        return
    typer.echo(f"{part} (hf): {plural(tensors, 'tensor')}, {format_bytes(written.total_size)} "
               f"in {plural(len(written.files), 'file')} at {written.out_dir}")
    for note in notes:
        stderr.print(f"note: {note}")

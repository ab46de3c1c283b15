"""``fusesurgery convert``: rewrite a checkpoint in another key layout, streaming."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from fusesurgery import _json as standard_json
from fusesurgery._sizes import format_bytes
from fusesurgery.cli.errors import stderr
from fusesurgery.cli.options import (
    CheckpointPath,
    DecoderFamilyName,
    DtypeOption,
    EncoderNumHeads,
    HeadDim,
    Json,
    NormEps,
    NumHeads,
    NumKvHeads,
    RopeBase,
    collect_overrides,
    parse_dtype_option,
    split_overrides,
)
from fusesurgery.cli.progress import byte_progress


def convert(
    source: CheckpointPath,
    # str, not Path: typer turns "" into Path("."), the current directory
    output: Annotated[str, typer.Option("--output", "-o", help="Output directory.")],
    to: Annotated[Literal["native", "hf", "meta", "mllama", "transformers"], typer.Option(
        help="Target layout: native, hf, meta (consolidated.00.pth + params.json); for a "
        "fused checkpoint native, mllama (transformers' Mllama) or transformers (a "
        "transformers model directory with its modeling code).")] = "native",
    dtype: DtypeOption = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB, 500MB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(
        help="Replace an earlier fusesurgery output (never any other directory).")] = False,
    as_json: Json = False,
    num_heads: NumHeads = None,
    num_kv_heads: NumKvHeads = None,
    head_dim: HeadDim = None,
    rope_base: RopeBase = None,
    norm_eps: NormEps = None,
    family: DecoderFamilyName = None,
    encoder_num_heads: EncoderNumHeads = None,
) -> None:
    """Convert a decoder or vision tower between the Hugging Face, Meta and native layouts,
    one tensor at a time, into sharded safetensors plus config.json."""
    from fusesurgery.write import convert_checkpoint  # noqa: PLC0415 - imports torch

    cast = parse_dtype_option(dtype)
    from fusesurgery.hf import is_export_directory  # noqa: PLC0415 - imports nothing

    overrides = collect_overrides(
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rope_base=rope_base,
        norm_eps=norm_eps, family=family, encoder_num_heads=encoder_num_heads)
    if to == "transformers" or is_export_directory(source):
        if overrides:  # the export carries the fused checkpoint's own, checked configs
            from fusesurgery.errors import ConfigError  # noqa: PLC0415

            raise ConfigError("--num-heads, --head-dim and the other config overrides are not "
                              "supported with a transformers export")
        _transformers(source, output, to, cast, max_shard_size, overwrite, as_json)
        return
    decoder, vision = split_overrides(overrides)
    with byte_progress("converting") as update:
        result = convert_checkpoint(
            source, output, to=to, dtype=cast,
            max_shard_size=max_shard_size, overrides=decoder or vision or None,
            overwrite=overwrite, on_progress=update,
        )
    detected, written = result.detected, result.written
    summary = {
        "source": str(source),
        "output": str(written.out_dir),
        "kind": detected.kind,
        "family": detected.family,
        "from": detected.layout,
        "to": to,
        "tensors": result.num_tensors,
        "dropped": dict(result.plan.dropped),
        "notes": list(result.notes),
        "total_bytes": written.total_size,
        "files": list(written.files),
    }
    if as_json:
        typer.echo(standard_json.dumps(summary, indent=2))
        return
    typer.echo(f"{detected.kind} ({detected.family}) {detected.layout} -> {to}: "
               f"{result.num_tensors} tensors, {format_bytes(written.total_size)} in "
               f"{len(written.files)} files at {written.out_dir}")
    from fusesurgery.convert.plan import dropped_by_reason

    for keys, reason in dropped_by_reason(result.plan.dropped):  # a line a reason
        stderr.print(f"dropped {keys}: {reason}")
    for note in result.notes:
        stderr.print(note)


def _transformers(source, output: str, to: str, cast, max_shard_size: str, overwrite: bool,
                  as_json: bool) -> None:
    """A fused checkpoint as a transformers model directory (``--to transformers``), or such
    a directory back to the fused checkpoint (``--to native``)."""
    from fusesurgery.errors import ConfigError  # noqa: PLC0415
    from fusesurgery.hf import (  # noqa: PLC0415
        export_transformers,
        import_transformers,
        is_export_directory,
    )
    from fusesurgery.hf.reimport import no_native_form  # noqa: PLC0415

    if cast is not None:
        raise ConfigError("--dtype is not supported with a transformers export")
    if to != "native" and is_export_directory(source):
        reason = no_native_form(source)  # fuse --format transformers wrote it
        if reason is not None:
            raise ConfigError(f"{reason}; it converts to no other format")
        raise ConfigError(f"{source} is a transformers export of a fused checkpoint: only "
                          f"--to native converts it (back to the fused checkpoint), not "
                          f"--to {to}")
    function = export_transformers if to == "transformers" else import_transformers
    with byte_progress("converting") as update:
        _, written = function(source, output, max_shard_size=max_shard_size,
                              overwrite=overwrite, on_progress=update)
    tensors = sum(len(shard.keys) for shard in written.plan.shards)
    origin = "fused" if to == "transformers" else "transformers"
    if as_json:
        typer.echo(standard_json.dumps({
            "source": str(source), "output": str(written.out_dir), "kind": "fused",
            "from": origin, "to": to, "tensors": tensors, "total_bytes": written.total_size,
            "files": list(written.files)}, indent=2))
        return
    typer.echo(f"{origin} -> {to}: {tensors} tensors, {format_bytes(written.total_size)} in "
               f"{len(written.files)} files at {written.out_dir}")
    if to == "transformers":
        stderr.print("load it with AutoModelForImageTextToText.from_pretrained(DIR, "
                     "trust_remote_code=True), or after fusesurgery.hf.register_transformers()")

"""``fusesurgery fuse ENCODER DECODER -o OUT``: the command the project is named for."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from fusesurgery import _json as standard_json
from fusesurgery._plural import plural
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
from fusesurgery.errors import ConfigError

# fusesurgery.surgery.fuse_plan.DEFAULT_EVERY, spelled here so that --help need not import the
# library (and torch); tests/cli/test_startup.py checks the two agree.
DEFAULT_EVERY = 4


def _layers(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        shown = repr(value) if len(value) <= 60 else (
            f"{value[:60]!r}... ({len(value)} characters)")
        raise ConfigError(f"--layers takes comma-separated layer indices such as 3,7,11; "
                          f"got {shown}") from None


def _encoder_layer(value: str | None):
    from fusesurgery.surgery.fuse_plan import DEFAULT  # noqa: PLC0415 - imports torch

    if value is None:
        return DEFAULT
    if value.strip().lower() in ("last", "final", "none"):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--encoder-layer takes a hidden-layer index (-2 is the penultimate) "
                          f"or 'last'; got {value!r}") from None


def fuse(
    encoder: CheckpointPath,
    decoder: CheckpointPath,
    output: Annotated[str, typer.Option("--output", "-o", help="Output directory.")],
    every: Annotated[int | None, typer.Option(
        help=f"A fusion layer in every N-th decoder layer (default {DEFAULT_EVERY}: layers "
        "3, 7, 11, ...).")] = None,
    layers: Annotated[str | None, typer.Option(
        help="Comma-separated decoder layers that get a fusion layer, e.g. 3,7,11.")] = None,
    fusion_after: Annotated[bool, typer.Option(
        help="Run each fusion layer after its original layer (default: before, as Flamingo "
        "and Llama 3.2 Vision).")] = False,
    new_token: Annotated[list[str] | None, typer.Option(
        help="A token to add, repeatable (default: <|image|>); ids vocab_size + i.")] = None,
    embedding_init: Annotated[Literal["mean", "zeros", "normal"], typer.Option(
        help="How new embedding rows start: mean (of the table), zeros, normal.")] = "mean",
    encoder_layer: Annotated[str | None, typer.Option(
        help="Encoder hidden layer that feeds the fusion (transformers' hidden_states[k]; "
        "-2 penultimate) or 'last'; default per family: CLIP -2, SigLIP and DINOv2/v3 "
        "last.")] = None,
    encoder_tokens: Annotated[Literal["all", "cls_and_patches", "patches"] | None, typer.Option(
        help="Encoder output tokens that feed the fusion: all, cls_and_patches (registers "
        "left out) or patches; default per family: DINOv2/v3 cls_and_patches, others all."
    )] = None,
    projection: Annotated[Literal["mlp", "linear"], typer.Option(
        help="Projection head from encoder to decoder width: mlp (2 layers, GELU) or "
        "linear.")] = "mlp",
    dtype: DtypeOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the new parameters.")] = 0,
    max_shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB, 500MB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(
        help="Replace an earlier fusesurgery output (never any other directory).")] = False,
    format: Annotated[Literal["native", "transformers"] | None, typer.Option(
        "--format", help="native (fusesurgery's fused checkpoint) or transformers (a "
        "transformers model directory, for any decoder AutoModelForCausalLM builds and any "
        "tower AutoModel builds); default native, transformers when a family has no native "
        "module.", show_default=False)] = None,
    as_json: Json = False,
    num_heads: NumHeads = None,
    num_kv_heads: NumKvHeads = None,
    head_dim: HeadDim = None,
    rope_base: RopeBase = None,
    norm_eps: NormEps = None,
    family: DecoderFamilyName = None,
    encoder_num_heads: EncoderNumHeads = None,
) -> None:
    """Fuse a vision tower (CLIP, SigLIP, SigLIP2, DINOv2/v3) into a decoder (Llama, Mistral,
    Qwen2, Qwen3, SmolLM3, Phi-3): gated cross-attention layers starting at exactly zero, new tokens
    such as <|image|>, a projection head; written as sharded safetensors with
    fusion_config.json and the tokenizer. With --format transformers (chosen by itself for a
    family with no native module): any decoder and tower transformers has, as a transformers
    model directory."""
    from fusesurgery.surgery.fuse_plan import DEFAULT, FuseOptions  # noqa: PLC0415
    from fusesurgery.write.fuse_checkpoint import fuse_checkpoints  # noqa: PLC0415

    if every is not None and layers is not None:
        raise ConfigError("give --every or --layers, not both")
    decoder_overrides, encoder_overrides = split_overrides(collect_overrides(
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rope_base=rope_base,
        norm_eps=norm_eps, family=family, encoder_num_heads=encoder_num_heads))
    options = FuseOptions(
        fusion_layers=_layers(layers),
        every=DEFAULT_EVERY if every is None else every,
        fusion_first=not fusion_after,
        new_tokens=tuple(new_token) if new_token else ("<|image|>",),
        embedding_init=embedding_init,
        encoder_layer=_encoder_layer(encoder_layer),
        encoder_tokens=DEFAULT if encoder_tokens is None else encoder_tokens,
        projection=projection,
        dtype=parse_dtype_option(dtype),
        seed=seed,
    )
    note = None
    if format is None:
        from fusesurgery.hf.layout_choice import choose_layout  # noqa: PLC0415

        format, note = choose_layout(encoder, decoder)
    if format == "transformers":
        if decoder_overrides or encoder_overrides:
            raise ConfigError("--num-heads, --head-dim and the other config overrides are not "
                              "supported with --format transformers: its configs are used "
                              "as they are")
        _fuse_transformers(encoder, decoder, output, options, max_shard_size, overwrite,
                           as_json, note)
        return
    with byte_progress("fusing") as update:
        result = fuse_checkpoints(
            encoder, decoder, output, options=options,
            decoder_overrides=decoder_overrides or None,
            encoder_overrides=encoder_overrides or None,
            max_shard_size=max_shard_size, overwrite=overwrite, on_progress=update)
    config, written = result.config, result.written
    summary = {
        "output": str(written.out_dir),
        "decoder": {"path": str(decoder), "family": result.decoder.family,
                    "layout": result.decoder.layout},
        "encoder": {"path": str(encoder), "family": result.encoder.family,
                    "layout": result.encoder.layout},
        "fusion_layers": list(config.fusion.fusion_layers),
        "fusion_first": config.fusion.fusion_first,
        "new_tokens": {t.token: t.id for t in config.new_tokens},
        "encoder_layer": config.encoder.output_layer,
        "encoder_tokens": config.encoder.feature_tokens,
        "projection": config.projection,
        "tied_embeddings": config.decoder.tie_word_embeddings,
        "dtypes": dict(config.dtypes),
        "new_parameters": sum(t.nbytes // t.dtype.itemsize for t in result.plan.new_tensors),
        "total_bytes": written.total_size,
        "tokenizer_files": list(result.tokenizer_files),
        # what the fused model computes differently from the sources' own loaders
        "notes": [*result.decoder.differences, *result.encoder.differences],
        "files": list(written.files),
    }
    if as_json:
        typer.echo(standard_json.dumps(summary, indent=2))
        return
    layer_text = "final hidden states" if config.encoder.output_layer is None else (
        f"hidden_states[{config.encoder.output_layer}]")
    typer.echo(
        f"fused {result.encoder.family} -> {result.decoder.family}: fusion layers "
        f"{list(config.fusion.fusion_layers)}, new tokens "
        f"{', '.join(f'{t.token}={t.id}' for t in config.new_tokens) or 'none'}, "
        f"{config.projection} projection from {layer_text}; "
        f"{format_bytes(written.total_size)} in {plural(len(written.files), 'file')} at "
        f"{written.out_dir}")
    if config.decoder.tie_word_embeddings:
        stderr.print("note: tied embeddings: the output stays the original table; new tokens "
                     "are input-only")
    if not result.tokenizer_files:
        stderr.print("note: no tokenizer beside the decoder; none written")
    for note in (*result.decoder.differences, *result.encoder.differences):
        stderr.print(f"note: {note}")
    from fusesurgery.convert.plan import dropped_by_reason

    for part, part_plan in (("decoder", result.plan.decoder_plan),
                            ("encoder", result.plan.encoder_plan)):
        for keys, reason in dropped_by_reason(part_plan.dropped):  # a line a reason
            stderr.print(f"note: {part}: dropped {keys}: {reason}")


def _fuse_transformers(encoder, decoder, output: str, options, max_shard_size: str,
                       overwrite: bool, as_json: bool, note: str | None) -> None:
    """``--format transformers`` (or chosen for a family with no native module)."""
    from fusesurgery.hf.anyfamily import fuse_transformers  # noqa: PLC0415

    with byte_progress("fusing") as update:
        result = fuse_transformers(encoder, decoder, output, options=options,
                                   max_shard_size=max_shard_size, overwrite=overwrite,
                                   on_progress=update)
    config, written = result.config, result.written
    summary = {
        "output": str(written.out_dir),
        "format": "transformers",
        "decoder": {"path": str(decoder), "family": result.decoder.model_type},
        "encoder": {"path": str(encoder), "family": result.tower.model_type},
        "fusion_layers": config["fusion_layers"],
        "fusion_first": config["fusion_first"],
        "new_tokens": {t["token"]: t["id"] for t in config["new_tokens"]},
        "encoder_layer": config["vision_feature_layer"],
        "encoder_tokens": config["encoder_tokens"],
        "projection": config["projection"],
        "tied_embeddings": result.decoder.tied,
        "choices": config["fusesurgery_fuse"]["choices"],
        "new_parameters": result.new_parameters,
        "total_bytes": written.total_size,
        "tokenizer_files": list(result.tokenizer_files),
        "notes": [note] if note else [],
        "files": list(written.files),
    }
    if as_json:
        typer.echo(standard_json.dumps(summary, indent=2))
        return
    layer = config["vision_feature_layer"]
    typer.echo(
        f"fused {result.tower.model_type} -> {result.decoder.model_type} (transformers "
        f"layout): fusion layers {config['fusion_layers']}, new tokens "
        f"{', '.join(f'{t}={i}' for t, i in summary['new_tokens'].items())}, "
        f"{config['projection']} projection from "
        f"{'final hidden states' if layer is None else f'hidden_states[{layer}]'}; "
        f"{format_bytes(written.total_size)} in {plural(len(written.files), 'file')} at "
        f"{written.out_dir}")
    if note:
        stderr.print(f"note: {note}")
    if result.decoder.tied:
        stderr.print("note: tied embeddings: the output stays the original table; new tokens "
                     "are input-only")
    if not result.tokenizer_files:
        stderr.print("note: no tokenizer beside the decoder; none written")
    for key_count, reason in _dropped(result.tower.dropped):
        stderr.print(f"note: encoder: dropped {key_count}: {reason}")


def _dropped(dropped: dict[str, str]) -> list[tuple[str, str]]:
    by_reason: dict[str, int] = {}
    for reason in dropped.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    return [(plural(n, "tensor"), reason) for reason, n in by_reason.items()]

"""``fusesurgery inspect``: what is this checkpoint?"""

from __future__ import annotations

from typing import Annotated

import typer

from fusesurgery import _json as standard_json
from fusesurgery.cli.errors import stdout_console
from fusesurgery.cli.options import (
    CheckpointPath,
    DecoderFamilyName,
    EncoderNumHeads,
    HeadDim,
    Json,
    NormEps,
    NumHeads,
    NumKvHeads,
    RopeBase,
    collect_overrides,
)

Keys = Annotated[bool, typer.Option(
    "--keys", help="List every key (name, shape, dtype) instead of the collapsed key tree.")]


def inspect(
    path: CheckpointPath,
    as_json: Json = False,
    keys: Keys = False,
    num_heads: NumHeads = None,
    num_kv_heads: NumKvHeads = None,
    head_dim: HeadDim = None,
    rope_base: RopeBase = None,
    norm_eps: NormEps = None,
    family: DecoderFamilyName = None,
    encoder_num_heads: EncoderNumHeads = None,
) -> None:
    """Describe a checkpoint from its metadata: format, architecture, config (and where each
    value came from), parameters per component and dtype, the key tree, fusion gates."""
    overrides = collect_overrides(
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        rope_base=rope_base, norm_eps=norm_eps, family=family, encoder_num_heads=encoder_num_heads,
    )
    from fusesurgery.surgery.export_layout import (  # noqa: PLC0415 - imports nothing
        hub_export_directory,
        is_export_directory,
    )

    # config.json and the headers: no torch, no transformers (a Hub repo's headers remotely)
    if is_export_directory(path) or hub_export_directory(path, remote_headers=True):
        from fusesurgery.hf.inspect_export import inspect_export  # noqa: PLC0415

        if overrides:
            from fusesurgery.errors import ConfigError  # noqa: PLC0415

            raise ConfigError("--num-heads and the other config overrides do not apply to a "
                              "transformers export: its configs are used as they are")
        export = inspect_export(path)
        typer.echo(standard_json.dumps(export.to_dict(all_keys=keys), indent=2) if as_json
                   else export.summary(all_keys=keys))
        return
    from fusesurgery.reports.inspection import inspect_checkpoint

    report = inspect_checkpoint(path, overrides)
    if as_json:
        typer.echo(standard_json.dumps(report.to_dict(all_keys=keys), indent=2))
        return
    from fusesurgery.cli.inspect_render import render_report

    stdout_console().print(render_report(report, all_keys=keys))

"""``fusesurgery diff``: what differs between two checkpoints (exit 0 same, 1 different)."""

from __future__ import annotations

from typing import Annotated

import typer

from fusesurgery import _json as standard_json
from fusesurgery.cli.errors import EXIT_DIFFERENT, EXIT_OK, stdout_console
from fusesurgery.cli.options import (
    CheckpointPath,
    DecoderFamilyName,
    HeadDim,
    Json,
    NumHeads,
    NumKvHeads,
    collect_overrides,
)
from fusesurgery.errors import FuseSurgeryError

_SECTION_PREFIXES = ("only in ", "shape changes", "dtype changes", "values:")


def diff(
    a: CheckpointPath,
    b: CheckpointPath,
    values: Annotated[bool | None, typer.Option(
        "--values/--no-values", help="Compare tensor values too (streamed, one pair at a "
        "time). Default: yes when neither side exceeds 1 GB, else keys, shapes and dtypes "
        "only.", show_default=False)] = None,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Compare key names as stored, without mapping them to one layout.")] = False,
    atol: Annotated[float, typer.Option(
        help="With --values: absolute differences up to this count as equal.")] = 0.0,
    max_lines: Annotated[int, typer.Option(
        help="Lines shown per list before '... and N more'.")] = 12,
    as_json: Json = False,
    num_heads: NumHeads = None,
    num_kv_heads: NumKvHeads = None,
    head_dim: HeadDim = None,
    family: DecoderFamilyName = None,
) -> None:
    """Compare two checkpoints: keys only in one side, shape and dtype changes, and with
    --values the values; exit 0 identical, 1 different, 2 trouble. Names are compared in the
    native layout (a plain decoder under a fused checkpoint's decoder.*, a vision tower under
    its encoder.vision.*), so an HF checkpoint lines up with its native, Meta or fused form;
    keys dropped on purpose (RoPE inv_freq, a CLIP text tower) are listed, not counted. Keys
    are shown as each file spells them: 'A's key (B: B's key)' where the two differ."""
    # checked here so that the message names the flag, not the library's parameter
    if max_lines < 1:
        raise FuseSurgeryError(f"--max-lines must be at least 1, got {max_lines}")
    if not atol >= 0:
        raise FuseSurgeryError(f"--atol must be a number >= 0, got {atol}")
    overrides = collect_overrides(num_heads=num_heads, num_kv_heads=num_kv_heads,
                                  head_dim=head_dim, family=family)
    from fusesurgery.reports.diff import diff_checkpoints

    report = diff_checkpoints(a, b, values=values, raw=raw, overrides=overrides, atol=atol)
    if as_json:
        typer.echo(standard_json.dumps(report.to_dict(), indent=2))
    else:
        stdout = stdout_console()
        for line in report.summary(max_lines=max_lines).splitlines():
            if line in ("identical", "different") or line.startswith("same keys"):
                stdout.print(line, style="bold green" if report.identical else "bold red")
            elif line.startswith(_SECTION_PREFIXES):
                stdout.print(line, style="bold", markup=False)
            else:
                stdout.print(line, markup=False)
    raise typer.Exit(EXIT_OK if report.identical else EXIT_DIFFERENT)

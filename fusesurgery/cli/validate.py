"""``fusesurgery validate OUT``: prove a fused checkpoint computes what the decoder computed."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from fusesurgery import _json as standard_json
from fusesurgery.cli.errors import EXIT_DIFFERENT, EXIT_OK, stdout_console
from fusesurgery.cli.options import CheckpointPath, DtypeOption, Json, parse_dtype_option

_STYLES = {"pass": "bold green", "fail": "bold red", "info": "bold yellow"}


def validate(
    fused: CheckpointPath,
    against: Annotated[str | None, typer.Option(
        help="The original decoder (or vision tower), a path or a Hub repo: its tensors must "
        "be the fused checkpoint's, bit for bit (after the same cast if fuse cast them), and "
        "its own logits the fused model's. Without it nothing is compared with the "
        "original.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda (cuda:N).")] = "cpu",
    dtype: DtypeOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the random tokens and images.")] = 0,
    transformers: Annotated[bool, typer.Option(
        "--transformers", help="Also export FUSED to a temporary directory, load it with "
        "transformers and compare its logits with an image with the native model's (always "
        "done when FUSED is a transformers export).")] = False,
    as_json: Json = False,
) -> None:
    """Check a fused checkpoint: its keys, shapes and dtypes; with --against that its original
    tensors are the source's bit for bit (or after the same cast) and its text logits the
    original decoder's; that its logits equal its decoder's exactly while the gates are zero
    (text only and with an image); KV-cache decoding; a save/load round trip. Each row says
    what it compared; the last line says what that proves. A transformers export is checked
    through its fused checkpoint, and its logits compared with the native model's. Exit 0 all
    pass, 1 a check failed, 2 bad input."""
    from fusesurgery.validate import validate_fused  # noqa: PLC0415 - imports torch

    report = validate_fused(fused, against=against, device=device,
                            dtype=parse_dtype_option(dtype), seed=seed,
                            transformers=True if transformers else None)
    if as_json:
        typer.echo(standard_json.dumps(report.to_dict(), indent=2))
    else:
        table = Table(show_header=True, header_style="bold", box=None)
        for column in ("status", "check", "figure", "detail"):
            table.add_column(column)
        for check in report.checks:
            table.add_row(f"[{_STYLES[check.status]}]{check.status.upper()}[/]", check.name,
                          check.figure, check.detail)
        stdout = stdout_console()
        stdout.print(table)
        stdout.print(report.verdict(), style="bold green" if report.ok else "bold red")
    raise typer.Exit(EXIT_OK if report.ok else EXIT_DIFFERENT)

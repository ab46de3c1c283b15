"""``fusesurgery demo``: fuse tiny random models in memory and show the identity holds."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.table import Table

from fusesurgery import _json as standard_json
from fusesurgery.cli.errors import stderr, stdout_console


def demo(
    seed: Annotated[int, typer.Option(help="Random seed of the tiny models.")] = 0,
    interval: Annotated[int, typer.Option(help="A fusion layer every N decoder layers.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Build a tiny decoder and ViT, fuse them with zero-gated cross-attention, and check the
    fused model's logits are bitwise equal to the decoder's."""
    from fusesurgery.demo import run_demo  # noqa: PLC0415 - imports torch

    stderr.print("building a tiny decoder (4 layers) and a tiny CLIP-style ViT ...")
    result = run_demo(seed=seed, fusion_interval=interval)
    if as_json:
        payload = dataclasses.asdict(result)
        payload["summary"]["is_identity"] = result.summary.is_identity
        typer.echo(standard_json.dumps(payload, indent=2))
    else:
        s = result.summary
        table = Table(title="fusion summary", show_header=False)
        table.add_row("fusion layers", ", ".join(map(str, s.fusion_layers)))
        table.add_row("new tokens", str(s.fusion_vocab_size))
        table.add_row("parameters", f"{s.num_parameters:,}")
        table.add_row("fusion parameters", f"{s.num_fusion_parameters:,}")
        table.add_row("trainable parameters", f"{s.num_trainable_parameters:,}")
        table.add_row("gates", "identity: all gates 0" if s.is_identity else str(s.gates))
        table.add_row("text-only logits == decoder", str(result.text_only_equal))
        table.add_row("with-image logits == decoder", str(result.with_image_equal))
        table.add_row("max |diff| with gates at 0.5", f"{result.gated_max_abs_diff:.4g}")
        stdout_console().print(table)
    if not (result.text_only_equal and result.with_image_equal):
        raise typer.Exit(1)
